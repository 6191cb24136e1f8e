"""Token claims Herald cannot re-encode are refused at verification (a red-team finding).

``info`` rides on presence answers, join/leave pushes and publications, all encoded by
orjson: a claim it cannot encode (an integer past 64 bits, a lone UTF-16 surrogate,
nesting past 255 levels) or that is not JSON at all (NaN, Infinity) used to pass PyJWT
(the standard library's parser takes them) and fail later, far from the token.  Both
verification paths are checked: the HS256 fast path (a secret of 32 bytes or more) and
PyJWT's (a shorter secret; RS256 and JWKS go the same way).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import warnings

import pytest

from herald.auth import MAX_CLAIMS_DEPTH, SUBSCRIPTION_TOKEN, TokenVerifier
from herald.codes import ErrorCode
from herald.exceptions import CommandError

LONG_SECRET = "claims-json-secret-0123456789abcdef-0123456789abcdef"
SHORT_SECRET = "s3cret"  # below 32 bytes: PyJWT's path, never the fast one


def mint(payload_json: str, secret: str) -> str:
    """An HS256 token whose payload is ``payload_json`` byte for byte (PyJWT would
    re-encode it)."""

    def b64(raw: bytes) -> bytes:
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(payload_json.encode())
    signature = b64(hmac.new(secret.encode(), head, hashlib.sha256).digest())
    return (head + b"." + signature).decode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


#: Claim values that must refuse the token: (name, JSON text of ``info``).
BAD_INFO = [
    ("bigint", '{"n":123456789012345678901234567890}'),
    ("negative bigint", "-99999999999999999999"),
    ("just past u64", "18446744073709551616"),
    ("5000 digits", "9" * 5000),
    ("deep 300", nested(300)),
    ("deep 1000", nested(1000)),
    ("deep 5000", nested(5000)),
    ("deep past the limit", nested(MAX_CLAIMS_DEPTH)),  # the payload object adds one level
    ("lone surrogate", '"\\ud800"'),
    ("lone low surrogate key", '{"\\udfff":1}'),
    ("NaN", "NaN"),
    ("Infinity", "Infinity"),
    ("-Infinity", "-Infinity"),
    ("1e400", "1e400"),
]

#: Claim values that are fine: (name, JSON text of ``info``).
GOOD_INFO = [
    ("u64 max", "18446744073709551615"),
    ("i64 min", "-9223372036854775808"),
    ("long digit string", '"123456789012345678901234567890"'),
    ("deep at the limit", nested(MAX_CLAIMS_DEPTH - 1)),
    ("surrogate pair", '"\\ud83d\\ude00"'),
    ("big float", "1.5e308"),
]


@pytest.fixture(params=[LONG_SECRET, SHORT_SECRET], ids=["fast-path", "pyjwt"])
def secret(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


def verify(token: str, secret: str, kind: str = "connection") -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns about the short secret
        return TokenVerifier(secret=secret).verify(token, kind)


@pytest.mark.parametrize(("name", "info"), BAD_INFO, ids=[n for n, _ in BAD_INFO])
def test_connection_token_with_unusable_info_is_refused(secret: str, name: str, info: str) -> None:
    token = mint(f'{{"sub":"u","info":{info}}}', secret)
    for _ in range(2):  # the second time the header is remembered (the fast path's turn)
        with pytest.raises(CommandError) as caught:
            verify(token, secret)
        assert caught.value.code == ErrorCode.UNAUTHORIZED, name
        assert caught.value.message.startswith("invalid token ("), caught.value.message


@pytest.mark.parametrize(("name", "info"), GOOD_INFO, ids=[n for n, _ in GOOD_INFO])
def test_connection_token_with_usable_info_is_accepted(secret: str, name: str, info: str) -> None:
    exp = int(time.time()) + 60
    token = mint(f'{{"sub":"u","info":{info},"exp":{exp}}}', secret)
    verifier = TokenVerifier(secret=secret)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            assert verifier.verify(token).user == "u", name


def test_refusal_messages_name_the_problem(secret: str) -> None:
    cases = {
        '{"n":123456789012345678901234567890}': "64-bit",
        nested(300): f"nested deeper than {MAX_CLAIMS_DEPTH} levels",
        '"\\ud800"': "surrogate",
        "NaN": "not strict JSON",
    }
    for info, expected in cases.items():
        with pytest.raises(CommandError) as caught:
            verify(mint(f'{{"sub":"u","info":{info}}}', secret), secret)
        assert expected in caught.value.message, (info[:20], caught.value.message)


def test_any_claim_is_checked_not_only_info(secret: str) -> None:
    for claims in (
        '{"sub":"u","meta":{"n":123456789012345678901234567890}}',
        '{"sub":"u","channels":["\\ud800"]}',
        '{"sub":"u","extra":NaN}',
    ):
        with pytest.raises(CommandError) as caught:
            verify(mint(claims, secret), secret)
        assert caught.value.code == ErrorCode.UNAUTHORIZED


def test_subscription_token_with_unusable_info_is_refused(secret: str) -> None:
    for info in ('{"n":123456789012345678901234567890}', nested(300), '"\\ud800"', "NaN"):
        token = mint(f'{{"sub":"u","typ":"subscription","channel":"chat:x","info":{info}}}', secret)
        with pytest.raises(CommandError) as caught:
            verify(token, secret, SUBSCRIPTION_TOKEN)
        assert caught.value.code == ErrorCode.UNAUTHORIZED


def test_a_forged_signature_is_still_a_signature_error() -> None:
    """The fast path checks the signature before it reads the claims."""
    token = mint(f'{{"sub":"u","info":{nested(300)}}}', "another-secret-0123456789abcdef-0123456789")
    verifier = TokenVerifier(secret=LONG_SECRET)
    verifier.verify(mint('{"sub":"u"}', LONG_SECRET))  # the header is remembered: fast path
    with pytest.raises(CommandError) as caught:
        verifier.verify(token)
    assert "InvalidSignatureError" in caught.value.message
