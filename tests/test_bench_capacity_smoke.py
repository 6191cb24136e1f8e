"""The capacity harness runs end to end at a tiny scale, so that it cannot rot.

No cost is asserted (the machine is shared): only that every setup asked for was
measured, every figure the model needs is in the JSON and positive where it is a
direct measurement, nothing was lost, and the report renders from the JSON.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator needs gcc"),
]

#: Measured directly (CPU time over units of work): must be positive.
DIRECT = [
    "server_us_per_connect",
    "server_us_per_disconnect",
    "server_us_per_conn_second",
    "server_us_per_ping",
    "redis_us_per_publication",
    "redis_us_per_publication_fanout",
    "redis_us_per_connect",
    "redis_us_per_presence_refresh",
]
#: Differences of two measurements (the steps' figures have the idle rate subtracted):
#: a tiny run's noise may put them either side of zero.
DERIVED = [
    "server_us_per_delivery_at_fanout",
    "server_us_per_delivery",
    "server_us_per_publication",
    "redis_us_per_presence_add",
    "server_us_per_presence_add",
    "server_us_per_presence_refresh",
    "redis_us_per_disconnect",
    "kib_per_conn",
]


def test_capacity_harness_smoke(tmp_path: Path) -> None:
    raw, report = tmp_path / "capacity.json", tmp_path / "capacity.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.capacity", "--scale", "0.01", "--nodes", "2", "--shards", "3",
         "--memory-conns", "300", "--json", str(raw), "--report", str(report)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(raw.read_text())
    assert results["skipped"] == [], results["skipped"]
    # Two nodes (the load generator's ports=) on three shards (a comma-separated broker URL).
    assert [(r["nodes"], r["shards"]) for r in results["setups"]] == [(2, 3)]
    for row in results["setups"]:
        figures = row["figures"]
        assert set(figures) == {*DIRECT, *DERIVED, "fanout"}  # every figure is checked below
        for key in DIRECT:
            assert figures[key] > 0, (row["nodes"], row["shards"], key, figures[key])
        for key in DERIVED:
            assert math.isfinite(figures[key]), (key, figures[key])
        assert row["fanout"]["lost"] == 0 and row["rooms"]["lost"] == 0
        assert row["fanout"]["fanout"] > 1 and row["rooms"]["fanout"] == 1
        if row["shards"] == 3:  # the channels were spread over the three shards
            assert len(row["redis_cpu_share"]) == 3 and min(row["redis_cpu_share"]) > 0
    memory = results["memory"]
    assert memory["connections"] == memory["requested"] > 0 and memory["kib_per_conn"] > 0
    assert len(memory["source_addresses"]) >= 2  # the load generator's srcs= option was used
    text = report.read_text()
    assert "Centrifugo" in text and "| figure |" in text and results["date"] in text
    # The report is a function of the JSON alone.
    again = tmp_path / "again.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.capacity", "--from-json", str(raw), "--report", str(again)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert again.read_text() == text
