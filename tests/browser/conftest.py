"""Browser tests: Playwright for Python driving Debian's Chromium against a real `herald serve`.

Chromium comes from the system (`apt-get install chromium`); a browser is never downloaded.
Tests skip with a clear reason when Chromium or Playwright is missing (scripts/test installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..helpers import ServerProcess

CHROMIUM = os.environ.get("HERALD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
API_KEY = "browser-test-key"
TOKEN_SECRET = "browser-test-secret-0123456789abcdef"
# Screenshots go to a scratch folder, so that a test run leaves the checkout clean;
# HERALD_SCREENSHOTS=docs/img refreshes the README's pictures.
SCREENSHOTS = Path(os.environ.get("HERALD_SCREENSHOTS") or Path(tempfile.gettempdir()) / "herald-screenshots")
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1180, "height": 760}
SMALL_DESKTOP = {"width": 1000, "height": 760}


# Package scope, not session: the sync Playwright API keeps an event loop running in this
# thread while it is open, which would break the asyncio tests that run after this package.
@pytest.fixture(scope="package")
def browser() -> Iterator[Any]:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="package")
def herald_server() -> Iterator[ServerProcess]:
    """`herald serve` with the demos, an API key, HS256 tokens and fast server pings."""
    server = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": TOKEN_SECRET,
            # Pings every second: the pages must answer them or be dropped (close 4002).
            "HERALD_PING_INTERVAL": "1",
            "HERALD_PONG_TIMEOUT": "1",
            "HERALD_LOG_LEVEL": "warning",
        }
    ).start()
    yield server
    server.stop()


@pytest.fixture
def new_page(browser: Any) -> Iterator[Callable[..., Any]]:
    """Open a page in a fresh browser context (its own storage, like another person's browser).

    Page errors (uncaught exceptions) fail the test; console messages are kept on
    ``page.console_messages``.
    """
    contexts: list[Any] = []

    def open_page(viewport: dict[str, int] | None = None) -> Any:
        context = browser.new_context(viewport=viewport or DESKTOP)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        page.console_messages = []
        page.page_errors = []
        page.on("console", lambda message: page.console_messages.append(message.text))
        page.on("pageerror", lambda error: page.page_errors.append(str(error)))
        return page

    yield open_page
    errors = [e for context in contexts for page in context.pages for e in page.page_errors]
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in pages: {errors}"


def api(server: ServerProcess, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the HTTP server API (POST with a JSON body, GET without)."""
    request = urllib.request.Request(
        server.http + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        method="POST" if body is not None else "GET",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def page_width(page: Any) -> tuple[int, int]:
    """``(document width, viewport width)``: the page scrolls sideways when the first is larger."""
    widths = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    return int(widths[0]), int(widths[1])


def screenshot(page: Any, name: str, *, full_page: bool = False) -> None:
    """Save a screenshot into ``SCREENSHOTS`` (``HERALD_SCREENSHOTS=docs/img`` for the README)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


class TcpProxy:
    """A TCP proxy between the browser and the server whose connections a test can cut.

    ``cut()`` drops every proxied connection (both directions, like a network failure)
    and refuses new ones until ``restore()``.  Pages are loaded *through* the proxy so
    that their WebSocket's Origin and Host agree, as in production behind a proxy.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarding = True
        self.accepted = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.forwarding:
                client.close()  # the "network" is down: the handshake fails
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self.accepted += 1
                self._sockets.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self) -> None:
        self.forwarding = False
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._drop(sock)

    def restore(self) -> None:
        self.forwarding = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self.listener.close()


@pytest.fixture
def proxy(herald_server: ServerProcess) -> Iterator[TcpProxy]:
    tcp_proxy = TcpProxy(herald_server.port)
    yield tcp_proxy
    tcp_proxy.close()
