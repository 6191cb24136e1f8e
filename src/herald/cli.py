"""The ``herald`` command: ``serve``, ``config``, ``connect``, ``publish``, ``presence``, ``history``.

``herald serve`` runs the server under uvicorn; every flag also has a
``HERALD_*`` environment variable (flags win).  ``herald connect URL`` is an
interactive WebSocket client like ``wscat -c`` (with ``--channel``, a protocol v1
client); ``publish``, ``presence`` and ``history`` call the HTTP API.  Those
client commands live in :mod:`herald.cli_client`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from . import __version__
from .cli_client import add_client_commands
from .urls import redact_url


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings given as ``serve``/``config`` flags (None: not given)."""
    return {
        "host": args.host,
        "port": args.port,
        "workers": args.workers,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "reload": args.reload or None,
        "broker": args.broker,
        "outbox": args.outbox,
        "outbox_table": args.outbox_table,
    }


def _load_settings(args: argparse.Namespace) -> Any:
    """Settings from flags > ``HERALD_*`` > the TOML file > defaults; None (after printing
    which field is wrong) when they are invalid."""
    from .config import Settings

    try:
        return Settings.load(args.config, **_overrides(args))
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(p) for p in error["loc"]) or "settings"
            got = error.get("input")
            # A broker URL may hold a password: never echo it.
            shown = "" if isinstance(got, dict) else f" (got {redact_url(str(got))[:80]!r})"
            problems.append(f"{where}: {error['msg']}{shown}")
        print(f"herald: invalid configuration: {'; '.join(problems)}", file=sys.stderr)
    except OSError as exc:
        print(f"herald: cannot read the configuration file: {exc}", file=sys.stderr)
    except ValueError as exc:  # TOML syntax (tomllib.TOMLDecodeError), JSON in an env list
        print(f"herald: invalid configuration: {exc}", file=sys.stderr)
    return None


def _config(args: argparse.Namespace) -> int:
    """``herald config``: the effective settings, secrets masked."""
    import json

    settings = _load_settings(args)
    if settings is None:
        return 2
    # SecretStr fields dump as "**********" in JSON mode; a broker URL may carry a password.
    effective = settings.model_dump(mode="json")
    effective["broker"] = redact_url(settings.broker)
    if settings.outbox is not None:
        effective["outbox"] = redact_url(settings.outbox)
    print(json.dumps(effective, indent=2, sort_keys=True))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .logs import log_config
    from .transports.uvicorn import uvicorn_ws_protocol

    overrides = _overrides(args)
    settings = _load_settings(args)
    if settings is None:
        return 2
    if settings.workers > 1 and settings.broker == "memory":
        print(
            "herald: --workers > 1 needs a shared broker: with the in-memory broker each worker "
            "would be a separate island (broadcasts and history would not reach clients on other "
            "workers). Use --broker redis://localhost:6379/0.",
            file=sys.stderr,
        )
        return 2
    if settings.outbox is not None and importlib.util.find_spec("asyncpg") is None:
        print("herald: --outbox needs asyncpg: pip install 'herald[outbox]'", file=sys.stderr)
        return 2
    # Workers are separate processes that build their settings from the environment.
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"HERALD_{name.upper()}"] = str(value)
    if args.config:
        os.environ["HERALD_CONFIG_FILE"] = args.config
    # Read by the HTTP protocol class in every worker (it is loaded by import string).
    os.environ["HERALD_HTTP_HEADER_TIMEOUT"] = str(settings.http_header_timeout)
    # Read by the ASGI WebSocket protocol classes (uvicorn gives them no Herald settings).
    os.environ["HERALD_MAX_MESSAGE_FRAGMENTS"] = str(settings.max_message_fragments)
    metrics_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        import tempfile

        # prometheus-client's multiprocess mode: every worker writes its metrics here, and
        # /metrics (answered by any worker) sums them.  Set before the workers import it.
        metrics_dir = tempfile.mkdtemp(prefix="herald-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    print(
        f"Herald {__version__} on http://{settings.host}:{settings.port} "
        f"(broker: {redact_url(settings.broker)}, workers: {settings.workers})",
        file=sys.stderr,
    )
    uvicorn.run(
        "herald.server:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers if not settings.reload else None,
        reload=settings.reload,
        log_level=settings.log_level,
        log_config=log_config(settings.log_format, settings.log_level),
        access_log=settings.access_log,
        ws=uvicorn_ws_protocol(settings.ws_impl, settings.fast_path),
        # Slow-loris defence: close connections whose request headers do not arrive in time.
        http="herald.transports.uvicorn_protocol:HeaderTimeoutHTTPProtocol",
        # The per-IP limit must see the real client: trust X-Forwarded-For only from these.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        # The protocol enforces its own limits; let uvicorn close oversized frames with 1009 too.
        ws_max_size=settings.max_message_size,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=max(int(settings.drain_timeout) + 1, 1),
    )
    if metrics_dir is not None:
        import shutil

        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


#: What a server setting without a description in :class:`~herald.config.Settings` means.
_SETTING_HELP = {
    "host": "Address to bind.",
    "port": "Port to listen on.",
    "workers": "Worker processes; more than 1 needs a shared broker (--broker).",
    "log_level": "Log level.",
    "reload": "Reload on code changes (development).",
}


def _setting_help(name: str) -> str:
    """A flag's help from the setting's description (config.py), its variable and default."""
    from .config import Settings

    field = Settings.model_fields[name]
    text = field.description or _SETTING_HELP[name]
    default = field.default
    shown = str(default).lower() if isinstance(default, bool) else default
    # argparse formats help with %: a literal one must be doubled.
    return f"{text} (HERALD_{name.upper()}, default {shown})".replace("%", "%%")


def _server_flags(parser: argparse.ArgumentParser) -> None:
    """The flags ``serve`` and ``config`` share: each overrides one setting."""
    parser.add_argument("--host", help=_setting_help("host"))
    parser.add_argument("--port", type=int, help=_setting_help("port"))
    parser.add_argument("--workers", type=int, help=_setting_help("workers"))
    parser.add_argument("--reload", action="store_true", help=_setting_help("reload"))
    parser.add_argument("--log-level", choices=LOG_LEVELS, help=_setting_help("log_level"))
    parser.add_argument("--broker", help=_setting_help("broker"))
    parser.add_argument("--outbox", help=_setting_help("outbox"))
    parser.add_argument("--outbox-table", help=_setting_help("outbox_table"))
    _settings_flags(parser)


LOG_LEVELS = ["critical", "error", "warning", "info", "debug", "trace"]


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-format", choices=["auto", "json", "text"], help=_setting_help("log_format"))
    parser.add_argument(
        "--config",
        default=os.environ.get("HERALD_CONFIG_FILE") or None,
        help="TOML file with settings; environment and flags win (HERALD_CONFIG_FILE)",
    )


def _bench(args: argparse.Namespace) -> int:
    import subprocess
    from pathlib import Path

    # The suite is not installed with the package: look in the working directory, then in the
    # checkout this module comes from (src/herald/cli.py -> repository root).
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "bench" / "run.py").is_file():
            extra = [a for a in args.bench_args if a != "--"]
            return subprocess.call([sys.executable, "-m", "bench", *extra], cwd=root)
    print(
        "herald: the benchmark suite lives in the repository's bench/ folder; run this from a "
        "source checkout (git clone ...; pip install -e '.[bench]').",
        file=sys.stderr,
    )
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="herald", description="Real-time messaging for FastAPI.")
    parser.add_argument("--version", action="version", version=f"herald {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the Herald server",
        description="Every setting also has a HERALD_* environment variable and a TOML key "
        "(docs/configuration.md); flags win.",
    )
    _server_flags(serve)
    serve.set_defaults(func=_serve)

    config = commands.add_parser(
        "config",
        help="print the effective configuration (secrets masked) and exit",
        description="Print the settings `herald serve` would use with the same flags, "
        "environment and file, as JSON, with secrets masked.  Exit status 2 when invalid.",
    )
    _server_flags(config)
    config.set_defaults(func=_config)

    bench = commands.add_parser(
        "bench",
        help="run the benchmark suite (needs the repository's bench/ folder)",
        description="Runs `python -m bench` from Herald's source checkout; arguments go to it "
        "(try `herald bench -- --help`).  See docs/benchmarks.md.",
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for python -m bench")
    bench.set_defaults(func=_bench)

    # connect, publish, presence, history: the client side lives in cli_client.py.
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    if asyncio.iscoroutine(result):
        try:
            return int(asyncio.run(result))
        except KeyboardInterrupt:
            return 130
    return int(result)
