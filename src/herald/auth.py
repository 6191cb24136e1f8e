"""Origin checks and token verification, as plain functions.

Browsers send ``Origin`` on WebSocket handshakes but Starlette's CORS middleware
does not apply to WebSockets, so without this check any web page could open a
socket to Herald with the visitor's cookies (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import jwt

from .codes import ErrorCode
from .exceptions import CommandError


def _origin_parts(origin: str) -> tuple[str, str] | None:
    parts = urlsplit(origin.strip().lower())
    if not parts.scheme or not parts.hostname:
        return None
    default_port = {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(parts.scheme)
    try:
        port = parts.port or default_port
    except ValueError:
        return None
    return parts.scheme, f"{parts.hostname}:{port}"


def _pattern_matches(pattern: str, origin: str) -> bool:
    if pattern == "*":
        return True
    if "*" in pattern:
        regex = re.escape(pattern.lower().rstrip("/")).replace(
            r"\*", r"[a-z0-9-]+(?:\.[a-z0-9-]+)*"
        )
        return re.fullmatch(regex, origin.lower().rstrip("/")) is not None
    want, got = _origin_parts(pattern), _origin_parts(origin)
    return want is not None and want == got


def check_origin(
    origin: str | None,
    host: str | None,
    allowed: list[str],
    *,
    allow_missing: bool = True,
    scheme: str = "http",
) -> str | None:
    """Return None when the handshake may proceed, else the reason it is refused.

    Allowed: a request without ``Origin`` (if ``allow_missing``), an ``Origin``
    whose host and port equal the request's ``Host``, or one matching an entry of
    ``allowed`` (exact origins, ``https://*.example.com`` wildcards, or ``*``).
    """
    if origin is None or origin == "":
        return None if allow_missing else "missing Origin header"
    if origin == "null":
        return "opaque origin (null) not allowed"
    parts = _origin_parts(origin)
    if parts is None:
        return "malformed Origin header"
    if host:
        http_scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        own = _origin_parts(f"{http_scheme}://{host}")
        if own is not None and own[1] == parts[1]:
            return None
    if any(_pattern_matches(pattern, origin) for pattern in allowed):
        return None
    return f"origin {origin[:100]} not allowed"


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user: str
    expires_at: float | None = None
    info: Any = None
    channels: list[str] | None = None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TokenVerifier:
    """Verifies connection and subscription JWTs.

    HS256 with ``secret``; RS256/ES256 with ``public_key`` (PEM).  ``alg: none``
    and algorithms not configured are always refused.
    """

    secret: str | None = None
    public_key: str | None = None
    audience: str | None = None
    issuer: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.secret or self.public_key)

    def verify(self, token: str) -> TokenClaims:
        if not self.enabled:
            raise CommandError(ErrorCode.UNAUTHORIZED, "tokens are not configured on this server")
        key: Any
        if self.public_key:
            algorithms, key = ["RS256", "ES256"], self.public_key
        else:
            algorithms, key = ["HS256"], self.secret
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["sub"], "verify_aud": self.audience is not None},
            )
        except jwt.ExpiredSignatureError:
            raise CommandError(ErrorCode.TOKEN_EXPIRED, "token expired") from None
        except jwt.PyJWTError as exc:
            # Never echo the token; the exception class says enough.
            raise CommandError(
                ErrorCode.UNAUTHORIZED, f"invalid token ({type(exc).__name__})"
            ) from None
        channels = claims.get("channels")
        return TokenClaims(
            user=str(claims["sub"]),
            expires_at=float(claims["exp"]) if "exp" in claims else None,
            info=claims.get("info"),
            channels=[str(c) for c in channels] if isinstance(channels, list) else None,
            raw=claims,
        )
