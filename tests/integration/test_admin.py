"""The admin page: key-protected, live over Herald itself; driven in Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator

import pytest
import websockets

from ..helpers import ProtocolClient, ServerProcess, http_get

API_KEY = "admin-key"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def admin_server() -> Iterator[ServerProcess]:
    process = ServerProcess(env={"HERALD_API_KEY": API_KEY, "HERALD_DEMOS": "false"}).start()
    yield process
    process.stop()


def test_snapshot_needs_the_key(admin_server: ServerProcess) -> None:
    import urllib.request

    assert http_get(admin_server.http + "/admin/snapshot")[0] == 401
    request = urllib.request.Request(admin_server.http + "/admin/snapshot", headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(request, timeout=5) as response:
        snapshot = json.loads(response.read())
    assert snapshot["broker"] == "memory"
    assert {"node", "clients", "channels", "stats", "num_connections"} <= snapshot.keys()


def test_snapshot_takes_the_key_as_the_api_does(admin_server: ServerProcess) -> None:
    """``Authorization: Bearer|apikey KEY`` as on /api; a wrong key is 401 either way."""
    for headers in ({"Authorization": f"Bearer {API_KEY}"}, {"Authorization": f"apikey {API_KEY}"}):
        status, body = http_get_with(admin_server.http + "/admin/snapshot", headers)
        assert status == 200 and json.loads(body)["broker"] == "memory", (headers, status)
    status, body = http_get_with(admin_server.http + "/admin/snapshot", {"Authorization": "Bearer wrong"})
    assert status == 401 and json.loads(body)["detail"] == "missing or wrong API key"


async def test_snapshot_without_a_key_set_answers_from_elsewhere_as_the_api_does() -> None:
    """No HERALD_API_KEY and a peer that is not loopback: 403 with the API's reason, not a
    401 asking for a key that does not exist."""
    import httpx

    from herald import Herald, Settings
    from herald.server import create_app

    app = create_app(herald=Herald(Settings(demos=False)))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.2", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
        snapshot = await http.get("/admin/snapshot")
        api = await http.get("/api/channels")
    assert snapshot.status_code == api.status_code == 403
    assert snapshot.json()["detail"] == api.json()["detail"]
    assert "HERALD_API_KEY is not set" in snapshot.json()["detail"]


def http_get_with(url: str, headers: dict[str, str]) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def test_admin_socket_refuses_a_wrong_key(admin_server: ServerProcess) -> None:
    async with websockets.connect(admin_server.ws("/admin/ws")) as websocket:
        await websocket.send(json.dumps({"api_key": "wrong"}))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(websocket.recv(), 5)
    assert websocket.close_code == 4501


async def test_admin_socket_streams_snapshots(admin_server: ServerProcess) -> None:
    async with websockets.connect(admin_server.ws("/admin/ws")) as websocket:
        await websocket.send(json.dumps({"api_key": API_KEY}))
        first = json.loads(await asyncio.wait_for(websocket.recv(), 5))
        assert first["type"] == "publication" and first["channel"] == "$admin"
        client = await ProtocolClient.open(admin_server.ws("/connect"))
        await client.call("subscribe", channels=[{"channel": "chat:admin-live"}])
        try:
            # A change is published within about a second.
            while True:
                frame = json.loads(await asyncio.wait_for(websocket.recv(), 5))
                ids = {c["client"] for c in frame["data"]["clients"]}
                if client.client_id in ids:
                    assert frame["data"]["channels"].get("chat:admin-live") == 1
                    break
        finally:
            await client.close()


@pytest.mark.browser
async def test_admin_page_shows_a_new_connection(admin_server: ServerProcess) -> None:
    from playwright.async_api import async_playwright

    from ..browser.conftest import CHROMIUM

    if not shutil.which(CHROMIUM):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium; scripts/test does)")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(admin_server.http + "/admin")
            # The server has a key, so the page asks for it.
            await page.locator("#key").wait_for(state="visible", timeout=5000)
            await page.fill("#key", API_KEY)
            await page.click("#login-form button")
            await page.locator("#panels").wait_for(state="visible", timeout=5000)

            client = await ProtocolClient.open(admin_server.ws("/connect"))
            await client.call("subscribe", channels=[{"channel": "chat:from-test"}])
            try:
                row = page.locator(f'#connections tr[data-client="{client.client_id}"]')
                await row.wait_for(timeout=5000)
                assert "chat:from-test" in await row.inner_text()
                channel = page.locator('#channels tr[data-channel="chat:from-test"]')
                await channel.wait_for(timeout=5000)

                # Presence of the channel, through the HTTP API with the page's key.
                await channel.locator("a").click()
                presence = page.locator("#presence tr")
                await presence.first.wait_for(timeout=5000)
                assert client.client_id in await presence.first.inner_text()

                # The publish form reaches the subscribed client.
                await page.fill("#publish-channel", "chat:from-test")
                await page.fill("#publish-data", '{"text": "<b>from admin</b>"}')
                await page.click("#publish-form button")
                publication = await client.push("publication")
                assert publication["data"] == {"text": "<b>from admin</b>"}
                await page.locator("#publish-result").filter(has_text="offset").wait_for()
            finally:
                await client.close()
            # Gone from the page once it disconnected.
            row = page.locator(f'#connections tr[data-client="{client.client_id}"]')
            await row.wait_for(state="detached", timeout=5000)
            assert errors == []
        finally:
            await browser.close()
