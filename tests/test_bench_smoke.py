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
from typing import Any

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


@pytest.mark.parametrize("transport", ["socket", "uvloop"])
def test_write_floor_tool_runs(transport: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.write_floor", "--sockets", "20", "--rounds", "2", "--size", "50",
         "--transport", transport],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # "20 sockets, 50-byte frames, <date>: <cpu> µs of sender CPU per send() ..."
    assert done.stdout.startswith("20 sockets, 50-byte frames"), done.stdout
    assert ("send()" in done.stdout) == (transport == "socket"), done.stdout
    assert float(done.stdout.split(": ", 1)[1].split()[0]) > 0


def test_write_delay_tool_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.write_delay", "--subs", "20", "--rate", "20", "--duration", "1",
         "--rounds", "1", "--delays", "0,0.2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cells = line.split("|")
        if line.startswith("| 0"):  # a run's row: | delay | delivered | µs | p50 / p99 |
            rows[cells[1].strip()] = cells
    p50 = {}
    for delay in ("0", "0.2"):
        cells = rows[delay]
        delivered, expected = cells[2].strip().split("/")
        assert delivered == expected != "0", cells
        p50[delay] = float(cells[4].split("/")[0])
    # The delay is applied to the fanned-out frames, and only with the setting (a frame
    # joins a batch already waiting: half the delay on average, here 4 per batch).
    assert p50["0"] < 50 <= p50["0.2"], p50


# ---------------------------------------------------------------- realistic workloads (issue 19)


def _run_realistic(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "realistic.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.realistic", "--smoke", "--timeout", "30", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _only_run(results: dict[str, Any], workload: str, target: str) -> dict[str, Any]:
    entry = results["results"][workload][target]
    assert not entry["errors"], (workload, target, entry["errors"])
    assert len(entry["runs"]) == 1
    return entry["median"]  # type: ignore[no-any-return]


def _check_ramp(run: dict[str, Any], subs_per_channel: int = 5) -> None:
    assert run["memberships"] == run["subs"] * subs_per_channel
    assert run["biggest_channel"] <= max(run["cap"], run["big"])
    idle = run["idle"]
    assert idle["sent"] > 0 and idle["delivered"] == idle["expected"] and idle["server_cpu_pct"] >= 0
    assert run["steps"], run
    for step in run["steps"]:
        # At smoke size every step is far below saturation: nothing may be lost.
        assert step["sent"] > 0 and step["expected"] > 0, step
        assert step["delivered"] == step["expected"] and step["lost"] == 0, step
        assert step["dropped_connections"] == 0, step
        assert step["latency_ms"]["count"] == step["delivered"], step
        assert step["server_cpu_s"] >= 0 and step["latency_ms"]["p50"] <= step["latency_ms"]["p99"]
    # No latency is asserted (a shared machine), so the headline step may be none.
    assert run["headline"]["max_deliveries_per_s"] > 0
    assert run["lost"] == 0 and run["stray_receipts"] == 0 and run["publish_errors"] == 0


def test_realistic_workloads_smoke(tmp_path: Path) -> None:
    results = _run_realistic(tmp_path, "--workloads", "s5,s5big,s8,s7", "--targets", "herald,herald_logs")
    assert set(results["results"]) == {"s5", "s5big", "s8", "s7_broadcast", "s7_connect", "s7_jwt"}

    _check_ramp(_only_run(results, "s5", "herald"))

    big = _only_run(results, "s5big", "herald")
    _check_ramp(big)
    assert big["big"] == big["subs"] // 2
    probe = big["big_probe"]
    assert probe["incomplete"] == 0 and probe["members"] == big["big"]
    assert 0 < probe["fanout_us_per_recipient"]["p50"] <= probe["fanout_us_per_recipient"]["max"]

    s8 = _only_run(results, "s8", "herald")
    empty = s8["empty_channels"]
    assert empty["acked"] == empty["publications"] > 0 and empty["server_us_per_publication"] >= 0
    closed = s8["closed_loop"]
    assert closed["acked"] == closed["publications"] > 0 and closed["refused"] == 0
    assert closed["delivered"] == closed["expected"] == closed["publications"] * s8["room_size"]
    over = s8["over_capacity"]
    # The publisher offered twice the measured capacity: it must be slowed, never closed,
    # and every publication it was told was accepted must reach its room.
    assert over["offered_rate"] >= 1.9 * closed["round_trips_per_s"]
    assert over["publisher_closed"] is False and over["close_code"] == -1
    assert over["acked"] == over["offered"] and over["unanswered"] == 0
    assert over["acked_not_delivered"] == 0 and over["delivered"] == over["acked"] * s8["room_size"]

    storms = [(w, "herald") for w in ("s7_broadcast", "s7_connect", "s7_jwt")]
    storms += [(w, "herald_logs") for w in ("s7_broadcast", "s7_connect")]
    for workload, target in storms:
        storm = _only_run(results, workload, target)
        assert storm["established"] == storm["conns"] and storm["failed"] == storm["unfinished"] == 0
        assert storm["time_to_ready_ms"]["count"] == storm["conns"]
        assert storm["tokens"] == (storm["conns"] if workload == "s7_jwt" else 0)
        assert storm["connects_per_s"] > 0 and storm["kib_per_conn"] > 0

    summary = (tmp_path / "realistic.md").read_text()
    assert "S5 many channels" in summary and "S8 publish through the protocol" in summary
    assert "HS256 JWT per user" in summary


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="S6 needs redis-server")
def test_realistic_redis_smoke(tmp_path: Path) -> None:
    results = _run_realistic(tmp_path, "--workloads", "s6")
    assert set(results["results"]) == {"s1", "s5_redis"}
    for target in ("herald", "herald_redis", "herald_redis2"):
        run = _only_run(results, "s1", target)
        assert run["delivered"] == run["expected"] > 0 and run["lost"] == 0 and run["order_errors"] == 0
    for target in ("herald_redis", "herald_redis2"):
        _check_ramp(_only_run(results, "s5_redis", target))
    assert "Redis broker, 2 nodes" in (tmp_path / "realistic.md").read_text()


@pytest.mark.skipif(
    not (ROOT / "bench" / "baselines" / "socketio_node" / "node_modules" / "socket.io").exists()
    or shutil.which("node") is None,
    reason="the Socket.IO peer needs node and `npm install` in bench/baselines/socketio_node",
)
def test_realistic_socketio_framing_smoke(tmp_path: Path) -> None:
    # The load generator's Engine.IO/Socket.IO framing against the real Socket.IO server.
    results = _run_realistic(tmp_path, "--workloads", "s5,s8,s7", "--targets", "socketio_node")
    _check_ramp(_only_run(results, "s5", "socketio_node"))
    s8 = _only_run(results, "s8", "socketio_node")
    assert s8["closed_loop"]["lost"] == 0 and s8["over_capacity"]["acked_not_delivered"] == 0
    storm = _only_run(results, "s7_jwt", "socketio_node")
    assert storm["established"] == storm["conns"] and storm["tokens"] == storm["conns"]
