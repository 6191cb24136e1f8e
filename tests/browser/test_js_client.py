"""/static/herald.js, the browser client, driven through its API in Chromium."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest

from ..helpers import ServerProcess, free_port
from .conftest import TOKEN_SECRET, api

pytestmark = pytest.mark.browser

IMPORT = "const { HeraldClient, HeraldError } = await import('/static/herald.js');"


def run_js(page: Any, body: str, arg: Any = None) -> Any:
    """Run ``body`` as an async function of ``arg`` with HeraldClient/HeraldError imported."""
    return page.evaluate("async (arg) => {" + IMPORT + body + "}", arg)


def client_page(new_page: Any, server: ServerProcess) -> Any:
    page = new_page()
    page.goto(server.http + "/static/index.html")
    return page


def test_api_round_trip(herald_server: ServerProcess, new_page: Any) -> None:
    page = client_page(new_page, herald_server)
    channel = "chat:js-" + secrets.token_hex(3)
    result = page.evaluate(
        """async (channel) => {
        const { HeraldClient, HeraldError } = await import('/static/herald.js');
        const client = new HeraldClient({ name: "api-test" });
        const events = [];
        for (const type of ["connecting", "connected", "subscribed", "publication"]) client.on(type, () => events.push(type));
        const info = await client.connect();
        const got = [];
        const sub = await client.subscribe(channel, { onPublication: (p) => got.push([p.offset, p.data]) });
        const positions = [];
        for (const n of [1, 2, 3]) positions.push(await client.publish(channel, { n }));
        while (got.length < 3) await new Promise((r) => setTimeout(r, 10));
        const history = await client.history(channel, { limit: 2, reverse: true });
        const presence = await client.presence(channel);
        const stats = await client.presenceStats(channel);
        const errors = {};
        for (const [name, call] of [
          ["rpc", () => client.rpc("no.such.method", { x: 1 })],
          ["channel", () => client.subscribe("bad channel!", {})],
          ["namespace", () => client.subscribe("nope:x", {})],
          ["dashboard", () => client.publish("dashboard:metrics", { fake: true })],
          ["twice", () => client.subscribe(channel, {})],
        ]) {
          try { await call(); errors[name] = "no error"; }
          catch (err) { errors[name] = [err instanceof HeraldError, err.code]; }
        }
        await client.unsubscribe(channel);
        await client.publish(channel, { n: 4 });
        await client.ping();
        const after = got.length;
        client.close();
        return { info, got, positions, sub: { offset: sub.offset, epoch: sub.epoch, active: sub.active },
                 history, presence, stats, errors, after, events, state: client.state };
    }""",
        channel,
    )
    assert result["info"]["client"]
    assert result["info"]["ping_interval"] == 1
    assert [offset for offset, _ in result["got"]] == [p["offset"] for p in result["positions"]]
    assert [data for _, data in result["got"]] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert result["sub"]["offset"] == result["positions"][-1]["offset"]
    assert [p["data"] for p in result["history"]["publications"]] == [{"n": 3}, {"n": 2}]
    assert list(result["presence"]) == [result["info"]["client"]]
    assert result["presence"][result["info"]["client"]]["info"] == {"name": "api-test"}
    assert result["stats"]["num_clients"] == 1
    assert result["errors"] == {
        "rpc": [True, 113],
        "channel": [True, 106],
        "namespace": [True, 107],
        "dashboard": [True, 110],
        "twice": [True, 108],
    }
    assert result["after"] == 3  # nothing after unsubscribe
    assert result["events"][:2] == ["connecting", "connected"]
    assert result["events"].count("publication") == 3
    assert result["state"] == "closed"


def test_history_option_then_live_without_gap_or_duplicate(
    herald_server: ServerProcess, new_page: Any
) -> None:
    channel = "chat:hist-" + secrets.token_hex(3)
    for n in range(1, 6):
        api(herald_server, "/api/publish", {"channel": channel, "data": n})
    page = client_page(new_page, herald_server)
    run_js(
        page,
        """
        const channel = arg;
        window.got = [];
        const client = new HeraldClient();
        window.client = client;
        await client.connect();
        await client.subscribe(channel, { history: 3, onPublication: (p) => window.got.push(p.data) });
    """,
        channel,
    )
    api(herald_server, "/api/publish", {"channel": channel, "data": 6})
    page.wait_for_function("window.got.length >= 4")
    assert page.evaluate("window.got") == [3, 4, 5, 6]


def test_resume_with_since_reports_recovery(herald_server: ServerProcess, new_page: Any) -> None:
    channel = "chat:since-" + secrets.token_hex(3)
    first = api(herald_server, "/api/publish", {"channel": channel, "data": "a"})
    api(herald_server, "/api/publish", {"channel": channel, "data": "b"})
    api(herald_server, "/api/publish", {"channel": channel, "data": "c"})
    page = client_page(new_page, herald_server)
    result = run_js(
        page,
        """
        const [channel, since] = arg;
        const client = new HeraldClient();
        const recovered = [];
        client.on("recovered", (d) => recovered.push([d.channel.split(":")[0], d.recovered, d.missed]));
        await client.connect();
        const got = [];
        await client.subscribe(channel, { since, onPublication: (p) => got.push(p.data) });
        // A position from another epoch (e.g. before a broker restart) cannot be resumed.
        const lost = [];
        await client.subscribe(channel.replace("since", "lost"), { since: { offset: 7, epoch: "gone" },
                                                                   onPublication: (p) => lost.push(p.data) });
        client.close();
        return { got, lost, recovered };
    """,
        [channel, first],
    )
    assert result["got"] == ["b", "c"]
    assert result["lost"] == []
    assert result["recovered"] == [["chat", True, 2], ["chat", False, 0]]


def test_reconnects_with_backoff_and_answers_pings(herald_server: ServerProcess, new_page: Any) -> None:
    """The server pings every second and drops clients that do not answer within a second."""
    page = client_page(new_page, herald_server)
    run_js(
        page,
        """
        const client = new HeraldClient({ minDelay: 100, maxDelay: 400 });
        window.log = [];
        for (const type of ["connected", "disconnected", "reconnecting"]) {
          client.on(type, (d) => window.log.push([type, d.code ?? null, d.delay ?? null]));
        }
        // Count the pongs this client sends.
        window.pongs = 0;
        client.on("connected", () => {
          const ws = client._ws, send = ws.send.bind(ws);
          ws.send = (text) => { if (text === '{"type":"pong"}') window.pongs += 1; return send(text); };
        });
        window.client = client;
        await client.connect();
    """,
    )
    # Three pings answered: the connection outlives ping_interval + pong_timeout (2 s).
    page.wait_for_function("window.pongs >= 3", timeout=8000)
    assert page.evaluate("window.log") == [["connected", None, None]]

    page.evaluate("window.client.reconnect()")  # drop the socket (close 4000: reconnect)
    page.wait_for_function("window.log.filter(e => e[0] === 'connected').length === 2")
    log = page.evaluate("window.log")
    assert [entry[0] for entry in log] == ["connected", "disconnected", "reconnecting", "connected"]
    assert log[1][1] == 4000
    assert 100 <= log[2][2] <= 400


def test_close_code_4500_range_stops_reconnecting(herald_server: ServerProcess, new_page: Any) -> None:
    user = "user-" + secrets.token_hex(3)
    token = jwt.encode({"sub": user, "exp": int(time.time()) + 600}, TOKEN_SECRET, algorithm="HS256")
    page = client_page(new_page, herald_server)
    info = run_js(
        page,
        """
        const token = arg;
        const client = new HeraldClient({ token: () => Promise.resolve(token), minDelay: 50 });
        window.client = client;
        window.log = [];
        for (const type of ["disconnect", "disconnected", "reconnecting"]) client.on(type, (d) => window.log.push([type, d]));
        return await client.connect();
    """,
        token,
    )
    assert info["user"] == user
    assert api(herald_server, "/api/disconnect", {"user": user}) == {"disconnected": 1}
    page.wait_for_function("window.log.some(e => e[0] === 'disconnected')")
    log = page.evaluate("window.log")
    disconnected = next(d for kind, d in log if kind == "disconnected")
    assert disconnected["code"] == 4502
    assert disconnected["reconnect"] is False
    assert not any(kind == "reconnecting" for kind, _ in log)
    assert page.evaluate("window.client.state") == "closed"
    assert page.evaluate("window.client._reconnectTimer") is None
    # Commands on a closed client fail at once with a clear error.
    error = page.evaluate(
        "() => window.client.publish('chat:x', 1).then(() => 'sent', (e) => [e.name, e.code, e.message])"
    )
    assert error[0:2] == ["HeraldError", 3]


def test_expired_token_is_refreshed_from_the_token_function(
    herald_server: ServerProcess, new_page: Any
) -> None:
    user = "user-" + secrets.token_hex(3)
    now = int(time.time())
    short = jwt.encode({"sub": user, "exp": now + 2}, TOKEN_SECRET, algorithm="HS256")
    long = jwt.encode({"sub": user, "exp": now + 3600}, TOKEN_SECRET, algorithm="HS256")
    page = client_page(new_page, herald_server)
    run_js(
        page,
        """
        const [short, long] = arg;
        window.calls = 0;
        window.log = [];
        const client = new HeraldClient({ token: () => (window.calls++ === 0 ? short : long) });
        const refresh = client.refresh.bind(client);
        client.refresh = (...a) => refresh(...a).then((r) => (window.refreshed = r));
        for (const type of ["error", "disconnected"]) client.on(type, (d) => window.log.push(type));
        window.client = client;
        await client.connect();
    """,
        [short, long],
    )
    # At expiry the server pushes `refresh`; the client answers with the function's next token.
    page.wait_for_function("window.refreshed !== undefined", timeout=10_000)
    refreshed = page.evaluate("window.refreshed")
    assert refreshed["expires_at"] >= now + 3600
    assert page.evaluate("window.calls") == 2
    assert page.evaluate("window.log") == []
    assert page.evaluate("window.client.state") == "connected"


def test_command_timeout_while_server_unreachable(new_page: Any, herald_server: ServerProcess) -> None:
    page = client_page(new_page, herald_server)
    closed_port = free_port()
    result = run_js(
        page,
        """
        const port = arg;
        const client = new HeraldClient(`ws://127.0.0.1:${port}/connect`, { minDelay: 50, maxDelay: 100 });
        let attempts = 0;
        client.on("reconnecting", () => { attempts += 1; });
        client.connect().catch(() => {});
        const started = Date.now();
        const outcome = await client.publish("chat:x", 1, { timeout: 300 }).then(() => "sent", (e) => [e.code, e.message]);
        const elapsed = Date.now() - started;
        client.close();
        return { outcome, elapsed, attempts };
    """,
        closed_port,
    )
    assert result["outcome"][0] == 1  # ClientErrorCode.TIMEOUT
    assert "not connected" in result["outcome"][1]
    assert 250 <= result["elapsed"] < 2000
    assert result["attempts"] >= 2  # it kept trying, with backoff


class _ForeignSite:
    """A page on another origin (its own port) that opens a WebSocket to Herald."""

    def __init__(self, target: str) -> None:
        page = f"""<!doctype html><title>foreign</title><script>
          window.result = {{ opened: false, error: false, code: null }};
          const ws = new WebSocket("{target}", ["herald.v1"]);
          ws.onopen = () => {{ window.result.opened = true; }};
          ws.onerror = () => {{ window.result.error = true; }};
          ws.onclose = (e) => {{ window.result.code = e.code; }};
        </script>""".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def foreign_site(herald_server: ServerProcess) -> Iterator[_ForeignSite]:
    site = _ForeignSite(herald_server.ws("/connect"))
    yield site
    site.close()


def test_cross_origin_page_is_refused(
    herald_server: ServerProcess, new_page: Any, foreign_site: _ForeignSite
) -> None:
    page = new_page()
    # Chromium logs the refused handshake: "... Unexpected response code: 403".
    with page.expect_console_message(lambda message: "403" in message.text) as refused:
        page.goto(foreign_site.url)
    assert "Unexpected response code: 403" in refused.value.text
    page.wait_for_function("window.result.code !== null")
    result = page.evaluate("window.result")
    assert result == {"opened": False, "error": True, "code": 1006}
    # The same server accepts its own pages (same origin).
    own = new_page()
    own.goto(herald_server.http + "/static/index.html")
    opened = own.evaluate(
        """(url) => new Promise((resolve) => {
        const ws = new WebSocket(url, ["herald.v1"]);
        ws.onopen = () => { resolve(ws.protocol); ws.close(); };
        ws.onclose = (e) => resolve("closed " + e.code);
    })""",
        herald_server.ws("/connect"),
    )
    assert opened == "herald.v1"
