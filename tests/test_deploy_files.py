"""deploy/: the Grafana dashboard and the Prometheus alert rules query metrics that exist.

A real ``herald serve`` gets some traffic (clients connect, subscribe, publish and
resume; a handshake is refused; a command is refused) and its ``/metrics`` is scraped.
Every PromQL expression in the dashboard and in the rules is then taken apart and
every metric it names must be in that exposition: renaming a metric fails here, not
on an operator's empty panel or silent alert.  The files' structure (what Grafana's
import and Prometheus's rule loader need) is checked too, and, where ``promtool`` is
installed (Debian: ``apt-get install prometheus``), so is every expression's syntax.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets
import yaml
from prometheus_client.parser import text_string_to_metric_families

from .helpers import ROOT, ProtocolClient, ServerProcess, http_get, wait_for

DASHBOARD = ROOT / "deploy" / "grafana" / "herald-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "herald-alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "herald-alerts.test.yml"
API_KEY = "deploy-files-key"

#: Metrics the files may name that Herald does not export: Prometheus makes ``up`` for
#: every target, the blackbox exporter ``probe_success`` (the /readyz rule).
NOT_HERALDS = frozenset({"up", "probe_success"})
#: Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})
SEVERITIES = frozenset({"critical", "warning", "info"})

# ---------------------------------------------------------------- PromQL, taken apart

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<variable>\$\{?\w+\}?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<matcher>=~|!~|!=|==|<=|>=|=)
  | (?P<punct>[(){},<>*/+\-^%@])
  | (?P<space>\s+)
    """,
    re.VERBOSE,
)
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})
_LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
#: Aggregations may put ``by (...)`` between their name and their ``(``.
_AGGREGATIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    }
)


@dataclass
class Selector:
    """One vector selector: ``metric{label="value", ...}``."""

    metric: str
    matchers: dict[str, str] = field(default_factory=dict)


@dataclass
class Query:
    """What a PromQL expression names: its selectors and the labels it groups or matches on."""

    expr: str
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)

    @property
    def metrics(self) -> set[str]:
        return {selector.metric for selector in self.selectors}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[position:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
        position = match.end()
    return tokens


def parse_promql(expr: str) -> Query:
    """The metric names, label matchers and grouping labels of ``expr``.

    Enough PromQL for dashboards and rules: an identifier followed by ``(`` is a
    function, ``_AGGREGATIONS`` are aggregations, one after ``by``/``on``/... is a label list, the words of
    ``_KEYWORDS`` are operators; every other identifier outside braces is a metric.
    """
    query = Query(expr)
    tokens = _tokens(expr)
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in _LABEL_LIST_KEYWORDS:
            index += 1
            if following[1] == "(":
                index += 1
                while tokens[index][1] != ")":
                    if tokens[index][0] == "ident":
                        query.grouping.add(tokens[index][1])
                    index += 1
            continue
        if kind == "ident" and (following[1] == "(" or text in _AGGREGATIONS):
            index += 1  # a function or an aggregation
            continue
        if kind == "ident" and text.lower() not in _KEYWORDS:
            selector = Selector(text)
            index += 1
            if index < len(tokens) and tokens[index][1] == "{":
                index += 1
                while tokens[index][1] != "}":
                    name_kind, name = tokens[index]
                    if name_kind == "ident":
                        assert tokens[index + 1][0] == "matcher", expr
                        value = tokens[index + 2][1]
                        selector.matchers[name] = value[1:-1]
                        index += 3
                    else:
                        index += 1  # a comma
                index += 1
            query.selectors.append(selector)
            continue
        if text == "{":
            raise ValueError(f"a selector without a metric name in {expr!r}")
        index += 1
    return query


def test_the_promql_reader_finds_metrics_matchers_and_grouping() -> None:
    """The checks below are only as good as this reader."""
    query = parse_promql(
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job=~"$job", x!="1,}"}[$__rate_interval])))'
        " > 0.5 * on (instance) group_left (zone) b_total offset 10m and c or absent(d{e='f'})"
    )
    assert query.metrics == {"a_bucket", "b_total", "c", "d"}
    assert query.selectors[0].matchers == {"job": "$job", "x": "1,}"}
    assert query.selectors[-1].matchers == {"e": "f"}
    assert query.grouping == {"job", "le", "instance", "zone"}
    assert parse_promql("sum(rate(x_total[5m])) / sum(rate(y_total[5m])) > bool 1e3").metrics == {
        "x_total",
        "y_total",
    }
    with pytest.raises(ValueError):
        parse_promql('{__name__="x"}')


# ---------------------------------------------------------------- what the server exports


@dataclass
class Exposition:
    """The series names one scrape offers, and the label names seen on each."""

    #: sample name (``x_total``, ``x_bucket``...) -> label names of its samples; None when
    #: the family is declared but has no sample yet (a labelled counter never incremented).
    names: dict[str, set[str] | None]
    #: ``herald_event_loop_lag_seconds_count`` and such, for the tests that need a value.
    values: dict[str, float]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        names: dict[str, set[str] | None] = {}
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            declared = {
                "counter": [family.name + "_total"],
                "histogram": [family.name + suffix for suffix in ("_bucket", "_count", "_sum")],
                "summary": [family.name + suffix for suffix in ("", "_count", "_sum")],
            }.get(family.type, [family.name])
            for name in declared:
                names.setdefault(name, None)
            for sample in family.samples:
                seen = names.get(sample.name) or set()
                names[sample.name] = seen | set(sample.labels) - {"le", "quantile"}
                if not sample.labels:
                    values[sample.name] = sample.value
        return cls(names, values)


def missing_metrics(queries: list[Query], exposition: Exposition) -> list[str]:
    """``expr: metric`` for every metric a query names that the exposition lacks."""
    return [
        f"{query.expr}: {metric}"
        for query in queries
        for metric in sorted(query.metrics)
        if metric not in exposition.names and metric not in NOT_HERALDS
    ]


def unknown_labels(queries: list[Query], exposition: Exposition) -> list[str]:
    """Matchers and grouping labels no series of the query's metrics carries (checked
    where the scrape has samples of every metric involved)."""
    problems = []
    for query in queries:
        known = {metric: exposition.names.get(metric) for metric in query.metrics - NOT_HERALDS}
        for selector in query.selectors:
            labels = known.get(selector.metric)
            if labels is None:
                continue
            for label in set(selector.matchers) - TARGET_LABELS - labels:
                problems.append(f"{query.expr}: {selector.metric} has no label {label!r}")
        if any(labels is None for labels in known.values()):
            continue
        carried = set().union(*(labels for labels in known.values() if labels is not None))
        if any(metric.endswith("_bucket") for metric in known):
            carried.add("le")
        for label in query.grouping - TARGET_LABELS - carried:
            problems.append(f"{query.expr}: no series carries {label!r}")
    return problems


# ---------------------------------------------------------------- the files


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return panels


def dashboard_queries() -> list[Query]:
    exprs = [t["expr"] for panel in dashboard_panels() for t in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            definition = variable["definition"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
            assert match, f"variable {variable['name']}: expected label_values(selector, label)"
            exprs.append(match.group(1))
    return [parse_promql(expr) for expr in exprs]


def rule_queries() -> list[Query]:
    return [parse_promql(rule["expr"]) for rule in alert_rules()]


# ---------------------------------------------------------------- a server with traffic


async def _traffic(server: ServerProcess) -> None:
    """Connect, subscribe, publish, resume, and be refused, on the routes Herald serves."""
    alice = await ProtocolClient.open(server.ws("/connect"))
    bob = await ProtocolClient.open(server.ws("/connect"))
    for client in (alice, bob):
        reply = await client.call("subscribe", channels=[{"channel": "chat:deploy"}])
        assert "error" not in reply["result"]["channels"][0], reply
    first = await alice.call("publish", channel="chat:deploy", data={"n": 1})
    await bob.publications(1)
    # Resuming from a position: a recovery (recovered=true) in herald_recoveries_total.
    since = {"offset": first["result"]["offset"], "epoch": first["result"]["epoch"]}
    reply = await bob.call("subscribe", channels=[{"channel": "chat:deploy2", "since": since}])
    assert "recovered" in reply["result"]["channels"][0], reply
    # A command refused (unknown namespace): herald_commands_rejected_total.
    reply = await alice.call("subscribe", channels=[{"channel": "nowhere:x"}])
    assert "error" in reply["result"]["channels"][0], reply
    # A refused handshake: herald_handshakes_rejected_total{reason="origin"}.
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(server.ws("/connect"), origin="http://evil.example")
    # The tutorial's route.
    async with websockets.connect(server.ws("/ws")) as tutorial:
        await tutorial.send("hello")
        await asyncio.wait_for(tutorial.recv(), 5)
    await alice.close()
    await bob.close()


@pytest.fixture(scope="module")
def exposition() -> Iterator[Exposition]:
    server = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_DEMOS": "false",
            # A proxy hook, so the proxy's series exist (at 0, with their labels) for the
            # label checks; never called: the traffic sends no rpc.
            "HERALD_PROXY_RPC_URL": "http://127.0.0.1:9/rpc",
        }
    ).start()
    try:
        asyncio.run(_traffic(server))

        def scraped() -> Exposition | None:
            status, body = http_get(server.http + "/metrics")
            assert status == 200, body
            result = Exposition.parse(body.decode())
            # Closed connections are counted once their cleanup ran; loop lag twice a second.
            ready = result.names.get("herald_disconnects_total") and result.values.get(
                "herald_event_loop_lag_seconds_count", 0
            )
            return result if ready else None

        yield wait_for(scraped, 10, interval=0.1, what="disconnects and a loop-lag measurement")
    finally:
        server.stop()


# ---------------------------------------------------------------- the tests


def test_every_dashboard_query_names_an_exported_metric(exposition: Exposition) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 20
    assert missing_metrics(queries, exposition) == []
    assert unknown_labels(queries, exposition) == []


def test_every_alert_rule_names_an_exported_metric(exposition: Exposition) -> None:
    queries = rule_queries()
    assert missing_metrics(queries, exposition) == []
    assert unknown_labels(queries, exposition) == []


def test_a_renamed_metric_is_caught(exposition: Exposition) -> None:
    """The check itself: a query on a name the server does not export is reported, and
    so is a label its series do not carry."""
    renamed = parse_promql('sum(rate(herald_connections_opened_total{job=~"$job"}[5m]))')
    assert missing_metrics([renamed], exposition) == [f"{renamed.expr}: herald_connections_opened_total"]
    suffix = parse_promql("herald_connections_open_total")
    assert missing_metrics([suffix], exposition) != []
    relabelled = parse_promql('sum by (cause) (rate(herald_handshakes_rejected_total{why="x"}[5m]))')
    assert len(unknown_labels([relabelled], exposition)) == 2


def test_the_files_cover_what_an_operator_needs() -> None:
    """The alerts the issue asks for, and the dashboard's view of the same metrics."""
    alerts = set().union(*(query.metrics for query in rule_queries()))
    for metric in (
        "herald_slow_consumer_disconnects_total",
        "herald_broker_errors_total",
        "herald_event_loop_lag_seconds_bucket",
        "up",
        "probe_success",
        "herald_handshakes_rejected_total",
        "herald_stream_gaps_total",
        "herald_proxy_calls_total",
    ):
        assert metric in alerts, f"no alert on {metric}"
    shown = set().union(*(query.metrics for query in dashboard_queries()))
    for metric in (
        "herald_connections_open",
        "herald_slow_consumer_disconnects_total",
        "herald_broker_errors_total",
        "herald_event_loop_lag_seconds_bucket",
        "herald_handshakes_rejected_total",
        "herald_broker_publish_seconds_bucket",
        "herald_proxy_calls_total",
        "herald_proxy_call_duration_seconds_bucket",
        "herald_proxy_in_flight",
    ):
        assert metric in shown, f"no panel shows {metric}"


def test_broker_event_names_in_the_files_are_events_a_broker_counts() -> None:
    """``herald_broker_events_total{event=...}`` has no series until the event happens,
    so the names are checked against the brokers' own counters."""
    from herald.brokers.memory import MemoryBroker
    from herald.brokers.nats import NatsBroker, NatsBrokerConfig
    from herald.brokers.redis import RedisBroker, RedisBrokerConfig
    from herald.brokers.sharded import ShardedRedisBroker, ShardedRedisConfig

    events = set(MemoryBroker().counters())
    events |= set(RedisBroker(RedisBrokerConfig()).counters()) | set(
        NatsBroker(NatsBrokerConfig()).counters()
    )
    events |= set(ShardedRedisBroker(ShardedRedisConfig.from_url("redis://a,redis://b")).counters())
    named = {
        selector.matchers["event"]
        for query in rule_queries() + dashboard_queries()
        for selector in query.selectors
        if selector.metric == "herald_broker_events_total" and "event" in selector.matchers
    }
    assert named, "the rules watch no broker event"
    assert named <= events


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    source = variables["datasource"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    # Importable into any Grafana: no datasource bound by uid, every query uses the variable.
    uses_variable = {"type": "prometheus", "uid": "${datasource}"}
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == uses_variable, variable["name"]
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == uses_variable, panel["title"]
        targets = panel["targets"]
        assert targets, f"panel {panel['title']!r} has no query"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == uses_variable, panel["title"]
            assert target["expr"].strip(), panel["title"]
            # Every Herald query follows the job and instance pickers.
            for selector in parse_promql(target["expr"]).selectors:
                assert selector.matchers.get("job") == "$job", target["expr"]
                assert selector.matchers.get("instance") == "$instance", target["expr"]


def test_alert_rules_structure() -> None:
    document = yaml.safe_load(ALERTS.read_text())
    assert set(document) == {"groups"}
    group_names = [group["name"] for group in document["groups"]]
    assert len(group_names) == len(set(group_names))
    rules = alert_rules()
    assert len(rules) >= 8
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"Herald[A-Za-z]+", rule["alert"])
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_accepts_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The dashboard's queries as recording rules, Grafana's variables given values.
    substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    records = []
    for number, query in enumerate(dashboard_queries()):
        expr = query.expr
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        records.append({"record": f"herald:dashboard_query_{number}", "expr": expr})
    rules = tmp_path / "dashboard-queries.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_has_a_promtool_unit_test_that_fires_it() -> None:
    """herald-alerts.test.yml (run by promtool below) makes each alert fire on series
    shaped like a real node's, and shows a healthy node raises none."""
    document = yaml.safe_load(ALERT_TESTS.read_text())
    assert document["rule_files"] == [ALERTS.name]
    cases = [case for test in document["tests"] for case in test["alert_rule_test"]]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names
    assert len(quiet) >= len(names) - 2  # the healthy node: all but the node-down ones


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    ran = subprocess.run(
        ["promtool", "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr


def test_docs_list_every_alert_and_the_files() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    section = operations.split("## Dashboards and alerts", 1)[1].split("\n## ", 1)[0]
    for rule in alert_rules():
        assert f"| `{rule['alert']}` | {rule['labels']['severity']} |" in section, rule["alert"]
    for path in (DASHBOARD, ALERTS, ALERT_TESTS):
        assert str(path.relative_to(ROOT)) in section
