"""What /static serves: the JS client always, the demo pages only with the demos on; the
client's TypeScript declarations' content type; an application's own mount of the client."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from importlib import resources

import pytest
from fastapi import FastAPI

from herald import Herald
from herald.config import Settings
from herald.server import create_app
from herald.static_files import ADMIN_FILES, CLIENT_FILES

from .helpers import ServerProcess, ThreadServer, http_get, running_server

STATIC = resources.files("herald") / "static"
#: Every demo page and its assets: what must disappear with the demos off.
DEMO_FILES = ["index.html", "chat.html", "chat.js", "dashboard.html", "dashboard.js", "game.html", "game.js"]
DEMO_FILES += ["demo.css", "demo-common.js", "admin.html"]


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read()


@pytest.fixture(scope="module")
def demos_off() -> Iterator[ServerProcess]:
    with running_server({"HERALD_DEMOS": "false"}) as server:
        yield server


def test_the_demo_files_exist_so_their_404_means_something() -> None:
    for name in [*DEMO_FILES, "herald.js", "herald-protocol.d.ts", "admin.js"]:
        assert (STATIC / name).is_file(), name


def test_with_the_demos_off_only_the_client_and_the_admin_script_are_served(demos_off: ServerProcess) -> None:
    for name in DEMO_FILES:
        assert http_get(f"{demos_off.http}/static/{name}")[0] == 404, name
    assert http_get(demos_off.http + "/")[0] == 404
    for name in ("herald.js", "herald-protocol.d.ts", "admin.js"):
        status, _, body = get(f"{demos_off.http}/static/{name}")
        assert status == 200 and body == (STATIC / name).read_bytes(), name
    # No way around the list: other spellings of a demo page are refused too.
    for path in ("/static/./chat.html", "/static/x/../chat.html", "/static/", "/static/../static/chat.html"):
        assert http_get(demos_off.http + path)[0] == 404, path


def test_with_the_demos_on_the_pages_are_served(server: ServerProcess) -> None:
    for name in DEMO_FILES:
        status, _, body = get(f"{server.http}/static/{name}")
        assert status == 200 and body == (STATIC / name).read_bytes(), name


def test_with_demos_and_admin_off_the_admin_script_is_not_served() -> None:
    app = create_app(Settings(demos=False, admin=False, metrics=False))
    served = ThreadServer(app).start()
    try:
        assert http_get(served.http + "/static/admin.js")[0] == 404
        assert http_get(served.http + "/static/herald.js")[0] == 200
    finally:
        served.stop()
    assert {"herald.js", "herald-protocol.d.ts"} <= CLIENT_FILES and "admin.js" in ADMIN_FILES


def test_typescript_declarations_are_served_as_typescript(server: ServerProcess) -> None:
    status, content_type, body = get(server.http + "/static/herald-protocol.d.ts")
    assert status == 200 and content_type == "application/typescript; charset=utf-8"
    assert body == (STATIC / "herald-protocol.d.ts").read_bytes()
    # Not the other way round: JavaScript keeps its own type.
    assert re.fullmatch(
        r"(text|application)/javascript; charset=utf-8", get(server.http + "/static/herald.js")[1]
    )


def test_an_app_serves_the_js_client_with_herald_static_files() -> None:
    # docs/library.md's recipe, in a real application on a real server.
    herald = Herald(Settings())
    app = FastAPI(lifespan=herald.lifespan)
    app.include_router(herald.router)
    app.mount("/static", herald.static_files(), name="herald-static")
    served = ThreadServer(app).start()
    try:
        status, content_type, body = get(served.http + "/static/herald.js")
        assert status == 200 and "javascript" in content_type
        assert body == (STATIC / "herald.js").read_bytes()
        status, content_type, _ = get(served.http + "/static/herald-protocol.d.ts")
        assert status == 200 and content_type.startswith("application/typescript")
        # The demo pages are Herald's, not the application's: never part of this mount.
        assert http_get(served.http + "/static/chat.html")[0] == 404
        assert http_get(served.http + "/static/admin.js")[0] == 404
    finally:
        served.stop()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_pages_load_their_assets_from_this_server(server: ServerProcess, page: str) -> None:
    # Without Chromium too: every asset the page names is local, and is there.
    status, _, body = get(server.http + page)
    assert status == 200
    urls = re.findall(r'(?:src|href)="([^"]+)"', body.decode())
    assert len(urls) >= 2, urls  # the bundle, and the stylesheet or the favicon
    for url in urls:
        assert url.startswith("/docs/assets/"), url
        assert http_get(server.http + url)[0] == 200, url
