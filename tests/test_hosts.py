"""The Host and Origin rules (herald/hosts.py) as pure functions: no server, no socket.

The same rules over real sockets are in tests/integration/test_hostile_http.py and
tests/integration/test_hostile.py; these tests pin each rule and each refusal's reason.
"""

from __future__ import annotations

import pytest

from herald import hosts
from herald.config import Settings
from herald.hosts import (
    WILDCARD_ADDRESSES,
    HostPolicy,
    Refusal,
    check_origin,
    handshake_refusal,
    host_name,
    is_local_address,
    is_loopback_name,
    trusts_loopback,
)

# ---------------------------------------------------------------- Origin


@pytest.mark.parametrize(
    ("origin", "parts"),
    [
        ("http://h", ("http", "h:80")),
        ("https://h", ("https", "h:443")),
        ("ws://h", ("ws", "h:80")),
        ("wss://h", ("wss", "h:443")),
        (" HTTPS://App.Example.COM:8443 ", ("https", "app.example.com:8443")),
        ("ftp://h", ("ftp", "h:None")),  # no default port: only equal to itself
        ("http://h:99999", None),  # port out of range
        ("http://h:x", None),
        ("h", None),  # no scheme
        ("http://", None),  # no host
    ],
)
def test_origin_parts(origin: str, parts: tuple[str, str] | None) -> None:
    assert hosts._origin_parts(origin) == parts


@pytest.mark.parametrize(
    ("pattern", "origin", "matches"),
    [
        ("*", "https://anything.example", True),
        (" * ", "https://anything.example", True),
        ("HTTPS://*.Example.COM/", "https://a.example.com/", True),
        ("https://*.example.com", "https://a.b.example.com", True),
        ("https://*.example.com", "https://example.com", False),
        ("https://*.example.com", "http://a.example.com", False),
        ("https://app.example.com", "https://APP.example.com:443", True),
        ("https://app.example.com", "https://app.example.com:8443", False),
        ("not a url", "not a url", False),  # unparsable entries match nothing
    ],
)
def test_pattern_matches(pattern: str, origin: str, matches: bool) -> None:
    assert hosts._pattern_matches(pattern, origin) is matches


def test_check_origin_reasons() -> None:
    assert check_origin(None, "h", []) is None
    assert check_origin("", "h", [], allow_missing=False) == "missing Origin header"
    assert check_origin("null", "h", ["*"]) == "opaque origin (null) not allowed"
    assert check_origin("http://", "h", ["*"]) == "malformed Origin header"
    assert check_origin("http://evil.example", "h", []) == "origin http://evil.example not allowed"
    long = "http://" + "a" * 300 + ".example"
    assert check_origin(long, "h", []) == f"origin {long[:100]} not allowed"


def test_same_origin_compares_with_the_handshake_scheme() -> None:
    # A wss:// handshake: a page at https://h (port 443) is the same origin as Host h.
    assert check_origin("https://h", "h", [], scheme="wss") is None
    assert check_origin("https://h", "h", [], scheme="https") is None
    assert check_origin("http://h", "h", [], scheme="ws") is None
    assert check_origin("https://h", "h", [], scheme="ws") is not None
    assert check_origin("https://h", "h", []) is not None  # http by default: port 80
    assert check_origin("http://h", "h", []) is None
    assert check_origin("http://h:8000", "h:8000", []) is None
    # No Host: only the allow-list can admit an origin.
    assert check_origin("http://h", "", []) == "origin http://h not allowed"
    assert check_origin("http://h", None, ["http://h"]) is None


# ---------------------------------------------------------------- Host names


@pytest.mark.parametrize(
    ("header", "name"),
    [
        (" Example.COM:8000 ", "example.com"),
        ("example.com.", "example.com"),
        ("a_b-c.example", "a_b-c.example"),
        ("h:65535", "h"),
        ("h:8", "h"),
        ("h:x8", None),
        ("[::1]", "::1"),
        ("[2001:DB8::1]:443", "2001:db8::1"),
        ("h:123456", None),  # a port has at most 5 digits
        ("h:", None),
        ("[::1]:", None),
        ("[127.0.0.1]", None),  # brackets hold IPv6 addresses only
        ("[::1]8000", None),
        (".", None),
        ("", None),
        ("ex ample", None),
    ],
)
def test_host_name(header: str, name: str | None) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),  # IPv4-mapped: the IPv4 address
        ("::ffff:10.0.0.5", "10.0.0.5"),
        ("2001:db8::1", "2001:db8::1"),
        ("localhost", None),
        ("X127.0.0.1", None),
        ("", None),
        (None, None),
    ],
)
def test_ip(text: str | None, address: str | None) -> None:
    result = hosts._ip(text)
    assert (None if result is None else str(result)) == address


@pytest.mark.parametrize(
    ("name", "loopback"),
    [
        ("localhost", True),
        ("app.localhost", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("xlocalhost", False),
        ("localhost.example", False),
        ("10.0.0.5", False),
        ("example.com", False),
    ],
)
def test_is_loopback_name(name: str, loopback: bool) -> None:
    assert is_loopback_name(name) is loopback


@pytest.mark.parametrize(
    ("address", "local", "in_process"),
    [
        ("127.0.0.1", True, False),
        ("::1", True, False),
        ("/run/herald.sock", True, False),  # Unix socket path
        ("\0abstract", True, False),  # Linux abstract socket
        ("@abstract", True, False),
        ("10.0.0.5", False, False),
        ("testserver", False, True),  # Starlette's TestClient: no socket
        ("", False, True),
        (None, False, True),
    ],
)
def test_local_addresses(address: str | None, local: bool, in_process: bool) -> None:
    assert is_local_address(address) is local
    assert hosts._in_process(address) is in_process


@pytest.mark.parametrize(
    ("peer", "host", "trusted"),
    [
        ("127.0.0.1", "localhost:8000", True),
        ("::1", None, True),
        ("127.0.0.1", "", True),  # no Host: not a browser
        ("localhost", "127.0.0.1", True),
        ("::ffff:127.0.0.1", "[::1]:80", True),
        ("127.0.0.1", "app.example.com", False),  # DNS rebinding
        ("127.0.0.1", "bad host", False),
        ("10.0.0.5", "localhost", False),
        ("10.0.0.5", None, False),
        ("testserver", None, False),
        (None, None, False),
    ],
)
def test_trusts_loopback(peer: str | None, host: str | None, trusted: bool) -> None:
    assert trusts_loopback(peer, host) is trusted


# ---------------------------------------------------------------- the allow-list


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        ("*", "*"),
        ("", None),
        ("  ", None),
        (" *.Example.COM ", "*.example.com"),
        ("chat.example.com:8000", "chat.example.com"),
        ("bad host", None),
        ("*.bad host", None),
    ],
)
def test_entry_name(entry: str, name: str | None) -> None:
    assert hosts._entry_name(entry) == name


@pytest.mark.parametrize(
    ("origin", "name"),
    [
        ("*", "*"),
        (" https://*.Apps.io ", "*.apps.io"),
        ("https://App.example.com:8443", "app.example.com"),
        ("not a url", None),
    ],
)
def test_origin_host(origin: str, name: str | None) -> None:
    assert hosts._origin_host(origin) == name


def test_an_explicit_list_is_the_whole_list() -> None:
    policy = HostPolicy(
        ["*.b.example", "x.example:80", "*.a.example", "bad host"],
        bind_host="10.0.0.5",
        allowed_origins=["https://app.example.com"],
    )
    assert policy.explicit and not policy.any_name
    assert policy.suffixes == (".a.example", ".b.example")
    assert policy.names == frozenset({"x.example"})
    assert HostPolicy(["*", "x.example"]).any_name


def test_without_a_list_the_bind_host_and_origins_are_allowed() -> None:
    policy = HostPolicy(
        [], bind_host=" 10.0.0.5 ", allowed_origins=["https://app.example.com", "https://*.apps.io", "bad"]
    )
    assert not policy.explicit and not policy.any_name
    assert policy.names == frozenset({"10.0.0.5", "app.example.com"})
    assert policy.suffixes == (".apps.io",)
    assert HostPolicy([], allowed_origins=["*"]).any_name
    for wildcard in WILDCARD_ADDRESSES:
        assert HostPolicy([], bind_host=wildcard).names == frozenset(), wildcard
    assert HostPolicy([], bind_host="Chat.Example.com").names == frozenset({"chat.example.com"})
    assert HostPolicy([]).names == frozenset()  # no bind host given: no name


def test_allows_name() -> None:
    policy = HostPolicy(["x.example", "*.apps.io"])
    for name in ("x.example", "a.apps.io", "a.b.apps.io", "localhost", "127.0.0.1"):
        assert policy.allows_name(name), name
    for name in ("apps.io", "evilapps.io", "y.example", "x.example.evil", "10.0.0.5"):
        assert not policy.allows_name(name), name
    assert HostPolicy(["*"]).allows_name("anything.example")


def test_refusal_reasons() -> None:
    explicit = HostPolicy(["x.example"])
    assert explicit.refusal(None, "10.0.0.5") is None
    assert explicit.refusal("", "10.0.0.5") is None
    assert explicit.refusal("x.example:443", "10.0.0.5") is None
    assert explicit.refusal("bad host", "10.0.0.5") == "malformed Host header"
    assert (
        explicit.refusal("evil.example", "10.0.0.5")
        == "Host evil.example not allowed (set HERALD_ALLOWED_HOSTS)"
    )
    long = "a" * 150 + ".example"
    assert explicit.refusal(long, "10.0.0.5") == f"Host {long[:100]} not allowed (set HERALD_ALLOWED_HOSTS)"
    # An explicit list holds for address literals and in-process requests too.
    assert explicit.refusal("10.0.0.6", "10.0.0.5") is not None
    assert explicit.refusal("evil.example", None) is not None
    automatic = HostPolicy([], bind_host="10.0.0.5")
    assert automatic.refusal("10.0.0.6:80", "10.0.0.5") is None  # an address cannot be rebound
    assert automatic.refusal("[2001:db8::1]", "127.0.0.1") is None
    assert automatic.refusal("evil.example", "testserver") is None  # no socket: no browser
    assert automatic.refusal("evil.example", "127.0.0.1") is not None
    assert automatic.refusal("evil.example", "/run/herald.sock") is not None


def test_policies_are_built_once_per_configuration_and_bounded() -> None:
    hosts._policies.clear()
    settings = Settings(allowed_hosts=["x.example"], host="10.0.0.5", allowed_origins=["https://o.example"])
    policy = HostPolicy.for_settings(settings)
    assert HostPolicy.for_settings(settings) is policy
    assert policy.explicit and policy.names == frozenset({"x.example"})
    automatic = HostPolicy.for_settings(Settings(host="10.0.0.5", allowed_origins=["https://o.example"]))
    assert automatic is not policy and automatic.names == frozenset({"10.0.0.5", "o.example"})
    hosts._policies.clear()
    for n in range(64):
        HostPolicy.for_settings(Settings(allowed_hosts=[f"h{n}.example"]))
    assert len(hosts._policies) == 64
    HostPolicy.for_settings(Settings(allowed_hosts=["one-more.example"]))
    assert len(hosts._policies) == 1  # the cache is cleared, not grown without bound
    hosts._policies.clear()


def test_handshake_refusal_checks_host_then_origin() -> None:
    settings = Settings(allowed_hosts=["chat.example"], allowed_origins=["https://app.example"])
    ok = {"local_address": "10.0.0.5", "scheme": "ws"}
    assert handshake_refusal(settings, host="chat.example", origin="https://app.example", **ok) is None
    assert handshake_refusal(settings, host="chat.example", origin=None, **ok) is None
    assert handshake_refusal(settings, host="evil.example", origin="https://evil.example", **ok) == Refusal(
        "host", "Host evil.example not allowed (set HERALD_ALLOWED_HOSTS)"
    )
    assert handshake_refusal(settings, host="chat.example", origin="https://evil.example", **ok) == Refusal(
        "origin", "origin https://evil.example not allowed"
    )
    # Same origin as Host, with the handshake's scheme.
    assert (
        handshake_refusal(
            settings,
            host="chat.example",
            origin="https://chat.example",
            scheme="wss",
            local_address="10.0.0.5",
        )
        is None
    )
    # The server side of the connection decides whether a name may come without a list.
    automatic = Settings(host="0.0.0.0")
    assert handshake_refusal(automatic, host="evil.example", origin=None, **ok) == Refusal(
        "host", "Host evil.example not allowed (set HERALD_ALLOWED_HOSTS)"
    )
    assert (
        handshake_refusal(automatic, host="evil.example", origin=None, local_address=None, scheme="ws")
        is None
    )
    strict = Settings(allowed_hosts=["chat.example"], allow_missing_origin=False)
    assert handshake_refusal(strict, host="chat.example", origin=None, **ok) == Refusal(
        "origin", "missing Origin header"
    )


def test_remembered_verdicts_are_the_same_and_bounded() -> None:
    """refusal() remembers its verdicts per (Host, local address), never more than a bound,
    and a remembered verdict is the one a fresh policy gives."""
    from herald.hosts import _VERDICTS_KEPT, HostPolicy

    policy = HostPolicy(["chat.example.com"])
    asks = [("chat.example.com", "10.0.0.1"), ("evil.example", "10.0.0.1"), ("bad host", None)]
    first = [policy.refusal(host, local) for host, local in asks]
    assert first[0] is None and first[1] is not None and first[2] == "malformed Host header"
    assert [policy.refusal(host, local) for host, local in asks] == first
    for n in range(3 * _VERDICTS_KEPT):
        assert policy.refusal(f"n{n}.scan.example", "10.0.0.1") is not None
        assert len(policy._verdicts) <= _VERDICTS_KEPT
    assert [policy.refusal(host, local) for host, local in asks] == first
    assert [HostPolicy(["chat.example.com"]).refusal(h, lo) for h, lo in asks] == first
