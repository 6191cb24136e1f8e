"""/docs, /redoc and /asyncapi in real Chromium with no internet: every request that does
not go to the Herald server is refused, as on a machine without a route out."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest

from ..helpers import ServerProcess

pytestmark = pytest.mark.browser


def offline_page(new_page: Any) -> tuple[Any, list[str]]:
    """A page whose requests reach only 127.0.0.1; returns it and the refused URLs."""
    page = new_page()
    refused: list[str] = []

    def only_local(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname in ("127.0.0.1", "localhost") or url.startswith("data:"):
            route.continue_()
        else:
            refused.append(url)
            route.abort("internetdisconnected")

    page.route("**/*", only_local)
    return page, refused


def test_swagger_ui_renders_the_operations_offline(herald_server: ServerProcess, new_page: Any) -> None:
    page, refused = offline_page(new_page)
    page.goto(herald_server.http + "/docs")
    page.wait_for_selector(".opblock")
    paths = page.eval_on_selector_all(".opblock-summary-path", "nodes => nodes.map(n => n.dataset.path)")
    assert "/api/publish" in paths and "/healthz" in paths, paths
    # Open one operation: its parameters and responses are drawn from the local bundle too.
    page.click("#operations-operations-healthz_healthz_get .opblock-summary")
    page.wait_for_selector("#operations-operations-healthz_healthz_get .responses-table")
    styled = page.evaluate("getComputedStyle(document.querySelector('.opblock')).borderStyle")
    assert styled == "solid"  # swagger-ui.css was applied
    assert refused == []


def test_redoc_renders_offline(herald_server: ServerProcess, new_page: Any) -> None:
    page, refused = offline_page(new_page)
    page.goto(herald_server.http + "/redoc")
    # ReDoc draws the whole API into .api-content, operation by operation.
    page.wait_for_selector(".api-content h2", state="attached")
    page.wait_for_function("document.querySelector('.api-content').innerText.includes('/api/publish')")
    assert refused == []


def test_asyncapi_page_loads_nothing_from_outside(herald_server: ServerProcess, new_page: Any) -> None:
    page, refused = offline_page(new_page)
    page.goto(herald_server.http + "/asyncapi", wait_until="networkidle")
    assert "publish" in (page.text_content("body") or "")
    assert refused == []
