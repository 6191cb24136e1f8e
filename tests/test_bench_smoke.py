"""The benchmark suite runs end to end (tiny workloads), so that it cannot rot.

No timing is asserted: only that every workload ran against Herald, lost nothing,
kept order, and that the report was written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="the load generator needs gcc"),
]


def test_bench_suite_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    docs = tmp_path / "docs"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--scale",
            "0.01",
            "--repeat",
            "1",
            "--timeout",
            "20",
            "--targets",
            "herald_broadcast",
            "herald_channels",
            "--out",
            str(out),
            "--docs",
            str(docs),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for target in ("herald_broadcast", "herald_channels"):
        per_workload = results["results"][target]
        assert set(per_workload) == {"S1", "S2", "S3", "S4", "slow_clean", "slow", "idle10k"}
        for name, entry in per_workload.items():
            assert not entry["errors"], (target, name, entry["errors"])
            run = entry["median"]
            assert run.get("lost", 0) == 0, (target, name, run)
            assert run.get("order_errors", 0) == 0, (target, name, run)
            if name in ("S4", "idle10k"):
                assert run["established"] == run["conns"]
        assert per_workload["S1"]["median"]["delivered"] == per_workload["S1"]["median"]["expected"] > 0
    text = (docs / "benchmarks.md").read_text()
    assert "Herald `/ws_broadcast`" in text and "S1 fan-out" in text
