"""The HS256 fast path of TokenVerifier (issue 19): plain HS256 tokens are checked without
PyJWT, and every outcome must be the one PyJWT's path gives."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

import jwt
import jwt.warnings
import pytest

from herald.auth import TokenVerifier
from herald.codes import ErrorCode
from herald.exceptions import CommandError

SECRET = "fast-path-secret-for-tests-0123456789abcdef"


def hs256(claims: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def outcome(verifier: TokenVerifier, token: str) -> Any:
    """What verify() gives: the claims' fields, or the error code (never the message's token)."""
    try:
        c = verifier.verify(token)
    except CommandError as exc:
        assert token not in exc.message
        return int(exc.code)
    return (c.user, c.expires_at, c.info, c.channels, c.channel, c.raw, c.kind)


class NoPyJWT:
    """Makes jwt.decode fail the test: proves the fast path decided."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(jwt, "decode", self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("PyJWT was called for a plain HS256 token")


def test_plain_tokens_skip_pyjwt_and_match_it(monkeypatch: pytest.MonkeyPatch) -> None:
    now = int(time.time())
    tokens = [
        hs256({"sub": "alice"}),
        hs256({"sub": "bob", "exp": now + 60, "info": {"n": 1}, "channels": ["chat:*", 3]}),
        hs256({"sub": "carol", "exp": now + 60.5, "typ": "connection"}),
        hs256({"sub": "dave", "exp": now - 5}),  # expired
        hs256({"sub": "erin", "typ": "subscription", "channel": "x"}),  # wrong kind
        hs256({"sub": "frank", "channel": "x"}),  # untyped subscription token
        hs256({"sub": "x" * 300}),  # user id too long
        hs256({"sub": "mallory"}, "another-secret-of-enough-length-0123456789"),  # forged
    ]
    reference = TokenVerifier(secret=SECRET, audience=None)
    reference._fast_secret = None  # PyJWT's path only
    expected = [outcome(reference, t) for t in tokens]
    assert expected[0][0] == "alice" and expected[3] == ErrorCode.TOKEN_EXPIRED
    assert expected[7] == ErrorCode.UNAUTHORIZED
    fast = TokenVerifier(secret=SECRET)
    NoPyJWT(monkeypatch)
    assert [outcome(fast, t) for t in tokens] == expected
    assert len(fast._fast_headers) == 1


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "a", "nbf": 10**10},  # not yet valid: PyJWT's rule
        {"sub": "a", "iat": "yesterday"},
        {"sub": "a", "jti": 5},
        {"sub": "a", "exp": "123"},  # PyJWT converts strings
        {"sub": "a", "exp": True},
        {"sub": "a", "exp": 2**70},
        {"sub": 42},
        {"sub": ""},
        {"user": "a"},
        {"sub": "a", "iss": "anyone", "aud": "anything"},
    ],
)
def test_unusual_claims_are_left_to_pyjwt(claims: dict[str, Any]) -> None:
    reference = TokenVerifier(secret=SECRET)
    reference._fast_secret = None
    fast = TokenVerifier(secret=SECRET)
    fast.verify(hs256({"sub": "warm-up"}))  # the header is remembered as a plain one
    token = hs256(claims)
    assert outcome(fast, token) == outcome(reference, token)


def test_leeway_and_expiry_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    NoPyJWT(monkeypatch)
    now = int(time.time())
    assert TokenVerifier(secret=SECRET, leeway=30).verify(hs256({"sub": "a", "exp": now - 5})).user == "a"
    with pytest.raises(CommandError) as caught:
        TokenVerifier(secret=SECRET).verify(hs256({"sub": "a", "exp": now}))  # exp <= now: expired
    assert caught.value.code == ErrorCode.TOKEN_EXPIRED


def _signed(header: bytes, payload: bytes, secret: str = SECRET) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(header)}.{b64(payload)}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def test_tampering_and_malformed_tokens_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(secret=SECRET)
    good = hs256({"sub": "alice"})
    assert verifier.verify(good).user == "alice"
    head, payload, sig = good.split(".")
    evil = base64.urlsafe_b64encode(b'{"sub":"root"}').rstrip(b"=").decode()
    bad = [
        f"{head}.{evil}.{sig}",  # payload swapped
        f"{head}.{payload}.{sig[:-2]}",  # signature cut
        f"{head}.{payload}",  # no signature
        f"{head}.{payload}.{sig}.x",  # four segments
        f"{head}.{payload}.",  # empty signature
        _signed(b'{"alg":"HS256","typ":"JWT"}', b"[1, 2]"),  # not an object
        _signed(b'{"alg":"HS256","typ":"JWT"}', b"{not json"),
    ]
    for token in bad:
        with pytest.raises(CommandError) as caught:
            verifier.verify(token)
        assert caught.value.code == ErrorCode.UNAUTHORIZED, token


def test_only_plain_headers_and_long_secrets_take_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = TokenVerifier(secret=SECRET)
    verifier.verify(hs256({"sub": "a"}, kid="k1"))
    verifier.verify(hs256({"sub": "a"}, typ="other"))
    assert not verifier._fast_headers
    short = TokenVerifier(secret="short")
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        assert short.verify(hs256({"sub": "a"}, "short")).user == "a"
    assert short._fast_secret is None
    with_audience = TokenVerifier(secret=SECRET, audience="herald")
    token = hs256({"sub": "a"})  # no aud: PyJWT must refuse it
    with pytest.raises(CommandError):
        with_audience.verify(token)
    with_audience.verify(hs256({"sub": "a", "aud": "herald"}))
