"""The multi-node benchmark runs end to end (tiny sizes), so that it cannot rot.

No timing is asserted: only that every setup ran, delivered every publication to
every subscriber exactly once, measured latency, and wrote its report.
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
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


def test_multinode_bench_smoke(tmp_path: Path) -> None:
    out, raw = tmp_path / "report.md", tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.multinode", "--subscribers", "12", "--publications", "8",
         "--rate", "20", "--duration", "0.3", "--nodes", "2", "--repeat", "1",
         "--out", str(out), "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(raw.read_text())
    assert [r["setup"] for r in report["results"]] == ["memory-1", "redis-1", "redis-2"]
    for result in report["results"]:
        assert result["fanout"]["delivered"] == result["fanout"]["expected"] == 12 * 8
        assert result["fanout"]["exactly_once"] is True
        assert result["latency"]["deliveries"] == 12 * 6
        assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]
    text = out.read_text()
    assert "| memory-1 | 1 |" in text and "| redis-2 | 2 |" in text and "1.00x" in text
    assert "Linux" in text  # the machine is recorded
