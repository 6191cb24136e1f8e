"""Token verification and log redaction, as plain functions (the ``Origin`` check is
:func:`herald.hosts.check_origin`).

Tokens are JWTs (RFC 7519) checked with PyJWT:

* HS256 with a shared secret (``HERALD_TOKEN_SECRET``); plain HS256 tokens (header
  ``alg``/``typ`` only, no claim but ``exp`` with rules of its own) are checked without
  PyJWT, with the same outcome, at a sixth of the cost (:meth:`TokenVerifier._fast_hs256`);
* RS256 / ES256 with a PEM public key (``HERALD_TOKEN_PUBLIC_KEY``, the PEM text
  or a path to a PEM file) or a JWKS file (``HERALD_TOKEN_JWKS_FILE``; the key is
  chosen by the token's ``kid``).

The algorithm is never taken from the token alone: ``alg: none`` is always
refused, an HS256 token is only checked when a secret is configured, and an
RS256/ES256 token only against the configured public keys, so a public key can
never be abused as an HMAC secret (the classic algorithm-confusion attack).

Claims: ``sub`` (required) is the user id; ``exp`` (optional) is honoured;
``info`` (optional) is attached to the client; ``channels`` (optional) lists the
channels the token grants (exact names, or a prefix ending in ``*``);
``channel`` (subscription tokens) names the one channel granted.

Claims are JSON Herald re-encodes (``info`` rides on presence, join and leave, and
publications): a token whose payload is not strict JSON (NaN, Infinity, a lone UTF-16
surrogate), nests deeper than :data:`MAX_CLAIMS_DEPTH` levels or holds an integer
outside 64 bits is refused like any invalid token (111), whatever its signature.

``typ`` tells the two kinds apart, so that neither can pass as the other:
a subscription token must carry ``typ: "subscription"``; a connection token
carries ``typ: "connection"`` or, for tokens minted before the claim existed, no
``typ`` at all, in which case it must not carry the subscription-only ``channel``
claim either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import orjson
from pydantic import SecretStr

from .codes import ErrorCode
from .exceptions import CommandError, ConfigError
from .hosts import trusts_loopback
from .protocol.codec import LONG_DIGITS, json_depth_exceeds

#: Algorithms Herald accepts for asymmetric keys.
ASYMMETRIC_ALGORITHMS = ("RS256", "ES256")


# ---------------------------------------------------------------- tokens

#: The ``typ`` claim of a connection token (optional: a token without ``typ`` is one).
CONNECTION_TOKEN = "connection"
#: The ``typ`` claim every subscription token must carry.
SUBSCRIPTION_TOKEN = "subscription"
TOKEN_TYPES = (CONNECTION_TOKEN, SUBSCRIPTION_TOKEN)


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """The verified claims of a connection or subscription token."""

    user: str
    expires_at: float | None = None
    info: Any = None
    channels: list[str] | None = None
    channel: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    #: ``"connection"`` or ``"subscription"`` (from the ``typ`` claim).
    kind: str = CONNECTION_TOKEN

    def grants(self, channel: str) -> bool:
        """Whether the ``channel``/``channels`` claims name ``channel``.

        A ``channels`` entry ending in ``*`` grants every channel with that prefix
        (``"chat:*"``); anything else must match exactly.
        """
        if self.channel is not None and self.channel == channel:
            return True
        for granted in self.channels or ():
            if granted.endswith("*"):
                if channel.startswith(granted[:-1]):
                    return True
            elif granted == channel:
                return True
        return False


def _read_public_key(value: str) -> str:
    """A PEM string, or a path to a PEM file (handy in environment variables)."""
    if "-----BEGIN" in value:
        return value
    try:
        return Path(value).read_text()
    except OSError as exc:
        raise ConfigError(f"token_public_key: cannot read PEM file {value!r}: {exc}") from None


def _load_jwks(path: str) -> dict[str, jwt.PyJWK]:
    """Keys of a JWKS file by ``kid`` (keys without a kid are stored under "")."""
    try:
        text = Path(path).read_text()
        key_set = jwt.PyJWKSet.from_json(text)
    except (OSError, json.JSONDecodeError, jwt.PyJWTError) as exc:
        raise ConfigError(f"token_jwks_file: cannot load {path!r}: {exc}") from None
    keys: dict[str, jwt.PyJWK] = {}
    for key in key_set.keys:
        keys[key.key_id or ""] = key
    return keys


#: Deepest nesting of a token's claims (the payload object is level 1): ``info`` is
#: re-encoded inside presence answers, join/leave pushes and publications, which must
#: stay well within orjson's 255 levels (and the protocol's ``max_json_depth``).
MAX_CLAIMS_DEPTH = 32


def _claims_refusal(payload: bytes, claims: Any, *, encode: bool = True) -> str | None:
    """Why ``claims`` (parsed from ``payload``) cannot be a token's, or None.

    Checks the nesting (cheap bound first: every level opens with ``{`` or ``[``) and,
    with ``encode``, that orjson encodes them (integers within 64 bits, no lone
    surrogates: claims orjson parsed within the depth always encode)."""
    if payload.count(b"{") + payload.count(b"[") > MAX_CLAIMS_DEPTH and json_depth_exceeds(
        claims, MAX_CLAIMS_DEPTH
    ):
        return f"claims nested deeper than {MAX_CLAIMS_DEPTH} levels"
    if not encode:
        return None
    try:
        orjson.dumps(claims)
    except orjson.JSONEncodeError as exc:
        return f"claims not encodable as JSON: {exc}"
    return None


def _unusable_claims(detail: str) -> CommandError:
    return CommandError(ErrorCode.UNAUTHORIZED, f"invalid token ({detail})")


#: Distinct token headers (algorithm, key id) whose key choice a verifier remembers.
MAX_REMEMBERED_HEADERS = 64

#: Claims the HS256 fast path leaves to PyJWT (their rules are PyJWT's to apply).
_PYJWT_CLAIMS = ("iat", "nbf", "aud", "iss", "jti")


def _b64url(segment: str) -> bytes:
    """PyJWT's base64url decoding (padding restored, lenient alphabet: the HMAC covers the
    raw segments, so a lenient decoding can never accept altered text)."""
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _plain_hs256_header(segment: str) -> bool:
    """Whether a header segment is a plain HS256 one (``alg`` HS256, ``typ`` JWT or absent,
    nothing else: no ``crit``, no ``b64``), whose tokens the fast path may check."""
    try:
        header = orjson.loads(_b64url(segment))
    except (ValueError, binascii.Error):
        return False
    return (
        isinstance(header, dict)
        and header.get("alg") == "HS256"
        and header.get("typ", "JWT") == "JWT"
        and set(header) <= {"alg", "typ"}
    )


class TokenVerifier:
    """Verifies connection and subscription JWTs.

    ``secret`` enables HS256; ``public_key`` (PEM text or path) and/or
    ``jwks_file`` enable RS256/ES256.  ``leeway`` seconds of clock skew are
    tolerated on ``exp``/``nbf``/``iat``.  Error messages never contain the token.
    """

    def __init__(
        self,
        secret: str | None = None,
        public_key: str | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        *,
        jwks_file: str | None = None,
        leeway: float = 0.0,
    ) -> None:
        self.secret = secret or None
        self.public_key = _read_public_key(public_key) if public_key else None
        self.jwks = _load_jwks(jwks_file) if jwks_file else {}
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        # Header segment -> (key, algorithms) (see _key_for); bounded.
        self._keys_by_header: dict[str, tuple[Any, list[str]]] = {}
        # Header segments of plain HS256 tokens signed with the secret (see _fast_hs256).
        self._fast_headers: set[str] = set()
        # PyJWT warns about HMAC keys shorter than the hash (32 bytes): those keep its path.
        self._fast_secret = self.secret.encode() if self.secret and len(self.secret.encode()) >= 32 else None

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key or self.jwks)

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        # Every token of one issuer and key has the same header segment: the key chosen for
        # it is remembered (a third of a verification's time went to parsing it again).
        segment = token.partition(".")[0]
        known = self._keys_by_header.get(segment)
        if known is not None:
            return known
        found = self._choose_key(token)
        if len(self._keys_by_header) < MAX_REMEMBERED_HEADERS:
            self._keys_by_header[segment] = found
            if found[1] == ["HS256"] and self._fast_secret is not None and _plain_hs256_header(segment):
                self._fast_headers.add(segment)
        return found

    def _fast_hs256(self, token: str, secret: bytes) -> dict[str, Any] | None:
        """The claims of a plain HS256 token (remembered header, see :func:`_plain_hs256_header`),
        checked without PyJWT; None when PyJWT must decide (anything unusual: a malformed
        token, a claim with rules of its own, an ``exp`` that is not a number), so that every
        outcome stays PyJWT's.

        PyJWT parses the header and the payload with the standard library's ``json``, prepares
        the key again and runs its claim checks for every token: nearly all of what a connect
        with a token costs more than an anonymous one (issue 19).  Here: one HMAC, two base64
        decodings and one ``orjson`` parse; the signature is checked before the payload is
        even decoded.
        """
        header, _, rest = token.partition(".")
        payload, dot2, signature = rest.partition(".")
        if not dot2 or "." in signature:
            return None
        try:
            given = _b64url(signature)
        except (ValueError, binascii.Error):
            return None
        expected = hmac.new(secret, token[: len(header) + 1 + len(payload)].encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, given):
            raise CommandError(ErrorCode.UNAUTHORIZED, "invalid token (InvalidSignatureError)")
        try:
            text = _b64url(payload)
            claims = orjson.loads(text)
        except (ValueError, binascii.Error):
            return None
        if not isinstance(claims, dict) or any(name in claims for name in _PYJWT_CLAIMS):
            return None
        if LONG_DIGITS.search(text) is not None:
            return None  # maybe an integer orjson read as a float: PyJWT's path reads it exactly
        refusal = _claims_refusal(text, claims, encode=False)
        if refusal is not None:
            raise _unusable_claims(refusal)
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return None
        if "exp" in claims:
            exp = claims["exp"]
            if type(exp) is not int and type(exp) is not float:
                return None
            # PyJWT's rule: int(exp) <= now - leeway has expired.
            if int(exp) <= time.time() - self.leeway:
                raise CommandError(ErrorCode.TOKEN_EXPIRED, "token expired")
        return claims

    def _choose_key(self, token: str) -> tuple[Any, list[str]]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise CommandError(ErrorCode.UNAUTHORIZED, f"invalid token ({type(exc).__name__})") from None
        alg = header.get("alg")
        if alg == "HS256" and self.secret:
            return self.secret, ["HS256"]
        if alg in ASYMMETRIC_ALGORITHMS:
            kid = header.get("kid")
            if self.jwks:
                jwk = self.jwks.get(kid if isinstance(kid, str) else "")
                if jwk is None and len(self.jwks) == 1 and not kid:
                    jwk = next(iter(self.jwks.values()))
                if jwk is not None:
                    jwk_alg = getattr(jwk, "algorithm_name", None)
                    algorithms = [jwk_alg] if jwk_alg in ASYMMETRIC_ALGORITHMS else [str(alg)]
                    return jwk.key, algorithms
                if self.public_key is None:
                    raise CommandError(ErrorCode.UNAUTHORIZED, "invalid token (unknown key id)")
            if self.public_key is not None:
                return self.public_key, list(ASYMMETRIC_ALGORITHMS)
        shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
        raise CommandError(ErrorCode.UNAUTHORIZED, f"invalid token (algorithm {shown} not accepted)")

    def verify(self, token: str, kind: str = CONNECTION_TOKEN) -> TokenClaims:
        """Return the claims of a valid token of ``kind`` (``"connection"`` or
        ``"subscription"``).

        Raises ``CommandError`` with ``TOKEN_EXPIRED`` (112) for an expired token,
        ``UNAUTHORIZED`` (111) for anything else wrong with it (bad signature,
        wrong algorithm, missing ``sub``, tokens not configured, a token of the
        other kind: see :func:`token_kind`).
        """
        if kind not in TOKEN_TYPES:
            raise ValueError(f"unknown token kind {kind!r}")
        if not self.enabled:
            raise CommandError(ErrorCode.UNAUTHORIZED, "tokens are not configured on this server")
        key, algorithms = self._key_for(token)
        claims: dict[str, Any] | None = None
        if (
            self._fast_secret is not None
            and self.audience is None
            and self.issuer is None
            and token.partition(".")[0] in self._fast_headers
        ):
            claims = self._fast_hs256(token, self._fast_secret)
        if claims is None:
            claims = self._decode(token, key, algorithms)
        user = claims.get("sub")
        if not isinstance(user, str) or not user or len(user) > 256:
            raise CommandError(ErrorCode.UNAUTHORIZED, "invalid token (sub must be a user id)")
        found = token_kind(claims)
        if found != kind:
            raise CommandError(
                ErrorCode.UNAUTHORIZED, f'invalid token (not a {kind} token: "typ" must be "{kind}")'
            )
        channels = claims.get("channels")
        channel = claims.get("channel")
        exp = claims.get("exp")
        return TokenClaims(
            user=user,
            expires_at=float(exp) if isinstance(exp, int | float) else None,
            info=claims.get("info"),
            channels=[str(c) for c in channels] if isinstance(channels, list) else None,
            channel=channel if isinstance(channel, str) else None,
            raw=claims,
            kind=kind,
        )

    def _decode(self, token: str, key: Any, algorithms: list[str]) -> dict[str, Any]:
        """PyJWT's verification of ``token``, its errors as Herald's, and the claims' JSON
        checked (PyJWT parses with the standard library, which takes NaN, lone surrogates
        and integers of any size: see :func:`_claims_refusal`)."""
        # The payload strictly (orjson) first: it also bounds the nesting the standard
        # library's parser then recurses through.
        try:
            payload = _b64url(token.split(".", 2)[1])
            strict = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise _unusable_claims(f"claims are not strict JSON: {exc.msg}") from None
        except (ValueError, IndexError, binascii.Error):
            payload, strict = b"", None  # PyJWT says what is wrong with it
        refusal = _claims_refusal(payload, strict, encode=False)
        if refusal is not None:
            raise _unusable_claims(refusal)
        claims = self._pyjwt_decode(token, key, algorithms)
        refusal = _claims_refusal(payload, claims)
        if refusal is not None:
            raise _unusable_claims(refusal)
        return claims

    def _pyjwt_decode(self, token: str, key: Any, algorithms: list[str]) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise CommandError(ErrorCode.TOKEN_EXPIRED, "token expired") from None
        except jwt.PyJWTError as exc:
            # Never echo the token; the exception class says enough.
            raise CommandError(ErrorCode.UNAUTHORIZED, f"invalid token ({type(exc).__name__})") from None


def token_kind(claims: dict[str, Any]) -> str:
    """The kind of token ``claims`` (verified) describe, from the ``typ`` claim.

    ``"subscription"`` only with ``typ: "subscription"``; ``"connection"`` with
    ``typ: "connection"`` or without ``typ`` (tokens minted before the claim), unless
    the token carries a ``channel`` claim, which only subscription tokens have: such
    an untyped token is a subscription token minted before the claim and is refused
    as either kind (``"untyped subscription"``).  Any other ``typ`` is ``"unknown"``.
    """
    typ = claims.get("typ")
    if typ is None:
        return "untyped subscription" if "channel" in claims else CONNECTION_TOKEN
    return typ if isinstance(typ, str) and typ in TOKEN_TYPES else "unknown"


def seconds_left(claims: TokenClaims, now: float | None = None) -> float | None:
    """Seconds until ``claims`` expire (None: never)."""
    if claims.expires_at is None:
        return None
    return claims.expires_at - (time.time() if now is None else now)


# ---------------------------------------------------------------- logs


def redact_tokens(text: str) -> str:
    """Replace the value of every ``token=...`` query parameter in ``text`` (and of the
    other secret-looking ones: ``api_key=``, ``secret=``...) with ``***``; keys are judged
    percent-decoded, as the server reads them (``%74oken=`` is ``token=``)."""
    from .logs import redact

    return redact(text)


class RedactTokensFilter(logging.Filter):
    """Keeps ``?token=...`` out of logs (uvicorn logs the handshake path with its query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                redact_tokens(arg) if isinstance(arg, str) and "=" in arg else arg for arg in record.args
            )
        if isinstance(record.msg, str) and "=" in record.msg:
            record.msg = redact_tokens(record.msg)
        return True


def install_token_redaction(*logger_names: str) -> None:
    """Idempotently attach :class:`RedactTokensFilter` to the named loggers."""
    for name in logger_names or ("uvicorn.error", "uvicorn.access", "herald"):
        target = logging.getLogger(name)
        if not any(isinstance(f, RedactTokensFilter) for f in target.filters):
            target.addFilter(RedactTokensFilter())


__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "CONNECTION_TOKEN",
    "SUBSCRIPTION_TOKEN",
    "RedactTokensFilter",
    "TokenClaims",
    "TokenVerifier",
    "install_token_redaction",
    "redact_tokens",
    "seconds_left",
    "token_kind",
]


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a client address) is this machine's loopback interface."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def api_key_allows(
    key: SecretStr | None, supplied: str | None, client_host: str | None, host_header: str | None = None
) -> bool:
    """The HTTP API's and admin page's rule: with a configured ``key`` the client must send
    it (compared in constant time); without one only loopback clients are let in, and only
    when they name the server by a loopback name (``host_header``, the request's ``Host``;
    None: the request had none), so that a DNS-rebinding page gets no loopback trust."""
    if key is None:
        return trusts_loopback(client_host, host_header)
    if not supplied:
        return False
    return hmac.compare_digest(supplied.encode(), key.get_secret_value().encode())
