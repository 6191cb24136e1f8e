"""Render a results JSON (bench/run.py) as docs/benchmarks.md's results section and a latency plot.

``python -m bench.report RESULTS.json`` rewrites the part of docs/benchmarks.md
between the ``<!-- results -->`` markers (the prose around it is kept) and
docs/benchmarks-latency.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- results:start -->", "<!-- results:end -->"
BASELINE = "tutorial"
PLOT_NAME = "benchmarks-latency.png"


def _median(results: dict[str, Any], target: str, workload: str) -> dict[str, Any] | None:
    entry = results["results"].get(target, {}).get(workload)
    return entry.get("median") if entry else None


def _cell(results: dict[str, Any], target: str, workload: str) -> str:
    r = _median(results, target, workload)
    if r is None:
        entry = results["results"].get(target, {}).get(workload)
        return "failed" if entry else "—"
    base = _median(results, BASELINE, workload)
    lost = f", **lost {r['lost']}**" if r.get("lost") else ""
    order = f", **{r['order_errors']} out of order**" if r.get("order_errors") else ""
    if workload == "S1":
        ratio = f" ({r['msgs_per_s'] / base['msgs_per_s']:.2f}×)" if base else ""
        return f"{r['msgs_per_s'] / 1000:.0f}k{ratio}{lost}{order}"
    if workload == "S3":
        ratio = f" ({r['round_trips_per_s'] / base['round_trips_per_s']:.2f}×)" if base else ""
        return f"{r['round_trips_per_s'] / 1000:.1f}k{ratio}{lost}"
    if workload in ("S2", "slow_clean", "slow"):
        lat = r["latency_ms"]
        text = f"{lat['p50']:.1f} / {lat['p99']:.1f}"
        if workload == "slow":
            clean = _median(results, target, "slow_clean")
            if clean:
                text += f" ({lat['p99'] / max(clean['latency_ms']['p99'], 1e-9):.2f}× clean p99)"
            code = r.get("slow_close_code")
            text += f"; stuck peer {'closed ' + str(code) if r.get('slow_closed') else 'not closed'}"
            text += f"; RSS +{r['server_rss_growth_kib'] / 1024:.1f} MiB"
        return text + lost + order
    if workload in ("S4", "idle10k"):
        ratio = f" ({r['kib_per_conn'] / base['kib_per_conn']:.2f}×)" if base else ""
        text = f"{r['kib_per_conn']:.1f}{ratio}"
        if workload == "idle10k":
            text += f", {r['connects_per_s']:.0f} conn/s"
        if r.get("failed"):
            text += f", **{r['failed']} failed**"
        return text
    return "?"


ROWS = [
    ("S1", "S1 fan-out: delivered msgs/s (× tutorial)"),
    ("S2", "S2 steady 50 msgs/s: p50 / p99 latency (ms)"),
    ("S3", "S3 echo: round trips/s (× tutorial)"),
    ("S4", "S4 idle connections: KiB per connection (× tutorial)"),
    ("slow_clean", "slow-consumer workload, clean: p50 / p99 (ms)"),
    ("slow", "same, 1 subscriber stuck: p50 / p99 (ms)"),
    ("idle10k", "10k idle: KiB per connection, connect rate"),
]


def render_tables(results: dict[str, Any], plot: str | None) -> str:
    targets = [t for t, info in results["targets"].items() if not info.get("skip")]
    skipped = {t: info["skip"] for t, info in results["targets"].items() if info.get("skip")}
    labels = {t: info["label"] for t, info in results["targets"].items()}
    lines = [
        f"Run on {results['date']}; {results['repeat']} fresh server(s) per figure, median shown"
        f"{'; scale ' + str(results['scale']) if results['scale'] != 1 else ''}"
        f"{'; under nice -n 19' if results.get('nice') else ''}.",
        "",
        "| workload | " + " | ".join(labels[t] for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for key, title in ROWS:
        if key not in results["workloads"]:
            continue
        lines.append(f"| {title} | " + " | ".join(_cell(results, t, key) for t in targets) + " |")
    lines.append("")
    for target, reason in skipped.items():
        lines.append(f"- {labels[target]} skipped: {reason}.")
    # Cost accounting: server CPU per message, load generator CPU.
    lines += [
        "",
        "Server CPU per delivered message (S1) and load generator CPU share while publishing:",
        "",
        "| target | server µs/msg (S1) | loadgen CPU S1 | loadgen CPU S2 | loadgen CPU S3 |",
        "|---|---|---|---|---|",
    ]
    for target in targets:
        s1 = _median(results, target, "S1") or {}
        s2 = _median(results, target, "S2") or {}
        s3 = _median(results, target, "S3") or {}

        def pct(r: dict[str, Any]) -> str:
            return f"{r['loadgen_cpu_pct']:.0f}%" if "loadgen_cpu_pct" in r else "—"

        us = f"{s1['server_us_per_msg']:.2f}" if "server_us_per_msg" in s1 else "—"
        lines.append(f"| {labels[target]} | {us} | {pct(s1)} | {pct(s2)} | {pct(s3)} |")
    errors = [
        f"- {labels[t]} {w}: {'; '.join(e['errors'])[:300]}"
        for t, per in results["results"].items()
        for w, e in per.items()
        if e.get("errors")
    ]
    if errors:
        lines += ["", "Failed runs:", "", *errors]
    if plot:
        lines += ["", f"![S2 latency percentiles]({plot})"]
    machine = results["machine"]
    lines += [
        "",
        "<details><summary>Machine</summary>",
        "",
        "```",
        machine.get("uname", ""),
        "",
        machine.get("lscpu", ""),
        "",
        f"load average at start: {machine.get('loadavg', '')}",
        f"versions: {machine.get('versions', '')}",
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


def draw_plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is missing (pip install -e '.[bench]'); no plot", file=sys.stderr)
        return False
    keys = ["p50", "p75", "p90", "p95", "p99", "p999"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    drew = False
    for ax, workload, title in (
        (axes[0], "S2", "S2: 1000 subscribers, 50 msgs/s"),
        (axes[1], "slow", "1 of 1000 subscribers stuck, 100 msgs/s of 1 KiB"),
    ):
        for target, info in results["targets"].items():
            r = _median(results, target, workload)
            if r is None:
                continue
            lat = r["latency_ms"]
            ax.plot(keys, [lat[k] for k in keys], marker="o", label=info["label"])
            drew = True
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    if not drew:
        plt.close(fig)
        return False
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Herald benchmarks, {results['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: dict[str, Any], docs: Path) -> None:
    docs.mkdir(exist_ok=True)
    plot = PLOT_NAME if draw_plot(results, docs / PLOT_NAME) else None
    section = f"{START}\n{render_tables(results, plot)}\n{END}"
    target = docs / "benchmarks.md"
    if target.exists() and START in target.read_text():
        text = target.read_text()
        before, rest = text.split(START, 1)
        after = rest.split(END, 1)[1] if END in rest else ""
        target.write_text(before + section + after)
    else:
        target.write_text("# Benchmarks\n\n" + section + "\n")
    print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "latest.json"
    docs = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent.parent / "docs"
    write_report(json.loads(source.read_text()), docs)
