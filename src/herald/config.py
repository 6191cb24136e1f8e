"""Settings: ``HERALD_*`` environment variables, an optional TOML file, CLI flags.

Precedence, highest first: CLI flags > environment variables > TOML file > defaults.
Lists accept JSON (``["a","b"]``) or comma-separated text (``a,b``).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .brokers.options import check_broker_options
from .exceptions import ConfigError


class NamespaceOptions(BaseModel):
    """What channels of one namespace (``chat`` in ``chat:lobby``) can do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_size: int = Field(default=100, ge=0, le=1_000_000, description="Publications kept.")
    history_ttl: float = Field(default=600.0, ge=0, description="Seconds history is kept (0: forever).")
    presence: bool = Field(default=True, description="Track who is subscribed.")
    join_leave: bool = Field(
        default=False,
        description="Push join/leave to subscribers (off by default, as in Centrifugo: every "
        "join is pushed to every subscriber, so the work grows with the square of a channel's size).",
    )
    join_leave_max_subscribers: int = Field(
        default=100,
        ge=0,
        description="With join_leave: no join/leave pushes on a node while the channel has more "
        "subscribers than this there (0: no bound).",
    )
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
    # Proxy hooks per namespace (docs/backends.md): None follows the node's
    # proxy_<event>_url; false never asks the backend; true needs that URL; a URL
    # asks that endpoint for this namespace's channels instead.
    proxy_subscribe: bool | str | None = Field(
        default=None,
        description="Ask the backend before a subscribe (and reads of unsubscribed channels): "
        "unset follows proxy_subscribe_url, false never, true needs proxy_subscribe_url, a URL "
        "overrides it for this namespace.",
    )
    proxy_publish: bool | str | None = Field(
        default=None, description="As proxy_subscribe, for client publishes (proxy_publish_url)."
    )
    proxy_sub_refresh: bool | str | None = Field(
        default=None,
        description="As proxy_subscribe, for subscription expiry (proxy_sub_refresh_url).",
    )

    @field_validator("proxy_subscribe", "proxy_publish", "proxy_sub_refresh")
    @classmethod
    def _proxy_url(cls, value: bool | str | None) -> bool | str | None:
        return check_proxy_url(value) if isinstance(value, str) else value


#: Headers that describe the WebSocket request itself: never forwarded to a proxy backend.
UNFORWARDABLE_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "expect",
        "cookie",
    }
)
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


def check_proxy_url(url: str) -> str:
    """A proxy backend endpoint: an absolute http(s) URL with a host, else ``ValueError``."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"proxy URL must be http:// or https:// with a host, got {url!r}")
    return url


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
    access_log: bool = Field(
        default=False,
        description="One INFO line per HTTP request and per WebSocket connection (accepted, "
        "connected, disconnected). Off: the per-connection lines are DEBUG (in a connect storm "
        "they cost about a third of a connect's CPU).",
    )
    metrics: bool = Field(default=True, description="Serve Prometheus metrics at /metrics.")
    admin: bool = Field(
        default=True, description="Serve the admin page at /admin (needs api_key, or loopback)."
    )
    reload: bool = False
    broker: str = Field(
        default="memory",
        description="memory, redis://host:port/db or nats://host:port; broker settings go in the "
        "URL's query string, e.g. redis://host:6379/0?prefix=app&stream_meta_ttl=600 or "
        "nats://host:4222?jetstream=1&prefix=app (see "
        "docs/configuration.md). Several Redis URLs separated by commas "
        "(redis://a:6379/0,redis://b:6379/0; a list in the TOML file), spread channels over "
        "those Redis instances; redis+cluster://host:port,host:port uses a Redis Cluster "
        "(docs/scaling.md).",
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
        default=100,
        ge=0,
        description="Open connections per user id (0: no limit), counted across every node on "
        "a Redis broker, per node otherwise (docs/security.md).",
    )
    max_connections_per_ip: int = Field(
        default=0,
        ge=0,
        description="Open connections per client IP on the WebSocket and HTTP stream routes "
        "(0: no limit), counted like max_connections_per_user. Behind a proxy, set "
        "forwarded_allow_ips so the real client IP is used.",
    )
    connection_lease_ttl: float = Field(
        default=15.0,
        ge=0,
        description="With a Redis broker: seconds a node's connection counts outlive its last "
        "refresh (every third of this), so a node that died stops counting within this time. "
        "0: count per node, Redis untouched.",
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
    write_delay: float = Field(
        default=0.0,
        ge=0,
        le=1.0,
        description="Seconds a fanned-out frame may wait so that several leave a connection in "
        "one write (less CPU, more latency); replies are not delayed. 0: written at the end of "
        "the event loop's turn.",
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
    idempotency_window: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Seconds a publish's idempotency_key is remembered: a retry with the same key "
        "on the same channel within it returns the original position and publishes nothing.",
    )

    # -- proxy hooks (docs/backends.md): the app's backend decides over HTTP
    proxy_connect_url: str | None = Field(
        default=None, description="Backend endpoint asked at each connect (may set user, info, expiry)."
    )
    proxy_refresh_url: str | None = Field(
        default=None, description="Backend endpoint asked when a connection's expiry arrives."
    )
    proxy_subscribe_url: str | None = Field(
        default=None, description="Backend endpoint asked before a subscribe (see proxy_subscribe)."
    )
    proxy_sub_refresh_url: str | None = Field(
        default=None, description="Backend endpoint asked when a subscription's expiry arrives."
    )
    proxy_publish_url: str | None = Field(
        default=None, description="Backend endpoint asked before a client publish (may replace data)."
    )
    proxy_rpc_url: str | None = Field(
        default=None, description="Backend endpoint answering RPC methods no in-process handler has."
    )
    proxy_timeout: float = Field(
        default=1.0, gt=0, le=60, description="Seconds one backend call may take (then: proxy timeout)."
    )
    proxy_max_in_flight: int = Field(
        default=128,
        ge=1,
        le=100_000,
        description="Backend calls in flight per node; one more is refused at once (proxy busy).",
    )
    proxy_headers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Headers of the WebSocket handshake forwarded to the backend, e.g. "
        "authorization,x-request-id (use proxy_cookies for cookies).",
    )
    proxy_cookies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Cookies of the WebSocket handshake forwarded to the backend, by name.",
    )

    # -- transactional outbox (docs/backends.md)
    outbox: str | None = Field(
        default=None,
        description="postgresql://user:password@host:port/db: publish the rows committed to the outbox "
        "table there, exactly once, in commit order per channel (needs herald[outbox]).",
    )
    outbox_table: str = Field(default="herald_outbox", description="The outbox table (schema.table allowed).")

    namespaces: dict[str, NamespaceOptions] = Field(default_factory=_default_namespaces)

    @field_validator("proxy_headers", "proxy_cookies", mode="before")
    @classmethod
    def _parse_proxy_lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator(
        "proxy_connect_url",
        "proxy_refresh_url",
        "proxy_subscribe_url",
        "proxy_sub_refresh_url",
        "proxy_publish_url",
        "proxy_rpc_url",
    )
    @classmethod
    def _proxy_urls(cls, value: str | None) -> str | None:
        return check_proxy_url(value) if value is not None else None

    @field_validator("proxy_headers")
    @classmethod
    def _proxy_header_names(cls, value: list[str]) -> list[str]:
        names = [name.strip().lower() for name in value]
        refused = sorted(set(names) & UNFORWARDABLE_HEADERS)
        if refused:
            raise ValueError(
                f"these headers cannot be forwarded to the proxy backend: {', '.join(refused)} "
                "(they describe the WebSocket request itself; forward cookies with proxy_cookies)"
            )
        bad = [name for name in names if not _HEADER_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"invalid header name(s): {', '.join(map(repr, bad))}")
        return names

    @model_validator(mode="after")
    def _proxy_namespaces(self) -> Settings:
        # `proxy_subscribe = true` in a namespace without the node's URL would silently
        # ask nobody: refuse it at start-up instead.
        for name, options in self.namespaces.items():
            for event in ("subscribe", "publish", "sub_refresh"):
                if getattr(options, f"proxy_{event}") is True and getattr(self, f"proxy_{event}_url") is None:
                    raise ValueError(
                        f"namespace {name!r}: proxy_{event} = true needs proxy_{event}_url "
                        "(or give the namespace its own URL)"
                    )
        return self

    @field_validator("allowed_origins", "allowed_hosts", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("outbox", "outbox_table")
    @classmethod
    def _outbox(cls, value: str | None, info: ValidationInfo) -> str | None:
        from .outbox.schema import check_dsn, check_table_name

        if value is None:
            return None
        try:
            return check_dsn(value) if info.field_name == "outbox" else check_table_name(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("broker", mode="before")
    @classmethod
    def _broker_list(cls, value: Any) -> Any:
        # A list of Redis URLs (TOML ``broker = ["redis://a", "redis://b"]``): the shards.
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return ",".join(value)
        return value

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
