"""The exported JSON Schema and .d.ts: up to date, valid, and exactly as strict as the decoder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from herald.asyncapi import EXAMPLES, protocol_json_schema, typescript_definitions
from herald.brokers.base import Publication
from herald.exceptions import ProtocolError
from herald.protocol import encoders
from herald.protocol import messages as m
from herald.protocol.codec import decode_command
from herald.protocol.values import ClientInfo, PresenceStats, StreamPosition

from . import wire_schema

ROOT = Path(__file__).resolve().parent.parent


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("export_schema", ROOT / "scripts" / "export_schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_schema = _load_script()


def test_checked_in_schema_and_dts_match_the_models() -> None:
    for path, expected in export_schema.render().items():
        relative = path.relative_to(ROOT)
        assert path.exists(), f"{relative} is missing: run scripts/export_schema.py"
        assert path.read_text(encoding="utf-8") == expected, (
            f"{relative} is out of date with herald.protocol.messages: run scripts/export_schema.py"
        )


def test_check_mode_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real files: the CLI says they are current.
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "export_schema.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # A stale copy (a field the models no longer have): --check names it and fails.
    stale = tmp_path / "protocol.schema.json"
    stale.write_text('{"stale": true}\n')
    monkeypatch.setattr(export_schema, "SCHEMA_PATH", stale)
    monkeypatch.setattr(export_schema, "DTS_PATH", tmp_path / "missing.d.ts")
    assert export_schema.main(["--check"]) == 1
    assert export_schema.stale_files() == [stale, tmp_path / "missing.d.ts"]
    # Writing fixes it.
    assert export_schema.main([]) == 0
    assert export_schema.main(["--check"]) == 0


def test_schema_is_valid_draft_2020_12_with_the_frame_unions() -> None:
    schema = protocol_json_schema()
    Draft202012Validator.check_schema(schema)
    defs = schema["$defs"]
    for name in ("ClientFrame", "Reply", "Push", "ServerFrame"):
        assert name in defs
    for model in [*export_models()]:
        assert model.__name__ in defs, model


def export_models() -> list[type[Any]]:
    from herald.asyncapi import COMMAND_MODELS, PUSH_MODELS, REPLY_MODELS

    return [*COMMAND_MODELS, *REPLY_MODELS, *PUSH_MODELS]


def test_every_command_type_is_in_the_client_union() -> None:
    union = protocol_json_schema()["$defs"]["ClientFrame"]
    refs = {option["$ref"].rsplit("/", 1)[-1] for option in union["oneOf"]}
    kinds = {protocol_json_schema()["$defs"][name]["properties"]["type"]["const"] for name in refs}
    assert kinds == set(m.COMMAND_TYPES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_match_the_schema(name: str) -> None:
    definition = "ClientFrame" if name.endswith(("Request", "Command")) else "ServerFrame"
    assert wire_schema.problem(definition, EXAMPLES[name]) is None
    # ...and the models agree with the examples.
    if definition == "ClientFrame":
        decode_command(json.dumps(EXAMPLES[name]))


def test_server_frames_must_carry_type_and_exactly_one_of_result_or_error() -> None:
    ok = {"id": 1, "type": "ping", "result": {}}
    assert wire_schema.problem("ServerFrame", ok) is None
    assert wire_schema.problem("ServerFrame", {"id": 1, "result": {}}) is not None
    assert wire_schema.problem("ServerFrame", {"id": 1, "type": "ping"}) is not None
    both = {"id": 1, "type": "ping", "result": {}, "error": {"code": 100, "message": "x"}}
    assert wire_schema.problem("ServerFrame", both) is not None
    assert wire_schema.problem("ServerFrame", {"type": "publication", "channel": "a"}) is not None
    assert wire_schema.problem("ServerFrame", {"type": "ping", "extra": 1}) is not None


def test_model_dumps_are_server_frames() -> None:
    frames = [
        m.PublicationPush(channel="a", offset=1, epoch="e", data=[1]),
        m.JoinPush(channel="a", info=m.ClientInfoModel(client="c", user="u")),
        m.DisconnectPush(code=4502, reason="bye", reconnect=False),
        m.PingPush(),
        m.SubscribeReply(
            id=3,
            result=m.SubscribeResult(
                channels=[
                    m.ChannelSubscribeResult(channel="a", epoch="e", offset=0),
                    m.ChannelSubscribeResult(channel="b", error=m.ErrorInfo(code=106, message="bad")),
                ]
            ),
        ),
        m.ErrorReply(id=None, error=m.ErrorInfo(code=101, message="bad")),
    ]
    for frame in frames:
        dumped = frame.model_dump(mode="json")
        assert wire_schema.problem("ServerFrame", dumped) is None, dumped


def test_encoder_frames_are_server_frames() -> None:
    # What the server actually writes (herald.protocol.encoders) against the exported schema.
    info = ClientInfo("c", "u", {"k": 1})
    stored = [Publication("a", 4, "e", b'{"x":1}', info)]
    position = StreamPosition(4, "e")
    frames = [
        encoders.encode_publication("a", 4, "e", b"[1]", info),
        encoders.encode_publication("a", 5, "e", b"null", None),
        encoders.encode_presence_event("join", "a", info),
        encoders.encode_presence_event("leave", "a", info),
        encoders.encode_disconnect(4502, "bye", False),
        encoders.encode_refresh(1.5),
        encoders.encode_sub_refresh("a", 1.5),
        encoders.encode_unsubscribe("a", 112, "expired"),
        encoders.PING_FRAME,
        encoders.encode_error(None, None, 101, "bad"),
        encoders.encode_error(2, "publish", 103, "denied"),
        encoders.encode_connect_reply(
            1, client="c", user="u", version="1", ping_interval=25, pong_timeout=10
        ),
        encoders.encode_subscribe_reply(
            3,
            [
                encoders.subscribed_item(
                    "a",
                    position,
                    recoverable=True,
                    recovered=True,
                    publications=encoders.publication_items(stored),
                ),
                encoders.subscribe_error_item("b", 106, "bad"),
            ],
        ),
        encoders.encode_unsubscribe_reply(4, ["a"]),
        encoders.encode_publish_reply(5, position),
        encoders.encode_rpc_reply(6, {"any": ["json"]}),
        encoders.encode_presence_reply(7, {"c": info}),
        encoders.encode_presence_stats_reply(8, PresenceStats(1, 1)),
        encoders.encode_history_reply(9, stored, position),
        encoders.encode_refresh_reply(10, None),
        encoders.encode_sub_refresh_reply(11, 12.5),
        encoders.encode_ping_reply(12),
    ]
    for frame in frames:
        value = json.loads(frame)
        assert wire_schema.problem("ServerFrame", value) is None, value


def test_typescript_declares_every_definition() -> None:
    schema = protocol_json_schema()
    text = typescript_definitions(schema)
    for name in schema["$defs"]:
        assert f"export interface {name} " in text or f"export type {name} = " in text, name
    assert 'type: "publication";' in text
    assert "export type ServerFrame = Reply | Push;" in text
    assert "  subscribe: SubscribeResult;" in text
    # Optional fields are optional, required ones are not.
    assert "  token?: string | null;" in text
    assert "  channels: ChannelSubscription[];" in text


# ---------------------------------------------------------------- decoder == schema

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=2**53 + 2),
    st.sampled_from([0.5, -1.5, 2**53 - 1, 2**53]),
    _text,
    st.sampled_from(["chat:lobby", "", "x" * 1025, "ab12"]),
)
_value = st.recursive(
    _scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=6,
)
_position = st.one_of(
    st.fixed_dictionaries({"offset": st.integers(-1, 10), "epoch": _text}),
    _value,
)
_subscription = st.one_of(
    st.fixed_dictionaries(
        {"channel": st.sampled_from(["chat:lobby", "x" * 1025, 5])},
        optional={"since": _position, "token": st.one_of(st.none(), _text), "bogus": _value},
    ),
    _value,
)
_FIELDS: dict[str, Any] = {
    "id": st.one_of(st.integers(0, 3), st.just(2**53), st.just(2**53 - 1), _value),
    "token": st.one_of(st.none(), _text, st.just("t" * 8193), _value),
    "name": st.one_of(st.none(), _text, st.just("n" * 65)),
    "version": st.one_of(st.none(), _text),
    "channels": st.one_of(st.lists(_subscription, max_size=3), st.lists(_text, max_size=3), _value),
    "channel": st.one_of(st.sampled_from(["chat:lobby", "x" * 1025]), _value),
    "data": _value,
    "method": st.one_of(st.sampled_from(["echo", "", "m" * 129]), _value),
    "params": _value,
    "since": st.one_of(st.none(), _position),
    "limit": st.one_of(st.none(), st.integers(-1, 5), _value),
    "reverse": st.one_of(st.booleans(), _value),
    "unknown_field": _value,
}


@st.composite
def _frames(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 20)) == 0:
        return draw(_value)  # not even an object, sometimes
    frame: dict[str, Any] = {}
    kind = draw(st.one_of(st.sampled_from(sorted(m.COMMAND_TYPES)), st.just("nope"), _value))
    if draw(st.integers(0, 15)) > 0:
        frame["type"] = kind
    names = draw(st.lists(st.sampled_from(sorted(_FIELDS)), unique=True, max_size=5))
    for name in names:
        frame[name] = draw(_FIELDS[name])
    return frame


_ids = st.one_of(st.integers(1, 1000), st.just(2**53 - 1))
_short = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
_valid_position = st.fixed_dictionaries({"offset": st.integers(0, 2**53 - 1), "epoch": st.text(max_size=64)})
_VALID_FIELDS: dict[str, dict[str, Any]] = {
    "connect": {"token": st.one_of(st.none(), _short), "name": st.one_of(st.none(), _short)},
    "subscribe": {
        "channels": st.lists(
            st.fixed_dictionaries(
                {"channel": _short},
                optional={"since": st.one_of(st.none(), _valid_position), "token": _short},
            ),
            min_size=1,
            max_size=3,
        )
    },
    "unsubscribe": {"channels": st.lists(_short, min_size=1, max_size=3)},
    "publish": {"channel": _short, "data": _value},
    "rpc": {"method": _short, "params": _value},
    "presence": {"channel": _short},
    "presence_stats": {"channel": _short},
    "history": {
        "channel": _short,
        "since": st.one_of(st.none(), _valid_position),
        "limit": st.one_of(st.none(), st.integers(0, 100)),
        "reverse": st.booleans(),
    },
    "refresh": {"token": _short},
}
_REQUIRED = {"subscribe", "unsubscribe", "publish", "rpc", "presence", "presence_stats", "refresh"}


@st.composite
def _near_valid_frames(draw: st.DrawFn) -> Any:
    """A valid command, then maybe one mutation (drop a field, bad value, unknown field)."""
    kind = draw(st.sampled_from(sorted(m.COMMAND_TYPES)))
    frame: dict[str, Any] = {"type": kind}
    if kind != "pong":
        frame["id"] = draw(_ids)
    for name, strategy in _VALID_FIELDS.get(kind, {}).items():
        required = kind in _REQUIRED and name in ("channels", "channel", "method", "token", "data")
        if required or draw(st.booleans()):
            frame[name] = draw(strategy)
    mutation = draw(st.integers(0, 5))
    if mutation == 1 and frame:
        del frame[draw(st.sampled_from(sorted(frame)))]
    elif mutation == 2:
        frame[draw(st.sampled_from(sorted(frame)))] = draw(_value)
    elif mutation == 3:
        frame[draw(st.sampled_from(sorted(_FIELDS)))] = draw(_FIELDS[draw(st.sampled_from(sorted(_FIELDS)))])
    return frame


def _decoder_accepts(frame: Any) -> bool:
    try:
        decode_command(json.dumps(frame), max_depth=64)
    except ProtocolError:
        return False
    return True


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_frames(), _near_valid_frames()))
def test_schema_accepts_exactly_what_the_decoder_accepts(frame: Any) -> None:
    """Every frame a client may send is described by the schema, and nothing else is."""
    schema_ok = wire_schema.problem("ClientFrame", frame) is None
    assert schema_ok == _decoder_accepts(frame), (frame, wire_schema.problem("ClientFrame", frame))


@pytest.mark.parametrize(
    "frame",
    [
        {"id": "1", "type": "ping"},
        {"id": True, "type": "ping"},
        {"id": 0, "type": "ping"},
        {"id": 2**53, "type": "ping"},
        {"type": "ping"},
        {"id": 1, "type": "pong"},
        {"id": 1, "type": "history", "channel": "a", "reverse": "yes"},
        {"id": 1, "type": "history", "channel": "a", "since": {"offset": "3", "epoch": "e"}},
        {"id": 1, "type": "subscribe", "channels": []},
        {"id": 1, "type": "rpc", "method": ""},
        {"id": 1, "type": "publish", "channel": "a"},
    ],
)
def test_invalid_frames_are_rejected_by_both(frame: dict[str, Any]) -> None:
    assert wire_schema.problem("ClientFrame", frame) is not None
    assert not _decoder_accepts(frame)


def test_wire_check_records_what_the_schema_rejects() -> None:
    """The hook ProtocolClient calls (and conftest turns into a test failure)."""
    wire_schema.take_violations()
    wire_schema.record_server_frame(
        {"type": "publication", "channel": "a", "offset": 1, "epoch": "e", "data": 1}
    )
    assert wire_schema.take_violations() == []
    wire_schema.record_server_frame({"type": "publication", "channel": "a"})
    wire_schema.record_exchange({"id": 1, "type": "ping", "x": 1}, {"id": 1, "type": "ping", "result": {}})
    found = wire_schema.take_violations()
    assert len(found) == 2 and "not a ServerFrame" in found[0] and "not a ClientFrame" in found[1]
    # A command the server could not decode is expected to be outside the schema.
    wire_schema.record_exchange(
        {"id": 1, "type": "ping", "x": 1}, {"id": 1, "type": None, "error": {"code": 101, "message": "x"}}
    )
    assert wire_schema.take_violations() == []
