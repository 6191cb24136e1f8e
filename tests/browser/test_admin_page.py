"""The admin page's layout at phone and desktop widths, the pages' favicon, and the index."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from ..helpers import ServerProcess
from .conftest import API_KEY, DESKTOP, PHONE, SMALL_DESKTOP, page_width, screenshot

pytestmark = pytest.mark.browser

# Every table of the admin page: its panel's title, its own width, the width of the box
# that holds it, whether that box scrolls sideways, and whether box and panel stay on screen.
TABLES_JS = """() => [...document.querySelectorAll("main table")].map((table) => {
  const box = table.closest(".table-scroll") || table.parentElement;
  const panel = table.closest("section");
  return {
    panel: panel.querySelector("h2").firstChild.textContent.trim(),
    table: table.scrollWidth,
    box: box.clientWidth,
    scrolls: ["auto", "scroll"].includes(getComputedStyle(box).overflowX),
    boxRight: box.getBoundingClientRect().right,
    panelRight: panel.getBoundingClientRect().right,
  };
})"""


@pytest.fixture
def busy_server(herald_server: ServerProcess, new_page: Any) -> Iterator[ServerProcess]:
    """The server with two chat pages in a room whose long name widens the Connections table."""
    room = "a-room-with-a-rather-long-name-" + secrets.token_hex(3)
    for name in ("Ada", "Bob"):
        page = new_page()
        page.goto(f"{herald_server.http}/static/chat.html?name={name}&room={room}&join=1")
        page.wait_for_selector("body[data-ready=true]")
    yield herald_server


def open_admin(new_page: Any, server: ServerProcess, viewport: dict[str, int]) -> Any:
    page = new_page(viewport)
    page.goto(server.http + "/admin")
    page.locator("#key").wait_for(state="visible")
    page.fill("#key", API_KEY)
    page.click("#login-form button")
    page.locator("#panels").wait_for(state="visible")
    page.wait_for_function("document.querySelectorAll('#connections tr[data-client]').length >= 2")
    return page


@pytest.mark.parametrize(("viewport", "label"), [(DESKTOP, "1180"), (SMALL_DESKTOP, "1000")])
def test_admin_tables_show_every_column_on_a_desktop(
    busy_server: ServerProcess, new_page: Any, viewport: dict[str, int], label: str
) -> None:
    page = open_admin(new_page, busy_server, viewport)
    document, window = page_width(page)
    assert document <= window, f"the page scrolls sideways: {document} > {window}"
    tables = {t["panel"]: t for t in page.evaluate(TABLES_JS)}
    assert {"Nodes", "Connections", "Channels", "Presence"} <= tables.keys()
    for name, table in tables.items():
        # Every column is on screen: no table is wider than the box that shows it.
        assert table["table"] <= table["box"], f"{name}: columns cut at {label} px: {table}"
    assert page.locator("#nodes-panel th").count() == 7
    screenshot(page, f"admin-{label}.png", full_page=True)


def test_admin_page_fits_a_phone(busy_server: ServerProcess, new_page: Any) -> None:
    page = open_admin(new_page, busy_server, PHONE)
    document, window = page_width(page)
    assert document <= window, f"the page is wider than the phone: {document} > {window}"
    for table in page.evaluate(TABLES_JS):
        # A table fits its panel, or scrolls inside it by design; the panel stays on screen.
        assert table["table"] <= table["box"] or table["scrolls"], table
        assert table["boxRight"] <= table["panelRight"] <= window, table
    # The wide tables do scroll here (seven and six columns do not fit 390 px).
    wide = {t["panel"]: t for t in page.evaluate(TABLES_JS)}
    assert wide["Nodes"]["scrolls"] and wide["Connections"]["scrolls"]
    screenshot(page, "admin-phone.png", full_page=True)


@pytest.mark.parametrize(
    "path", ["/admin", "/static/index.html", "/static/chat.html", "/static/dashboard.html"]
)
def test_pages_serve_their_favicon(herald_server: ServerProcess, new_page: Any, path: str) -> None:
    page = new_page()
    failed: list[str] = []
    page.context.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    with page.context.expect_event("response", lambda r: "favicon" in r.url, timeout=10_000) as event:
        page.goto(herald_server.http + path)
    favicon = event.value
    assert favicon.status == 200, favicon.url
    assert favicon.headers["content-type"].startswith("image/svg+xml")
    assert failed == []
    assert not [m for m in page.console_messages if "Failed to load resource" in m or "404" in m]


def test_admin_favicon_is_served_with_the_demos_off(new_page: Any) -> None:
    """The admin page stays when HERALD_DEMOS=false, and so must what it loads."""
    server = ServerProcess(env={"HERALD_API_KEY": API_KEY, "HERALD_DEMOS": "false"}).start()
    try:
        page = new_page()
        failed: list[str] = []
        page.context.on(
            "response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
        )
        with page.context.expect_event("response", lambda r: "favicon" in r.url, timeout=10_000) as event:
            page.goto(server.http + "/admin")
        assert event.value.status == 200
        page.locator("#key").wait_for(state="visible")  # admin.js ran: the key is asked for
        assert failed == []
    finally:
        server.stop()


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_index_shows_this_server_and_links_the_admin_page(
    herald_server: ServerProcess, new_page: Any, viewport: dict[str, int]
) -> None:
    page = new_page(viewport)
    page.goto(herald_server.http + "/")
    host = f"127.0.0.1:{herald_server.port}"
    assert page.text_content("[data-ws-path='/connect']") == f"ws://{host}/connect"
    assert page.text_content("[data-ws-path='/ws']") == f"ws://{host}/ws"
    assert "HOST" not in (page.text_content("main") or "")
    document, window = page_width(page)
    assert document <= window
    screenshot(page, f"index-{viewport['width']}.png", full_page=True)
    page.click("a[href='/admin']")
    page.wait_for_url("**/admin")
    assert page.title() == "Herald admin"
