"""What ``write_delay`` buys and costs: a live feed to many subscribers.

``python -m bench.write_delay`` runs the C load generator's ``rate`` workload (the
subscribers of one channel on ``/connect``, one publisher at a fixed rate, every
delivery's latency measured) against fresh ``herald serve`` processes with
``HERALD_WRITE_DELAY`` set to each value of ``--delays``, alternating, ``--rounds``
times; it prints server CPU per delivery and latency per run.  Each subscriber gets
every publication, so at ``--rate`` R a connection receives R frames a second: the
case the delay is for (a dashboard, a game's state feed).  A connection that receives
a few frames a second gains little from it (docs/benchmarks.md, S5).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from . import run as base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.write_delay", description=__doc__.split("\n")[0])
    parser.add_argument("--subs", type=int, default=1000, help="subscribers of the channel")
    parser.add_argument("--rate", type=int, default=50, help="publications per second")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run")
    parser.add_argument("--delays", default="0,0.02,0.05", help="HERALD_WRITE_DELAY values, comma list")
    parser.add_argument("--rounds", type=int, default=2, help="alternated runs per value")
    args = parser.parse_args(argv)

    workload = base.Workload(
        "write_delay",
        f"{args.subs} subscribers, {args.rate} publications/s for {args.duration:g} s",
        "rate",
        {"subs": args.subs, "rate": args.rate, "duration": args.duration, "size": 100},
        "pubsub",
    )
    (herald,) = [target for target in base.targets(False) if target.name == "herald_channels"]
    print(
        f"# {workload.title}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}"
    )
    print("| write_delay (s) | delivered | server µs per delivery | p50 / p99 latency (ms) |")
    print("|---|---|---|---|")
    log = Path(tempfile.gettempdir()) / "herald-bench-write-delay.log"
    for _ in range(args.rounds):
        for delay in args.delays.split(","):
            target = dataclasses.replace(herald, env={**herald.env, "HERALD_WRITE_DELAY": delay.strip()})
            result = base.run_workload(target, workload, nice=False, log=log, timeout=args.duration + 60)
            latency = result.get("latency_ms") or {}
            print(
                f"| {delay.strip()} | {result.get('delivered')}/{result.get('expected')} "
                f"| {result.get('server_us_per_msg', 0.0):.2f} | {latency.get('p50')} / {latency.get('p99')} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
