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


BENCH = [sys.executable, "-m", "bench", "--scale", "0.01", "--repeat", "1", "--timeout", "20"]


def _run_bench(tmp_path: Path, *args: str) -> dict[str, object]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [*BENCH, "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _check(entry: dict[str, object], target: str, name: str) -> None:
    assert not entry["errors"], (target, name, entry["errors"])
    run = entry["median"]
    assert isinstance(run, dict)
    assert run.get("lost", 0) == 0, (target, name, run)
    assert run.get("order_errors", 0) == 0, (target, name, run)
    if name in ("S4", "idle10k"):
        assert run["established"] == run["conns"]
    if name == "S1":
        assert run["delivered"] == run["expected"] > 0


def test_bench_suite_smoke(tmp_path: Path) -> None:
    # Every workload through the channels protocol (and the report), the raw framing once.
    docs = tmp_path / "docs"
    results = _run_bench(tmp_path, "--targets", "herald_channels", "--docs", str(docs))
    per_workload = results["results"]["herald_channels"]  # type: ignore[index]
    assert set(per_workload) == {"S1", "S2", "S3", "S4", "slow_clean", "slow", "idle10k"}
    for name, entry in per_workload.items():
        _check(entry, "herald_channels", name)
    text = (docs / "benchmarks.md").read_text()
    assert "Herald channels" in text and "S1 fan-out" in text
    results = _run_bench(tmp_path, "S1", "--targets", "herald_broadcast")
    _check(results["results"]["herald_broadcast"]["S1"], "herald_broadcast", "S1")  # type: ignore[index]


@pytest.mark.parametrize("path", ["/connect", "/ws_broadcast"])
def test_heap_per_connection_tool_runs(path: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.heap", "--conns", "20", "--path", path],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"{path} (native), 20 idle connections: ")
    # The clients' own sockets are filtered out; the server's share is what is left.
    assert int(first.rsplit(": ", 1)[1].split()[0]) > 0
    assert "herald" in done.stdout
