"""docs/capacity.md from the JSON of a ``python -m bench.capacity`` run.

Every measured number in the document comes from the run's JSON; the only
constants here are Centrifugo's published workload and resources (cited in the
text) and the model's stated assumptions.
"""

from __future__ import annotations

import math
from typing import Any

# Centrifugo's published run ("Million connections with Centrifugo", centrifugal.dev,
# 2020-02-10; also centrifugal.github.io/centrifugo/misc/benchmark/).
CF_CONNECTIONS = 1_000_000
CF_SUBSCRIPTIONS = 2  # one personal channel, one group channel of 10 subscribers
CF_GROUP_SIZE = 10
CF_DELIVERIES = 500_000  # "28 million messages per minute (about 500k per second) delivered"
CF_CONNECTS_PER_MIN = 200_000  # "200k per minute constant connect/disconnect rate"
CF_PODS = 20
CF_POD_CPU = 2.0  # "40 CPU total for server nodes (20 pods, ~2 CPU each)"
CF_REDIS = 5
CF_REDIS_CPU = 0.32  # "0.32 CPU usage on every Redis instance"
CF_RAM_GB = 27  # "27 GB of RAM ... about 30kb RAM per connection"
CF_TX_MBIT = 150  # "100 mbit/sec rx and 150 mbit/sec tx of network used on each server pod"

# Model assumptions (stated in the document).
PING_INTERVAL = 25.0  # Herald's shipped ping_interval
PRESENCE_TTL = 60.0  # Herald's shipped presence_ttl: entries rewritten every ttl/3
UTILISATION = 0.7  # plan a core (node or Redis shard) to be at most this busy
POD_CORES = 8


def _f(value: float, digits: int = 2) -> str:
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _hop(results: dict[str, Any], key: str) -> float:
    """What one more node reached by a publication costs (µs), from the fan-out phase.

    For each shard count, the fan-out phase's cost per publication on n nodes minus
    on 1 node, over n - 1 (every node receives every publication there); the median
    of those, or 0 where the run has no multi-node pair or the difference is negative.
    """
    rows: list[dict[str, Any]] = results["setups"]
    values = []
    for row in rows:
        one = next((r for r in rows if r["shards"] == row["shards"] and r["nodes"] == 1), None)
        if one is not None and row["nodes"] > 1:
            values.append((row["fanout"][key] - one["fanout"][key]) / (row["nodes"] - 1))
    return max(0.0, _median(values)) if values else 0.0


def costs(results: dict[str, Any]) -> dict[str, float]:
    """The per-unit costs the model uses: each the median over the measured setups.

    The spread between setups is mostly the shared machine's noise; the median is
    steadier than any one setup.  Per delivery: the median over one-node setups,
    where the marginal cost has no share of the extra nodes' Pub/Sub receives (those
    are ``hop_server_us``).
    """
    rows: list[dict[str, Any]] = results["setups"]
    keys = rows[0]["figures"].keys()
    out = {k: _median([r["figures"][k] for r in rows]) for k in keys}
    single = [r["figures"]["server_us_per_delivery"] for r in rows if r["nodes"] == 1]
    if single:
        out["server_us_per_delivery"] = _median(single)
    out["hop_server_us"] = _hop(results, "server_us_per_publication")
    out["hop_redis_us"] = _hop(results, "redis_us_per_publication")
    return out


def model(results: dict[str, Any]) -> dict[str, Any]:
    """Cores, nodes, pods and Redis shards for Centrifugo's workload, from the run's costs."""
    f = costs(results)
    hop_server, hop_redis = f["hop_server_us"], f["hop_redis_us"]
    memory = results.get("memory")
    kib = memory["kib_per_conn"] if memory else f["kib_per_conn"]
    connects = CF_CONNECTS_PER_MIN / 60
    scenarios = []
    for name, group_share in (("all deliveries in group channels", 1.0),
                              ("half in group, half in personal channels", 0.5),
                              ("all deliveries in personal channels", 0.0)):  # fmt: skip
        group_pubs = CF_DELIVERIES * group_share / CF_GROUP_SIZE
        personal_pubs = CF_DELIVERIES * (1 - group_share)
        # A group's 10 subscribers sit on up to 10 nodes: each is one more Pub/Sub hop.
        hops = CF_GROUP_SIZE
        server_us = (
            CF_DELIVERIES * f["server_us_per_delivery"]
            + (group_pubs + personal_pubs) * f["server_us_per_publication"]
            + group_pubs * (hops - 1) * hop_server
            + connects * (f["server_us_per_connect"] + f["server_us_per_disconnect"])
            + CF_CONNECTIONS * f["server_us_per_ping"] / PING_INTERVAL
        )
        redis_us = (
            (group_pubs + personal_pubs) * f["redis_us_per_publication"]
            + group_pubs * (hops - 1) * hop_redis
            + connects * (f["redis_us_per_connect"] + f["redis_us_per_disconnect"])
        )
        presence_refreshes = CF_CONNECTIONS * CF_SUBSCRIPTIONS / (PRESENCE_TTL / 3)
        # Presence on: an add per subscribe and a remove per unsubscribe (taken to cost
        # as much as an add), and every entry rewritten every presence_ttl / 3.
        presence_us = (
            2 * connects * CF_SUBSCRIPTIONS * max(f["redis_us_per_presence_add"], 0.0)
            + presence_refreshes * f["redis_us_per_presence_refresh"]
        )
        presence_server_us = 2 * connects * CF_SUBSCRIPTIONS * max(
            f["server_us_per_presence_add"], 0.0
        ) + presence_refreshes * max(f["server_us_per_presence_refresh"], 0.0)
        server_cores = server_us / 1e6
        redis_cores = redis_us / 1e6
        nodes = math.ceil(server_cores / UTILISATION)
        scenarios.append(
            {
                "name": name,
                "publications_per_s": group_pubs + personal_pubs,
                "group_publications_per_s": group_pubs,
                "server_cores": server_cores,
                "nodes": nodes,
                "pods": math.ceil(nodes / POD_CORES),
                "redis_cores": redis_cores,
                "shards": max(1, math.ceil(redis_cores / UTILISATION)),
                "server_cores_presence": (server_us + presence_server_us) / 1e6,
                "nodes_presence": math.ceil((server_us + presence_server_us) / 1e6 / UTILISATION),
                "redis_cores_presence": (redis_us + presence_us) / 1e6,
                "shards_presence": max(1, math.ceil((redis_us + presence_us) / 1e6 / UTILISATION)),
                "server_cores_parts": {
                    "deliveries": CF_DELIVERIES * f["server_us_per_delivery"] / 1e6,
                    "publications": (group_pubs + personal_pubs) * f["server_us_per_publication"] / 1e6
                    + group_pubs * (hops - 1) * hop_server / 1e6,
                    "connects and disconnects": connects
                    * (f["server_us_per_connect"] + f["server_us_per_disconnect"])
                    / 1e6,
                    "held connections (pings)": CF_CONNECTIONS
                    * f["server_us_per_ping"]
                    / PING_INTERVAL
                    / 1e6,
                },
            }
        )
    return {
        "costs": f,
        "hop_server_us": hop_server,
        "hop_redis_us": hop_redis,
        "kib_per_conn": kib,
        "memory_gib": CF_CONNECTIONS * kib / 2**20,
        "connects_per_s": connects,
        "scenarios": scenarios,
    }


ROWS = [
    ("server_us_per_delivery", "server µs per delivered message (marginal, from the two fan-outs)"),
    ("server_us_per_delivery_at_fanout", "server µs per delivered message at the fan-out phase's fan-out, all costs"),
    ("server_us_per_publication", "server µs per publication through Redis (publish command, script, Pub/Sub hop, reply)"),
    ("server_us_per_connect", "server µs per connect (WebSocket + `connect` + 2 subscribes)"),
    ("server_us_per_disconnect", "server µs per disconnect (2 unsubscribes)"),
    ("server_us_per_conn_second", "server µs per connection held, per second (idle, subscribed, a ping every *p* s)"),
    ("server_us_per_ping", "server µs per connection per ping interval (all idle cost counted as ping cost)"),
    ("kib_per_conn", "server KiB per connection (connected, 2 subscriptions)"),
    ("redis_us_per_publication", "Redis µs per publication (history script + PUBLISH to one node)"),
    ("redis_us_per_publication_fanout", "Redis µs per publication reaching every node (fan-out phase)"),
    ("redis_us_per_connect", "Redis µs per connect (2 SUBSCRIBEs)"),
    ("redis_us_per_disconnect", "Redis µs per disconnect (2 UNSUBSCRIBEs)"),
    ("redis_us_per_presence_add", "Redis µs per presence add (subscribe with presence on, minus without)"),
    ("redis_us_per_presence_refresh", "Redis µs per presence entry refreshed"),
    ("server_us_per_presence_add", "server µs per presence add (subscribe with presence on, minus without)"),
    ("server_us_per_presence_refresh", "server µs per presence entry refreshed"),
]  # fmt: skip


def _cpu_model(lscpu: str) -> tuple[str, str]:
    model, cpus = "unknown", "?"
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() == "CPU(s)":
            cpus = value.strip()
    return model, cpus


def render(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    machine = results["machine"]
    cpu_model, cpus = _cpu_model(machine.get("lscpu", ""))
    setups = results["setups"]
    lines = [
        "# Capacity model, measured",
        "",
        "How many `herald serve` nodes and Redis shards Centrifugo's published million-connection",
        "workload would need, computed from per-unit costs measured on one machine by",
        "`python -m bench.capacity` (`bench/capacity.py`; this page is written by",
        "`python -m bench.capacity --report docs/capacity.md`, or `--from-json` from a saved run: no",
        "figure below is typed by hand).",
        "",
        *_summary(results),
        "## The run",
        "",
        f"- date: {results['date']}; machine: {cpu_model}, {cpus} CPU(s) (lscpu); "
        f"{machine.get('redis', '')}; Python and packages: {machine.get('versions', '')}",
        f"- load average at start / end: {machine.get('loadavg_start', '')} / {machine.get('loadavg_end', '')}",
        f"- scale {results['scale']:g}, wall time {results.get('wall_s', 0):.0f} s; Herald revision "
        f"{machine.get('revision', 'not recorded')}",
        "- other work on the machine shows in the load average above (1 or more at the start:",
        "  something else ran). CPU time per unit is far less sensitive to it than throughput",
        "  or latency (a process is charged only for the time it ran), but caches, frequency and",
        "  batching still move it by some per cent; take the figures as this machine's order of",
        "  magnitude, and compare runs only on the same machine (its CPU is named above).",
        "- method: every figure is the CPU time of the `herald serve` processes (all nodes",
        "  summed) or of the `redis-server` processes (all shards summed), read from",
        "  `/proc/PID/task/*/schedstat` around a phase, divided by the units of work in it.",
        "  Nodes and Redis are pinned to core 0, the C load generator to core 1 (`taskset`).",
        "  Loopback TCP: the kernel's receive work for a client's socket runs partly in the",
        "  sender's system call, so server µs per delivery include some of what a network card",
        "  and the client machine would do: the figures are on the pessimistic side.",
        f"- phases (see the module's docstring): *fan-out*: {sizes['fanout_subs']} connections in "
        f"{sizes['fanout_channels']} equal channels, {sizes['fanout_rate']:g} publications/s of "
        f"{sizes['payload_bytes']} B; *rooms*: {sizes['rooms_subs']} connections each in 2 channels of its own "
        f"(a personal channel), held idle {sizes['idle_s']:g} s with a ping every {sizes['ping_interval_s']:g} s, "
        f"then {sizes['rooms_rate']:g} publications/s; *presence*: the same with presence on "
        f"(presence_ttl {sizes['presence_ttl_s']:g} s). Steps of {sizes['step_s']:g} s; history on "
        f"({sizes['history_size']} publications kept per channel), join/leave off. The rooms phase's "
        f"steps send about {3 * sizes['rooms_rate'] * sizes['step_s'] / (2 * sizes['rooms_subs']):.1f} "
        "publications per channel, so most of them are the first into their channel and include "
        "creating its history stream, which may cost more than a publication to a channel that has one.",
        "",
        "## Per-unit costs",
        "",
    ]
    if setups:
        header = (
            "| figure | " + " | ".join(f"{r['nodes']} node(s), {r['shards']} shard(s)" for r in setups) + " |"
        )
        lines += [header, "|---|" + "---|" * len(setups)]
        for key, label in ROWS:
            cells = [_f(r["figures"][key]) for r in setups]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        base = setups[0]
        lines += [
            "",
            f"Ratios against {base['nodes']} node(s) on {base['shards']} shard(s), same run:",
            "",
            "| figure | " + " | ".join(f"{r['nodes']}n/{r['shards']}s" for r in setups) + " |",
            "|---|" + "---|" * len(setups),
        ]
        for key in ("server_us_per_delivery_at_fanout", "server_us_per_publication", "server_us_per_connect",
                    "redis_us_per_publication", "redis_us_per_publication_fanout", "redis_us_per_connect"):  # fmt: skip
            ref = base["figures"][key]
            cells = [f"{r['figures'][key] / ref:.2f}×" if ref > 0 else "n/a" for r in setups]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Measured quantities behind them (per setup): fan-out phase "
            + "; ".join(
                f"{r['nodes']}n/{r['shards']}s: fan-out {r['fanout']['fanout']:.1f}, "
                f"{r['fanout']['publications']:.0f} publications, lost {r['fanout']['lost']:.0f}, "
                f"Redis CPU share per shard {r.get('redis_cpu_share')}"
                for r in setups
            )
            + ". Rooms phase: "
            + "; ".join(
                f"{r['nodes']}n/{r['shards']}s: {r['rooms']['connections']} connects at "
                f"{r['rooms']['connects_per_s']:.0f}/s, fan-out {r['rooms']['fanout']:.2f}, "
                f"lost {r['rooms']['lost']:.0f}"
                for r in setups
            )
            + ".",
            "",
        ]
    for skip in results.get("skipped", []):
        lines.append(
            f"- **not measured: {skip['nodes']} node(s) on {skip['shards']} shard(s)**: {skip['reason'][:400]}"
        )
    if results.get("skipped"):
        lines.append("")
    memory = results.get("memory")
    lines += ["## Memory per connection", ""]
    if memory:
        lines += [
            f"One `herald serve` process on one Redis held **{memory['connections']:,}** idle connections "
            f"(each connected and subscribed to {memory['memberships'] / memory['connections']:.2f} channels "
            f"of its own on average), opened from {len(memory['source_addresses'])} loopback source addresses "
            f"({memory['source_addresses'][0]}…{memory['source_addresses'][-1]}, the load generator's `srcs=`) at "
            f"{memory['connects_per_s']:.0f} connects/s: RSS {memory['server_rss0_kib'] / 1024:.1f} → "
            f"{memory['server_rss_kib'] / 1024:.1f} MiB, **{memory['kib_per_conn']:.2f} KiB per connection**, "
            f"{memory['server_us_per_connect']:.0f} µs of server CPU per connect.",
            "",
        ]
        if memory.get("note"):
            rooms = [r["rooms"]["kib_per_conn"] for r in setups]
            lines += [
                f"Not 100,000: {memory['note']}. The harness holds 100,000 (with 5 or more source "
                "addresses) where `ulimit -Hn` allows it. The rooms phase measured "
                + (f"{min(rooms):.2f}–{max(rooms):.2f}" if rooms else "n/a")
                + f" KiB per connection at {results['sizes']['rooms_subs']:,} connections, against "
                f"{memory['kib_per_conn']:.2f} here"
                + (
                    ": per-connection memory does not grow with the count."
                    if rooms and memory["kib_per_conn"] <= 1.1 * max(rooms)
                    else "."
                ),
                "",
            ]
    elif results.get("memory_error"):
        lines += [f"The memory phase failed: {results['memory_error']}", ""]
    if setups:
        lines += _model_section(results)
    lines += [
        "## Re-running",
        "",
        "```sh",
        "python -m bench.capacity --report docs/capacity.md          # about 10 minutes",
        "python -m bench.capacity --scale 0.05 --nodes 1,2 --shards 1  # development",
        "python -m bench.capacity --from-json bench/results/capacity.json --report docs/capacity.md",
        "```",
        "",
        "On a machine of its own, with `ulimit -Hn` above 100,500 the memory phase holds 100,000",
        "connections in one process; `--history-size 0` measures with history off, as",
        "Centrifugo's headline run.",
        "",
    ]
    return "\n".join(lines)


def _summary(results: dict[str, Any]) -> list[str]:
    """Two sentences: what the model concludes and what dominates (from the JSON)."""
    if not results["setups"]:
        return []
    m = model(results)
    mid = m["scenarios"][1]
    parts = mid["server_cores_parts"]
    top = max(parts, key=lambda k: parts[k])
    return [
        f"**In short** (half of the deliveries from group-channel publications, half from personal ones): "
        f"Herald would need about **{mid['server_cores']:.0f} busy server cores** "
        f"({mid['server_cores'] / (CF_PODS * CF_POD_CPU):.1f}× Centrifugo's {CF_PODS * CF_POD_CPU:.0f} CPU) and "
        f"**{mid['redis_cores']:.0f} Redis cores** ({mid['redis_cores'] / (CF_REDIS * CF_REDIS_CPU):.0f}× Centrifugo's "
        f"{CF_REDIS * CF_REDIS_CPU:.1f}) for the same workload, on this machine's per-unit costs. The largest share "
        f"of the server cores is {top} ({parts[top]:.0f} of {mid['server_cores']:.0f}); memory "
        f"({m['memory_gib']:.1f} GiB for a million connections) is not what limits it.",
        "",
    ]


MODEL_KEYS = [
    ("server_us_per_delivery", "server µs per delivered message"),
    ("server_us_per_publication", "server µs per publication (one node reached)"),
    ("server_us_per_connect", "server µs per connect (2 subscribes)"),
    ("server_us_per_disconnect", "server µs per disconnect"),
    ("server_us_per_ping", "server µs per held connection and ping"),
    ("redis_us_per_publication", "Redis µs per publication (one node reached)"),
    ("redis_us_per_connect", "Redis µs per connect"),
    ("redis_us_per_disconnect", "Redis µs per disconnect"),
    ("redis_us_per_presence_add", "Redis µs per presence add"),
    ("redis_us_per_presence_refresh", "Redis µs per presence entry refreshed"),
    ("server_us_per_presence_add", "server µs per presence add"),
    ("server_us_per_presence_refresh", "server µs per presence entry refreshed"),
]


def _cost_rows(results: dict[str, Any], c: dict[str, float]) -> list[str]:
    rows = []
    for key, label in MODEL_KEYS:
        values = [r["figures"][key] for r in results["setups"]]
        rows.append(f"| {label} | {_f(c[key])} | {_f(min(values))} – {_f(max(values))} |")
    return rows


def _model_section(results: dict[str, Any]) -> list[str]:
    m = model(results)
    c = m["costs"]
    cf_cores = CF_PODS * CF_POD_CPU
    cf_redis = CF_REDIS * CF_REDIS_CPU
    lines = [
        "## Centrifugo's workload on Herald",
        "",
        'Centrifugo\'s published run ("Million connections with Centrifugo", centrifugal.dev blog,',
        "2020-02-10, the same text as centrifugal.github.io/centrifugo/misc/benchmark/; the",
        'figures below are quoted from it, not from the later "Scaling WebSocket in Go and',
        'beyond", centrifugal.dev, 2020-11-12, which discusses the techniques): 20',
        "Centrifuge-based server pods, Redis engine sharded over 5 Redis instances, and",
        "",
        f"- {CF_CONNECTIONS:,} WebSocket connections, each subscribed to {CF_SUBSCRIPTIONS} channels: one personal",
        f"  channel and one group channel with {CF_GROUP_SIZE} subscribers (about 1.1 million channels);",
        '- 28 million messages per minute ("about 500k per second") delivered;',
        f"- {CF_CONNECTS_PER_MIN:,} connects/disconnects per minute; p99 delivery latency 200 ms;",
        f"- resources: {cf_cores:.0f} CPU for the server pods ({CF_PODS} pods, ~{CF_POD_CPU:g} CPU each), "
        f"{CF_RAM_GB} GB of RAM (about 30 KB per connection), {CF_REDIS_CPU} CPU on each of the {CF_REDIS} Redis "
        f"instances ({cf_redis:.1f} CPU in all), {CF_TX_MBIT} Mbit/s sent per pod; history off (with history and "
        "recovery on, they report 64 % instead of 32 % CPU per Redis instance).",
        "",
        "Assumptions, where the post does not say:",
        "",
        '- **message size ~100 B** (the harness\'s payload). The post says "about 100kb", but its own',
        f"  {CF_TX_MBIT} Mbit/s per pod for ~{CF_DELIVERIES // CF_PODS:,} deliveries/s per pod is about "
        f"{CF_TX_MBIT * 1e6 / 8 / (CF_DELIVERIES / CF_PODS):.0f} B per delivery on the wire,",
        "  protocol and TCP included, so 100 KB messages cannot be what was sent; a larger",
        "  payload adds copy and send cost per delivery that this model does not include.",
        "- **fan-out per publication**: not published. Three mixes: every delivery from a",
        f"  group-channel publication (fan-out {CF_GROUP_SIZE}), half and half, and every delivery from a",
        "  personal-channel publication (fan-out 1). A group's subscribers are taken to sit on",
        f"  {CF_GROUP_SIZE} different nodes: each is one more Pub/Sub hop, costed below.",
        f"- **idle heartbeat**: a ping every {PING_INTERVAL:g} s (Herald's shipped `ping_interval`); all idle",
        "  CPU of a held connection is charged to its pings (an upper bound).",
        f"- **connect/disconnect**: {m['connects_per_s']:,.0f} connects/s, each with 2 subscribes to channels new",
        "  to the node (a Redis SUBSCRIBE each), and as many disconnects.",
        "- **publications enter as client `publish` commands** over WebSocket (what the harness",
        "  sends); the HTTP API's publish was not measured here.",
        f"- **history on** (as measured: {results['sizes']['history_size']} publications kept per channel); "
        "presence off, as the post",
        "  does not mention it (the Redis column *with presence* adds a presence entry per",
        f"  subscription, refreshed every {PRESENCE_TTL / 3:g} s, Herald's shipped `presence_ttl` / 3).",
        "- **one core per node**: `herald serve` is one process with one event loop; a node is",
        f"  planned at {UTILISATION:.0%} busy, and so is a Redis shard (one core, single-threaded); an "
        f"{POD_CORES}-core pod runs {POD_CORES} nodes.",
        "",
        "The costs the model uses are the **medians over the measured setups** (the spread",
        "between setups in the table above is mostly this shared machine's noise); per",
        "delivery, the median over one-node setups; per extra node a publication reaches, the",
        "fan-out phase's cost per publication on *n* nodes minus on one node, over *n* − 1",
        "(median over the pairs; 0 if negative); memory per connection from the memory phase:",
        "",
        "| cost used | µs (KiB) | range over the setups |",
        "|---|---|---|",
        *_cost_rows(results, c),
        f"| server µs per extra node a publication reaches (its Pub/Sub receive and the once-per-publication "
        f"part of its fan-out) | {_f(c['hop_server_us'])} | |",
        f"| Redis µs per extra node a publication reaches (one more Pub/Sub write) | {_f(c['hop_redis_us'])} | |",
        "",
        "Every Redis script call also runs `INFO server` (the run-id check that detects a",
        "restarted Redis), and a publication's script writes the history stream and its",
        "metadata; `INFO commandstats` on a shard shows where Redis's time goes.",
        "",
        "| mix | publications/s | server cores | nodes (1 core, 70 % busy) | 8-core pods | Redis cores | Redis shards (70 % busy) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in m["scenarios"]:
        lines.append(
            f"| {s['name']} | {s['publications_per_s']:,.0f} | {s['server_cores']:.1f} | {s['nodes']} | {s['pods']} "
            f"| {s['redis_cores']:.2f} | {s['shards']} |"
        )
    lines += [
        "",
        "With presence on for both channels of every connection (2 million entries, each rewritten every "
        f"{PRESENCE_TTL / 3:g} s, plus an add and a remove per subscription):",
        "",
        "| mix | server cores | nodes | Redis cores | Redis shards |",
        "|---|---|---|---|---|",
    ]
    for s in m["scenarios"]:
        lines.append(
            f"| {s['name']} | {s['server_cores_presence']:.1f} | {s['nodes_presence']} "
            f"| {s['redis_cores_presence']:.2f} | {s['shards_presence']} |"
        )
    mid = m["scenarios"][1]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in mid["server_cores_parts"].items())
    lines += [
        "",
        f"Where the server cores go (half-and-half mix): {parts} cores.",
        f"Memory: {m['kib_per_conn']:.2f} KiB per connection × {CF_CONNECTIONS:,} = {m['memory_gib']:.1f} GiB "
        f"in all, {m['memory_gib'] / max(mid['nodes'], 1):.2f} GiB per node at {mid['nodes']} nodes "
        f"(Centrifugo: {CF_RAM_GB} GB).",
        "",
        "### Against Centrifugo's 20 pods and 5 Redis instances",
        "",
        f"- server CPU: Herald needs **{mid['server_cores']:.1f} cores** busy for the half-and-half mix "
        f"({m['scenarios'][0]['server_cores']:.1f} to {m['scenarios'][2]['server_cores']:.1f} over the three mixes) "
        f"against Centrifugo's {cf_cores:.0f} CPU: **{mid['server_cores'] / cf_cores:.2f}×**; planned at "
        f"{UTILISATION:.0%}, {mid['nodes']} one-core nodes, i.e. **{mid['pods']} pods of {POD_CORES} cores** "
        f"against 20 pods of ~2 CPU.",
        f"- Redis: **{mid['redis_cores']:.2f} cores** ({mid['shards']} shard(s) at {UTILISATION:.0%}) against "
        f"Centrifugo's {cf_redis:.1f} CPU over 5 instances: **{mid['redis_cores'] / cf_redis:.2f}×** "
        f"(all-personal mix: {m['scenarios'][2]['redis_cores']:.2f} cores, {m['scenarios'][2]['shards']} shards); "
        f"Herald keeps history, Centrifugo's headline run did not (theirs doubled with it).",
        f"- all in, per delivered message: Herald {mid['server_cores'] * 1e6 / CF_DELIVERIES:.0f} µs of server CPU "
        f"(half-and-half mix) against Centrifugo's {cf_cores * 1e6 / CF_DELIVERIES:.0f} µs; Redis "
        f"{mid['redis_cores'] * 1e6 / mid['publications_per_s']:.0f} µs per publication against Centrifugo's "
        f"{cf_redis * 1e6 / m['scenarios'][0]['publications_per_s']:.1f} (if every publication went to a group) "
        f"to {cf_redis * 1e6 / m['scenarios'][2]['publications_per_s']:.1f} µs (if all went to personal channels).",
        f"- memory: {m['memory_gib']:.1f} GiB against {CF_RAM_GB} GB "
        f"({m['kib_per_conn']:.1f} against ~30 KB per connection; their WebSocket read and write buffers "
        "were 512 B each).",
        "- caveats: their CPUs were Xeon E5-2640 v4 at 2.4 GHz (2016); this run's per-unit costs are",
        "  from a different, shared machine and loopback TCP; Centrifugo's 40 CPU were what its",
        "  pods used at that load, not a sizing with headroom, so compare server cores with",
        "  server cores, and nodes at 70 % with pods only loosely.",
        "",
    ]
    return lines
