"""Settings: ``HERALD_*`` environment variables, an optional TOML file, CLI flags.

Precedence, highest first: CLI flags > environment variables > TOML file > defaults.
Lists accept JSON (``["a","b"]``) or comma-separated text (``a,b``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .brokers.options import check_broker_options
from .exceptions import ConfigError


class NamespaceOptions(BaseModel):
    """What channels of one namespace (``chat`` in ``chat:lobby``) can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_size: int = Field(default=100, ge=0, le=1_000_000, description="Publications kept.")
    history_ttl: float = Field(default=600.0, ge=0, description="Seconds history is kept (0: forever).")
    presence: bool = Field(default=True, description="Track who is subscribed.")
    join_leave: bool = Field(default=True, description="Push join/leave to subscribers.")
    allow_publish: bool = Field(default=True, description="Clients may publish (the API always may).")
    allow_subscribe: bool = True
    allow_history: bool = Field(default=True, description="Clients may read history.")
    allow_presence: bool = Field(default=True, description="Clients may read presence.")
    allow_anonymous: bool = Field(default=True, description="Clients without a user id may use it.")
    private: bool = Field(
        default=False,
        description="Subscribing needs a subscription token for the channel, or a connection "
        "token whose `channels` claim grants it.",
    )


#: What can stand before the first ":" of a client's channel name (see protocol/channels.py).
_NAMESPACE_NAME = re.compile(r"[A-Za-z0-9_.@=,!~\-]+")


def _default_namespaces() -> dict[str, NamespaceOptions]:
    # Only channels without a namespace ("lobby"): an application names the namespaces
    # it uses.  The demo pages' namespaces (chat, dashboard, game) are added by
    # herald.demos when the demos are served.
    return {"": NamespaceOptions()}


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Every setting of a Herald node.  See docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="HERALD_", extra="forbid", validate_default=True)

    # -- server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    log_level: str = Field(default="info", pattern="^(critical|error|warning|info|debug|trace)$")
    log_format: str = Field(
        default="auto",
        pattern="^(auto|json|text)$",
        description="json (one object per line), text, or auto: text on a terminal, else json.",
    )
    metrics: bool = Field(default=True, description="Serve Prometheus metrics at /metrics.")
    admin: bool = Field(
        default=True, description="Serve the admin page at /admin (needs api_key, or loopback)."
    )
    reload: bool = False
    broker: str = Field(
        default="memory",
        description="memory, redis://host:port/db or nats://host:port; broker settings go in the "
        "URL's query string, e.g. redis://host:6379/0?prefix=app&stream_meta_ttl=600 (see "
        "docs/configuration.md).",
    )
    demos: bool = Field(default=True, description="Serve the demo pages at /.")
    ws_impl: str = Field(
        default="websockets-sansio",
        pattern="^(wsproto|websockets|websockets-sansio|auto)$",
        description="uvicorn WebSocket implementation used by `herald serve`.",
    )
    fast_path: bool = Field(
        default=True,
        description="`herald serve` writes fan-out frames straight to each socket (framed once, "
        "still bounded per connection); only with ws_impl websockets-sansio. See docs/benchmarks.md.",
    )
    native_routes: bool = Field(
        default=True,
        description="With the fast path, Herald's WebSocket routes (/connect, /ws, /ws_json, "
        "/ws_broadcast) are served by Herald's own WebSocket protocol, without ASGI: about 5 KiB "
        "per idle connection instead of about 29. ASGI middleware does not see them; set false "
        "when yours must. See docs/library.md.",
    )

    # -- security
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed besides the server's own, e.g. https://app.example.com, "
        "https://*.example.com, or * for any.",
    )
    allow_missing_origin: bool = Field(
        default=True,
        description="Accept handshakes without an Origin header (non-browser clients).",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names clients may use, e.g. chat.example.com, *.example.com, or * for "
        "any; loopback names always pass. Empty: the bind host, the hosts of allowed_origins and "
        "IP address literals (DNS-rebinding defence, see docs/security.md).",
    )
    api_key: SecretStr | None = Field(default=None, description="Key for the HTTP API.")
    token_secret: SecretStr | None = Field(default=None, description="HS256 secret for connection JWTs.")
    token_public_key: str | None = Field(default=None, description="PEM public key for RS256/ES256 JWTs.")
    token_audience: str | None = None
    token_issuer: str | None = None
    token_jwks_file: str | None = Field(
        default=None, description="JWKS file with RS256/ES256 public keys (chosen by `kid`)."
    )
    token_leeway: float = Field(default=0.0, ge=0, description="Clock skew tolerated on `exp`.")
    token_refresh_grace: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client whose token expired has to send `refresh` before 4004.",
    )
    max_connections_per_user: int = Field(
        default=100, ge=0, description="Open connections per user id on one node (0: no limit)."
    )
    max_connections_per_ip: int = Field(
        default=0,
        ge=0,
        description="Open WebSocket connections per client IP on one node (0: no limit). "
        "Behind a proxy, set forwarded_allow_ips so the real client IP is used.",
    )
    max_api_body_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest request body the HTTP API reads (413 beyond). Default: four times "
        "max_message_size, at least 1 MiB.",
    )
    api_body_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds an HTTP API request has to send its whole body (408 beyond).",
    )
    http_header_timeout: float = Field(
        default=10.0,
        ge=0,
        description="`herald serve` closes connections whose HTTP request headers have not "
        "arrived within this many seconds (slow-loris defence; 0: off).",
    )
    forwarded_allow_ips: str | None = Field(
        default=None,
        description="IPs of proxies trusted for X-Forwarded-For/-Proto (uvicorn's setting; "
        "default 127.0.0.1).",
    )

    # -- limits
    max_message_size: int = Field(default=64 * 1024, ge=128, le=64 * 1024 * 1024)
    max_message_fragments: int = Field(
        default=4096,
        ge=1,
        le=1_000_000,
        description="Most frames one inbound WebSocket message may arrive in; more close with "
        "1009 (empty continuation frames cannot pile up). Browsers never fragment.",
    )
    max_json_depth: int = Field(default=32, ge=1, le=1000)
    max_subscriptions: int = Field(default=128, ge=1)
    max_channel_length: int = Field(default=255, ge=1, le=1024)
    max_history_limit: int = Field(
        default=1000, ge=1, description="Most publications one history call returns."
    )
    max_queue_messages: int = Field(
        default=1024, ge=1, description="Outbound frames buffered per connection."
    )
    max_queue_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="Outbound bytes buffered per connection."
    )
    max_rpc_in_flight: int = Field(default=16, ge=1)
    max_json_keys: int = Field(
        default=1000, ge=1, description="Most object keys in one inbound frame (all levels)."
    )
    rate_limit: float = Field(
        default=200.0, ge=0, description="Inbound commands per second per connection (0: off)."
    )
    rate_limit_burst: int = Field(default=1000, ge=1, description="Commands allowed in a burst.")
    rate_limit_strikes: int = Field(
        default=50,
        ge=1,
        description="Rate-limited commands tolerated (refilling over 10 s) before close 4504.",
    )

    # -- timing (seconds)
    ping_interval: float = Field(default=25.0, ge=0, description="Server ping period; 0 turns pings off.")
    pong_timeout: float = Field(default=10.0, gt=0)
    handshake_timeout: float = Field(default=10.0, gt=0, description="Time to send the connect command.")
    idle_timeout: float = Field(
        default=0.0,
        ge=0,
        description="Close connections without subscriptions idle this long (0: never).",
    )
    presence_ttl: float = Field(default=60.0, gt=0)
    drain_timeout: float = Field(
        default=5.0, ge=0, description="Shutdown waits this long for queues to flush."
    )

    namespaces: dict[str, NamespaceOptions] = Field(default_factory=_default_namespaces)

    @field_validator("allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("broker")
    @classmethod
    def _broker_options(cls, value: str) -> str:
        try:
            check_broker_options(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("namespaces")
    @classmethod
    def _default_namespace(cls, value: dict[str, NamespaceOptions]) -> dict[str, NamespaceOptions]:
        bad = sorted(name for name in value if name and not _NAMESPACE_NAME.fullmatch(name))
        if bad:
            # A namespace is the part of a channel name before its first ":": a name that
            # no channel can have would configure nothing, silently.
            raise ValueError(
                f"invalid namespace name(s) {', '.join(map(repr, bad))}: use letters, digits "
                "and _ . @ = , ! ~ - (no ':', '#' or '$')"
            )
        if "" not in value:
            value = {"": NamespaceOptions(), **value}
        return value

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings: ``overrides`` (CLI) > environment > TOML ``config_file`` > defaults."""
        file_values: dict[str, Any] = {}
        if config_file is not None:
            with open(config_file, "rb") as stream:
                file_values = tomllib.load(stream)
            file_values = file_values.get("herald", file_values)
        # Environment beats the file: drop file keys the environment sets.
        env_settings = cls()
        env_set = env_settings.model_fields_set
        merged = {k: v for k, v in file_values.items() if k not in env_set}
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**merged)
