"""Origin allow-list, JWT verification (HS256, RS256, ES256, JWKS), subscription rules,
log redaction, and the FastAPI-dependency helper for hooks."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import Cookie, Depends, Header, HTTPException
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from herald.auth import (
    RedactTokensFilter,
    TokenClaims,
    TokenVerifier,
    redact_tokens,
)
from herald.codes import ErrorCode
from herald.config import NamespaceOptions, Settings
from herald.context import AsgiHandshake, ClientContext
from herald.exceptions import CommandError, ConfigError
from herald.hosts import check_origin
from herald.node import Node
from herald.transports.fastapi import run_dependency

SECRET = "s3cret-for-tests-only-0123456789abcdef"

# ---------------------------------------------------------------- origin


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "refused"),
    [
        (None, "h:8000", [], False),  # non-browser client, allowed by default
        ("", "h:8000", [], False),
        ("http://h:8000", "h:8000", [], False),  # same origin
        ("http://H:8000", "h:8000", [], False),  # case-insensitive
        ("https://h", "h:443", [], False),  # default port
        ("http://h:8001", "h:8000", [], True),  # other port = other origin
        ("http://evil.com", "h:8000", [], True),
        ("null", "h:8000", ["*"], True),  # sandboxed iframes, file:// pages
        ("not a url", "h:8000", [], True),
        ("http://evil.com", "h:8000", ["*"], False),
        ("https://app.example.com", "h", ["https://app.example.com"], False),
        ("https://app.example.com:443", "h", ["https://app.example.com"], False),
        ("http://app.example.com", "h", ["https://app.example.com"], True),  # scheme matters
        ("https://a.example.com", "h", ["https://*.example.com"], False),
        ("https://a.b.example.com", "h", ["https://*.example.com"], False),
        ("https://example.com", "h", ["https://*.example.com"], True),  # apex is not a subdomain
        ("https://a.example.com.evil.net", "h", ["https://*.example.com"], True),
        ("https://evilexample.com", "h", ["https://*.example.com"], True),
        ("https://a.example.com@evil.net", "h", ["https://*.example.com"], True),
        ("http://a.example.com", "h", ["https://*.example.com"], True),
        ("https://a.example.com:8443", "h", ["https://*.example.com:8443"], False),
        ("https://a.example.com", "h", ["https://*.example.com:8443"], True),
    ],
)
def test_check_origin(origin: str | None, host: str, allowed: list[str], refused: bool) -> None:
    reason = check_origin(origin, host, allowed)
    assert (reason is not None) is refused, reason


def test_missing_origin_policy_is_configurable() -> None:
    assert check_origin(None, "h", [], allow_missing=False) == "missing Origin header"
    assert check_origin(None, "h", [], allow_missing=True) is None


def test_origin_reason_is_bounded() -> None:
    reason = check_origin("http://" + "a" * 5000 + ".com", "h", [])
    assert reason is not None and len(reason) < 200


# ---------------------------------------------------------------- tokens


def hs256(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def expect_error(verifier: TokenVerifier, token: str, code: ErrorCode) -> CommandError:
    with pytest.raises(CommandError) as info:
        verifier.verify(token)
    assert info.value.code == code
    assert not token or token not in info.value.message
    return info.value


def test_hs256_valid_token() -> None:
    exp = int(time.time()) + 60
    claims = TokenVerifier(secret=SECRET).verify(
        hs256({"sub": "alice", "exp": exp, "info": {"name": "Alice"}, "channels": ["chat:*"]})
    )
    assert claims.user == "alice"
    assert claims.expires_at == exp
    assert claims.info == {"name": "Alice"}
    assert claims.grants("chat:lobby") and not claims.grants("game:1")


def test_expired_token_is_token_expired() -> None:
    token = hs256({"sub": "alice", "exp": int(time.time()) - 5})
    expect_error(TokenVerifier(secret=SECRET), token, ErrorCode.TOKEN_EXPIRED)


def test_leeway_tolerates_small_clock_skew() -> None:
    token = hs256({"sub": "alice", "exp": int(time.time()) - 5})
    assert TokenVerifier(secret=SECRET, leeway=30).verify(token).user == "alice"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(hs256({"sub": "alice"}, "another-secret-another-secret-12"), id="wrong-key"),
        pytest.param(jwt.encode({"sub": "alice"}, None, algorithm="none"), id="alg-none"),
        pytest.param(hs256({"user": "alice"}), id="no-sub"),
        pytest.param(hs256({"sub": 42}), id="sub-not-string"),
        pytest.param(hs256({"sub": ""}), id="sub-empty"),
        pytest.param("not.a.jwt", id="garbage"),
        pytest.param("", id="empty"),
        pytest.param(hs256({"sub": "alice", "nbf": int(time.time()) + 3600}), id="not-yet-valid"),
    ],
)
def test_invalid_tokens_are_unauthorized(token: str) -> None:
    expect_error(TokenVerifier(secret=SECRET), token, ErrorCode.UNAUTHORIZED)


def test_tokens_not_configured() -> None:
    verifier = TokenVerifier()
    assert not verifier.enabled
    error = expect_error(verifier, hs256({"sub": "a"}), ErrorCode.UNAUTHORIZED)
    assert "not configured" in error.message


def test_audience_and_issuer_checked() -> None:
    verifier = TokenVerifier(secret=SECRET, audience="herald", issuer="https://id.example")
    good = hs256({"sub": "a", "aud": "herald", "iss": "https://id.example"})
    assert verifier.verify(good).user == "a"
    expect_error(
        verifier, hs256({"sub": "a", "aud": "other", "iss": "https://id.example"}), ErrorCode.UNAUTHORIZED
    )
    expect_error(verifier, hs256({"sub": "a", "aud": "herald"}), ErrorCode.UNAUTHORIZED)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_rs256_with_public_key_pem(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(public_key=public_pem(rsa_key))
    assert verifier.verify(jwt.encode({"sub": "bob"}, rsa_key, algorithm="RS256")).user == "bob"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    expect_error(verifier, jwt.encode({"sub": "bob"}, other, algorithm="RS256"), ErrorCode.UNAUTHORIZED)


def test_public_key_may_be_a_file_path(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "key.pem"
    path.write_text(public_pem(ec_key))
    verifier = TokenVerifier(public_key=str(path))
    assert verifier.verify(jwt.encode({"sub": "eve"}, ec_key, algorithm="ES256")).user == "eve"
    with pytest.raises(ConfigError):
        TokenVerifier(public_key=str(tmp_path / "missing.pem"))


def test_algorithm_confusion_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    """An HS256 token 'signed' with the public key PEM as HMAC secret must not pass."""
    pem = public_pem(rsa_key)
    forged = _hmac_token({"sub": "mallory"}, pem.encode())
    verifier = TokenVerifier(public_key=pem)
    error = expect_error(verifier, forged, ErrorCode.UNAUTHORIZED)
    assert "HS256" in error.message


def _hmac_token(claims: dict[str, Any], key: bytes) -> str:
    """HS256 by hand: PyJWT itself refuses to use a PEM key as an HMAC secret."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def test_hs256_refused_when_only_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = TokenVerifier(public_key=public_pem(rsa_key))
    expect_error(verifier, hs256({"sub": "a"}), ErrorCode.UNAUTHORIZED)


def test_jwks_file_selects_key_by_kid(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk.update(kid="r1", alg="RS256", use="sig")
    ec_jwk.update(kid="e1", alg="ES256", use="sig")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk, ec_jwk]}))
    verifier = TokenVerifier(jwks_file=str(path))
    assert verifier.enabled
    rs = jwt.encode({"sub": "r"}, rsa_key, algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode({"sub": "e"}, ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert verifier.verify(rs).user == "r"
    assert verifier.verify(es).user == "e"
    # The right key id with the wrong key's signature, and an unknown key id.
    swapped = jwt.encode({"sub": "x"}, rsa_key, algorithm="RS256", headers={"kid": "e1"})
    expect_error(verifier, swapped, ErrorCode.UNAUTHORIZED)
    unknown = jwt.encode({"sub": "x"}, rsa_key, algorithm="RS256", headers={"kid": "zz"})
    expect_error(verifier, unknown, ErrorCode.UNAUTHORIZED)


def test_bad_jwks_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError):
        TokenVerifier(jwks_file=str(path))


def test_claims_grants() -> None:
    claims = TokenClaims(user="a", channel="dm:x", channels=["chat:*", "game:1"])
    assert claims.grants("dm:x") and claims.grants("chat:any") and claims.grants("game:1")
    assert not claims.grants("game:2") and not claims.grants("dm:y")
    assert not TokenClaims(user="a").grants("dm:x")


# ---------------------------------------------------------------- logs


def test_redact_tokens() -> None:
    assert redact_tokens("/connect?token=abc.def.ghi&x=1") == "/connect?token=***&x=1"
    assert redact_tokens('"WebSocket /connect?a=1&token=eyJ"') == '"WebSocket /connect?a=1&token=***"'
    assert redact_tokens("nothing here") == "nothing here"


def test_redaction_filter_on_uvicorn_style_record() -> None:
    record = logging.LogRecord(
        "uvicorn.error",
        logging.INFO,
        __file__,
        1,
        '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5", "/connect?token=eyJhbGciOi.secret.sig"),
        None,
    )
    RedactTokensFilter().filter(record)
    assert "secret" not in record.getMessage()
    assert "token=***" in record.getMessage()


# ---------------------------------------------------------------- node rules


def make_node(**overrides: Any) -> Node:
    settings = Settings(
        token_secret=SECRET,
        namespaces={
            "": NamespaceOptions(),
            "private": NamespaceOptions(private=True),
        },
        **overrides,
    )
    return Node(settings)


async def test_private_namespace_needs_a_grant() -> None:
    node = make_node()
    ctx = ClientContext(client="c1", user="alice")
    with pytest.raises(CommandError) as info:
        await node.authorize_subscribe(ctx, "private:room", None, private=True)
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    # A subscription token for this user and channel grants it.
    token = hs256({"sub": "alice", "channel": "private:room", "typ": "subscription"})
    claims = await node.authorize_subscribe(ctx, "private:room", token, private=True)
    assert claims is not None and claims.kind == "subscription" and claims.channel == "private:room"
    # ... but not another channel, nor another user's token.
    with pytest.raises(CommandError) as info:
        await node.authorize_subscribe(ctx, "private:other", token, private=True)
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    with pytest.raises(CommandError) as info:
        await node.authorize_subscribe(
            ctx,
            "private:room",
            hs256({"sub": "bob", "channel": "private:room", "typ": "subscription"}),
            private=True,
        )
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    # A connection token's channels claim grants too.
    ctx.claims = TokenClaims(user="alice", channels=["private:*"])
    await node.authorize_subscribe(ctx, "private:x", None, private=True)
    assert node.rejected_handshakes["private_channel"] == 1
    assert node.rejected_handshakes["subscription_token"] == 2


async def test_connection_token_is_not_a_subscription_token() -> None:
    """A connection token (typ absent or "connection") is refused as a subscription token
    (111), even one whose channels claim names the channel; a subscription-typed token
    without a channel claim grants nothing (110)."""
    node = make_node()
    ctx = ClientContext(client="c1", user="alice")
    for claims in (
        {"sub": "alice"},
        {"sub": "alice", "channels": ["chat:x"]},
        {"sub": "alice", "channels": ["chat:x"], "typ": "connection"},
    ):
        with pytest.raises(CommandError) as info:
            await node.authorize_subscribe(ctx, "chat:x", hs256(claims))
        assert info.value.code == ErrorCode.UNAUTHORIZED, claims
        assert "subscription" in info.value.message
    with pytest.raises(CommandError) as info:
        await node.authorize_subscribe(ctx, "chat:x", hs256({"sub": "alice", "typ": "subscription"}))
    assert info.value.code == ErrorCode.PERMISSION_DENIED
    granted = hs256({"sub": "alice", "channels": ["chat:*"], "typ": "subscription"})
    assert await node.authorize_subscribe(ctx, "chat:x", granted) is not None


@pytest.mark.parametrize(
    ("claims", "kind"),
    [
        pytest.param({"sub": "a"}, "connection", id="untyped"),
        pytest.param({"sub": "a", "channels": ["x:*"]}, "connection", id="untyped-with-grants"),
        pytest.param({"sub": "a", "typ": "connection"}, "connection", id="connection"),
        pytest.param(
            {"sub": "a", "typ": "subscription", "channel": "x:1"}, "subscription", id="subscription"
        ),
        pytest.param({"sub": "a", "channel": "x:1"}, None, id="untyped-subscription"),
        pytest.param({"sub": "a", "typ": "refresh"}, None, id="unknown-typ"),
        pytest.param({"sub": "a", "typ": 1}, None, id="non-string-typ"),
    ],
)
def test_token_types_are_not_interchangeable(claims: dict[str, Any], kind: str | None) -> None:
    """Each token is accepted as its own kind only: a subscription token cannot open a
    connection, a connection token cannot subscribe; untyped tokens naming one channel
    (subscription tokens minted before the typ claim) and unknown types are neither."""
    verifier = TokenVerifier(secret=SECRET)
    token = hs256(claims)
    for wanted in ("connection", "subscription"):
        if wanted == kind:
            verified = verifier.verify(token, wanted)
            assert verified.kind == wanted and verified.user == "a"
        else:
            with pytest.raises(CommandError) as info:
                verifier.verify(token, wanted)
            assert info.value.code == ErrorCode.UNAUTHORIZED
            assert token not in info.value.message
    # The default kind is the connection token (connect, refresh).
    if kind == "connection":
        assert verifier.verify(token).kind == "connection"
    else:
        expect_error(verifier, token, ErrorCode.UNAUTHORIZED)


async def test_subscription_token_cannot_connect() -> None:
    """node.authenticate (the connect command) refuses a subscription token with 111."""
    node = make_node()
    ctx = ClientContext(client="c1", token=hs256({"sub": "alice", "typ": "subscription", "channel": "x"}))
    with pytest.raises(CommandError) as info:
        await node.authenticate(ctx)
    assert info.value.code == ErrorCode.UNAUTHORIZED
    assert ctx.user == "" and ctx.claims is None
    assert node.rejected_handshakes["auth"] == 1


async def test_authenticate_sets_user_and_claims() -> None:
    node = make_node()
    ctx = ClientContext(client="c1", token=hs256({"sub": "alice", "info": {"n": 1}}))
    await node.authenticate(ctx)
    assert ctx.user == "alice" and ctx.info == {"n": 1}
    assert ctx.claims is not None and ctx.claims.user == "alice"


# ---------------------------------------------------------------- context and dependencies


def handshake_scope(headers: dict[str, str], query: str = "") -> dict[str, Any]:
    return {
        "type": "websocket",
        "path": "/connect",
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("203.0.113.9", 5555),
        "server": ("127.0.0.1", 8000),
        "scheme": "ws",
        "subprotocols": [],
    }


def test_context_reads_headers_cookies_query() -> None:
    ctx = ClientContext(
        client="c",
        handshake=AsgiHandshake(
            handshake_scope({"Cookie": "session=abc123; theme=dark", "X-Api": "v"}, "token=t0k&room=1")
        ),
    )
    assert ctx.cookie("session") == "abc123"
    assert ctx.cookie("missing") is None
    assert ctx.header("x-api") == "v"
    assert ctx.query("token") == "t0k" and ctx.query("room") == "1"
    assert ctx.client_ip == "203.0.113.9"
    assert ctx.scope["path"] == "/connect"  # hooks still get the ASGI scope


SESSIONS = {"abc123": "alice"}


def current_user(session: Annotated[str | None, Cookie()] = None) -> str:
    user = SESSIONS.get(session or "")
    if user is None:
        raise HTTPException(status_code=401, detail="not logged in")
    return user


def role(
    user: Annotated[str, Depends(current_user)], x_role: Annotated[str, Header()] = "member"
) -> tuple[str, str]:
    return user, x_role


async def test_run_dependency_resolves_cookies_headers_and_subdependencies() -> None:
    scope = handshake_scope({"Cookie": "session=abc123", "X-Role": "admin"})
    assert await run_dependency(role, scope) == ("alice", "admin")
    with pytest.raises(HTTPException):
        await run_dependency(role, handshake_scope({"Cookie": "session=nope"}))


EVENTS: list[str] = []


async def resource() -> Any:
    EVENTS.append("open")
    yield "db"
    EVENTS.append("close")


async def needs_resource(db: Annotated[str, Depends(resource)]) -> str:
    return db + "!"


async def test_run_dependency_async_and_yield_subdependency() -> None:
    EVENTS.clear()
    assert await run_dependency(needs_resource, handshake_scope({})) == "db!"
    assert EVENTS == ["open", "close"]


def test_remembered_key_choice_never_lets_a_bad_token_through() -> None:
    """The verifier remembers the key chosen for a header segment (issue 19: a third of a
    verification was parsing it again); signatures, claims and other headers are still
    checked on every token, and at most MAX_REMEMBERED_HEADERS choices are kept."""
    from herald.auth import MAX_REMEMBERED_HEADERS

    secret = "remember-" + "k" * 40
    verifier = TokenVerifier(secret)
    good = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert verifier.verify(good).user == "alice"
    assert verifier.verify(good).user == "alice"  # the remembered choice
    forged = jwt.encode({"sub": "mallory"}, "another-" + "k" * 40, algorithm="HS256")
    assert forged.partition(".")[0] == good.partition(".")[0]  # the same header segment
    with pytest.raises(CommandError) as caught:
        verifier.verify(forged)
    assert caught.value.code == ErrorCode.UNAUTHORIZED
    expired = jwt.encode({"sub": "alice", "exp": int(time.time()) - 60}, secret, algorithm="HS256")
    with pytest.raises(CommandError) as caught:
        verifier.verify(expired)
    assert caught.value.code == ErrorCode.TOKEN_EXPIRED
    unsigned = jwt.encode({"sub": "alice"}, None, algorithm="none")
    with pytest.raises(CommandError):
        verifier.verify(unsigned)
    for n in range(MAX_REMEMBERED_HEADERS + 10):
        token = jwt.encode({"sub": "alice"}, secret, algorithm="HS256", headers={"n": n})
        assert verifier.verify(token).user == "alice"
    assert len(verifier._keys_by_header) == MAX_REMEMBERED_HEADERS
