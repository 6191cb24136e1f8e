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
from .conftest import API_KEY, TOKEN_SECRET, api

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
    assert api(herald_server, "/api/disconnect", {"user": user})["disconnected"] == 1
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
    page = client_page(new_page, herald_server)
    # Made once the page is up (loading it can take seconds on a busy machine): the short
    # token must still be valid when the client connects with it.
    now = int(time.time())
    short = jwt.encode({"sub": user, "exp": now + 3}, TOKEN_SECRET, algorithm="HS256")
    long = jwt.encode({"sub": user, "exp": now + 3600}, TOKEN_SECRET, algorithm="HS256")
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
    page.wait_for_function("window.refreshed !== undefined", timeout=15_000)
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
        // It keeps trying meanwhile, with backoff (on a busy machine the browser may not
        // have seen two refused attempts within the 300 ms yet: wait for them, bounded).
        const deadline = Date.now() + 5000;
        while (attempts < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
        client.close();
        return { outcome, elapsed, attempts };
    """,
        closed_port,
    )
    assert result["outcome"][0] == 1  # ClientErrorCode.TIMEOUT
    assert "not connected" in result["outcome"][1]
    assert 250 <= result["elapsed"] < 2000
    assert result["attempts"] >= 2  # it kept trying


# A namespace whose channels need a subscription token, and a short grace period after
# a subscription token expires, so that the expiry tests take a few seconds.
SUB_GRACE = 1.0


@pytest.fixture(scope="module")
def token_server() -> Iterator[ServerProcess]:
    server = ServerProcess(
        env={
            "HERALD_API_KEY": API_KEY,
            "HERALD_TOKEN_SECRET": TOKEN_SECRET,
            "HERALD_TOKEN_REFRESH_GRACE": str(SUB_GRACE),
            "HERALD_NAMESPACES": '{"team": {"private": true}}',
            "HERALD_DEMOS": "false",
            "HERALD_LOG_LEVEL": "warning",
        }
    ).start()
    yield server
    server.stop()


def connection_token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 600}, TOKEN_SECRET, algorithm="HS256")


def subscription_token(user: str, channel: str, exp: int) -> str:
    claims = {"sub": user, "typ": "subscription", "channel": channel, "exp": exp}
    return jwt.encode(claims, TOKEN_SECRET, algorithm="HS256")


# Records the frames the client sends and receives (wrapped again on every connection).
RECORD_FRAMES = """
        window.sent = [];
        window.received = [];
        client.on("connected", () => {
          const ws = client._ws, send = ws.send.bind(ws);
          ws.send = (text) => { window.sent.push(JSON.parse(text)); return send(text); };
          ws.addEventListener("message", (e) => window.received.push(JSON.parse(e.data)));
        });
"""


def test_subscription_token_function_is_called_on_sub_refresh_and_resubscribe(
    token_server: ServerProcess, new_page: Any
) -> None:
    """A private channel subscribed with a token function outlives its token's expiry:
    the server's sub_refresh push is answered with the function's next token, and a
    resubscribe after a reconnect calls the function again and sends its token."""
    page = client_page(new_page, token_server)
    user = "user-" + secrets.token_hex(3)
    channel = "team:fn-" + secrets.token_hex(3)
    short_exp = int(time.time()) + 3
    tokens = [
        subscription_token(user, channel, short_exp),
        subscription_token(user, channel, short_exp + 600),
        subscription_token(user, channel, short_exp + 700),
    ]
    run_js(
        page,
        """
        const [connectionToken, channel, tokens] = arg;
        const client = new HeraldClient({ token: connectionToken, minDelay: 50, maxDelay: 100 });
        window.client = client;
        window.calls = [];
        window.got = [];
        window.events = [];
        """
        + RECORD_FRAMES
        + """
        for (const type of ["unsubscribed", "error", "disconnected"]) client.on(type, (d) => window.events.push([type, d]));
        client.on("subscribed", (d) => window.events.push(["subscribed", d.resubscribed]));
        await client.connect();
        // An async function: the client awaits its promise.
        const fresh = async () => {
          window.calls.push(Date.now() / 1000);
          await new Promise((r) => setTimeout(r, 5));
          return tokens[window.calls.length - 1];
        };
        const sub = await client.subscribe(channel, { token: fresh, onPublication: (p) => window.got.push(p.data) });
        const refresh = sub.refresh.bind(sub);
        sub.refresh = (...a) => refresh(...a).then((r) => (window.refreshed = r));
        window.sub = sub;
    """,
        [connection_token(user), channel, tokens],
    )
    api(token_server, "/api/publish", {"channel": channel, "data": "before"})
    page.wait_for_function("window.got.length === 1")

    # At the token's exp the server pushes sub_refresh; the client answers at once.
    page.wait_for_function("window.refreshed !== undefined", timeout=15_000)
    assert page.evaluate("window.refreshed") == {"expires_at": short_exp + 600}
    calls = page.evaluate("window.calls")
    assert len(calls) == 2
    assert calls[1] >= short_exp - 0.5  # called for the push, not earlier
    pushes = [f for f in page.evaluate("window.received") if f.get("type") == "sub_refresh" and "id" not in f]
    assert pushes == [{"type": "sub_refresh", "channel": channel, "grace": SUB_GRACE}]
    # Past the grace period of the first token the subscription still delivers.
    page.wait_for_function(f"Date.now() / 1000 > {short_exp + SUB_GRACE + 0.3}", timeout=10_000)
    api(token_server, "/api/publish", {"channel": channel, "data": "kept"})
    page.wait_for_function("window.got.length === 2")

    # A reconnect resubscribes with the function's next token.
    page.evaluate("window.client.reconnect()")
    page.wait_for_function("window.events.some((e) => e[0] === 'subscribed' && e[1] === true)")
    api(token_server, "/api/publish", {"channel": channel, "data": "after reconnect"})
    page.wait_for_function("window.got.length === 3")

    assert page.evaluate("window.got") == ["before", "kept", "after reconnect"]
    assert len(page.evaluate("window.calls")) == 3
    sent = [f for f in page.evaluate("window.sent") if f["type"] in ("subscribe", "sub_refresh")]
    assert [f["type"] for f in sent] == ["subscribe", "sub_refresh", "subscribe"]
    first, refreshed, resubscribed = sent
    assert first["channels"] == [{"channel": channel, "token": tokens[0]}]
    assert {k: v for k, v in refreshed.items() if k != "id"} == {
        "type": "sub_refresh",
        "channel": channel,
        "token": tokens[1],
    }
    assert resubscribed["channels"][0]["token"] == tokens[2]
    assert resubscribed["channels"][0]["since"]["offset"] == 2
    events = page.evaluate("window.events")
    # No error, no unsubscribed event: only the reconnect asked for.
    assert [e[0] for e in events] == ["subscribed", "disconnected", "subscribed"]
    assert [e[1] for e in events if e[0] == "subscribed"] == [False, True]
    assert page.evaluate(
        "window.sub.active && window.client.subscriptions.get(window.sub.channel) === window.sub"
    )


def test_fixed_subscription_token_ends_the_subscription_at_expiry(
    token_server: ServerProcess, new_page: Any
) -> None:
    """With a fixed token string the client does not answer sub_refresh; the server's
    unsubscribe push (112) ends the subscription client-side, and it is not restored."""
    page = client_page(new_page, token_server)
    user = "user-" + secrets.token_hex(3)
    channel = "team:fixed-" + secrets.token_hex(3)
    token = subscription_token(user, channel, int(time.time()) + 3)
    run_js(
        page,
        """
        const [connectionToken, channel, token] = arg;
        const client = new HeraldClient({ token: connectionToken, minDelay: 50, maxDelay: 100 });
        window.client = client;
        window.got = [];
        window.events = [];
        window.ended = [];
        """
        + RECORD_FRAMES
        + """
        for (const type of ["unsubscribed", "error", "disconnected", "connected"]) client.on(type, (d) => window.events.push([type, d]));
        client.on("subscribed", (d) => window.events.push(["subscribed", d.resubscribed]));
        await client.connect();
        // A token function that fails makes the subscribe fail with its error.
        const failing = () => { throw new Error("no token for you"); };
        window.failed = await client.subscribe(channel, { token: failing }).then(
          () => "subscribed", (e) => [e.message, client.subscriptions.has(channel)]);
        window.sub = await client.subscribe(channel, {
          token,
          onPublication: (p) => window.got.push(p.data),
          onUnsubscribed: (d) => window.ended.push(d),
        });
    """,
        [connection_token(user), channel, token],
    )
    api(token_server, "/api/publish", {"channel": channel, "data": "before"})
    page.wait_for_function("window.got.length === 1")
    assert page.evaluate("window.failed") == ["no token for you", False]
    page.wait_for_function("window.events.some((e) => e[0] === 'unsubscribed')", timeout=15_000)

    ended = {"channel": channel, "code": 112, "reason": "subscription token expired"}
    assert page.evaluate("window.ended") == [ended]
    assert page.evaluate("window.sub.ended") == {"code": 112, "reason": "subscription token expired"}
    assert page.evaluate("window.sub.active") is False
    assert page.evaluate("window.client.subscriptions.has(window.sub.channel)") is False
    pushes = [f for f in page.evaluate("window.received") if "id" not in f]
    # The sub_refresh push came, and a fixed string has nothing to answer it with.
    assert {"type": "sub_refresh", "channel": channel, "grace": SUB_GRACE} in pushes
    assert "sub_refresh" not in [f["type"] for f in page.evaluate("window.sent")]

    # A reconnect does not bring the subscription back.
    page.evaluate("window.client.reconnect()")
    page.wait_for_function("window.events.filter((e) => e[0] === 'connected').length === 2")
    page.evaluate("window.client.ping()")  # a round trip: a resubscribe would have been sent by now
    assert [f["channels"] for f in page.evaluate("window.sent") if f["type"] == "subscribe"] == [
        [{"channel": channel, "token": token}]
    ]
    events = page.evaluate("window.events")
    assert [e for e in events if e[0] in ("unsubscribed", "subscribed", "error")] == [
        ["subscribed", False],
        ["unsubscribed", ended],
    ]
    assert page.evaluate("window.client.state") == "connected"
    assert page.evaluate("window.got") == ["before"]


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
