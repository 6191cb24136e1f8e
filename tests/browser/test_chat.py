"""The chat demo in real Chromium: two people, presence, XSS, and a network cut."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from ..helpers import ServerProcess
from .conftest import PHONE, TcpProxy, api, screenshot

pytestmark = pytest.mark.browser


def room() -> str:
    return "team-" + secrets.token_hex(3)


def join_with_form(page: Any, base: str, name: str, room_name: str) -> None:
    page.goto(f"{base}/static/chat.html")
    page.fill("#name", name)
    page.fill("#room", room_name)
    page.click("#join")
    page.wait_for_selector("body[data-ready=true]")


def message_texts(page: Any) -> list[str]:
    return page.eval_on_selector_all(
        "#messages li[data-offset] .text", "nodes => nodes.map(n => n.textContent)"
    )


def people(page: Any) -> list[str]:
    return page.eval_on_selector_all("#people li .name", "nodes => nodes.map(n => n.textContent)")


def wait_people(page: Any, expected: list[str]) -> None:
    page.wait_for_function(
        "expected => JSON.stringify([...document.querySelectorAll('#people li .name')]"
        ".map(n => n.textContent).sort()) === JSON.stringify(expected)",
        arg=sorted(expected),
    )


def wait_message(page: Any, text: str) -> None:
    page.wait_for_function(
        "text => [...document.querySelectorAll('#messages li .text')].some(n => n.textContent === text)",
        arg=text,
    )


def test_two_people_chat_with_presence_and_history(herald_server: ServerProcess, new_page: Any) -> None:
    name = room()
    base = herald_server.http
    # Earlier conversation: shown to both as history on join.
    for text in ("Welcome to the room!", "Herald keeps the last messages as history."):
        api(
            herald_server,
            "/api/publish",
            {"channel": f"chat:{name}", "data": {"name": "Herald bot", "text": text}},
        )

    ada = new_page()
    join_with_form(ada, base, "Ada", name)
    assert message_texts(ada) == ["Welcome to the room!", "Herald keeps the last messages as history."]
    wait_people(ada, ["Ada"])

    bob = new_page(PHONE)
    join_with_form(bob, base, "Bob", name)
    assert message_texts(bob)[:2] == ["Welcome to the room!", "Herald keeps the last messages as history."]
    wait_people(bob, ["Ada", "Bob"])
    wait_people(ada, ["Ada", "Bob"])  # Ada saw Bob join live

    ada.fill("#text", "Hi Bob, can you read me?")
    ada.press("#text", "Enter")
    wait_message(bob, "Hi Bob, can you read me?")
    bob.fill("#text", "Loud and clear, from my phone.")
    bob.click("#send")
    wait_message(ada, "Loud and clear, from my phone.")
    # The phone layout fits 390 px: nothing scrolls sideways.
    assert bob.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert message_texts(ada) == message_texts(bob)
    # The sender is shown by name, taken from the message itself.
    who = ada.eval_on_selector_all("#messages li .who", "nodes => nodes.map(n => n.textContent)")
    assert who[-2:] == ["Ada", "Bob"]
    assert ada.is_visible("#banner") is False
    screenshot(ada, "chat.png")

    # Bob closes his browser: Ada's presence list drops him.
    bob.context.close()
    wait_people(ada, ["Ada"])
    assert ada.text_content("#people-count") == "1"


def test_chat_message_is_text_not_html(herald_server: ServerProcess, new_page: Any) -> None:
    name = room()
    reader = new_page()
    join_with_form(reader, herald_server.http, "Reader", name)
    writer = new_page()
    join_with_form(writer, herald_server.http, "<img src=x onerror=__pwned=1>", name)

    payloads = [
        '<img src=x onerror="window.__pwned=2">',
        "<script>window.__pwned=3</script>",
        '<a href="javascript:window.__pwned=4">click</a><svg onload="window.__pwned=5">',
    ]
    for payload in payloads:
        writer.fill("#text", payload)
        writer.press("#text", "Enter")
    # And one from a backend, with HTML in the name field too.
    api(
        herald_server,
        "/api/publish",
        {"channel": f"chat:{name}", "data": {"name": "<b onmouseover=alert(1)>x</b>", "text": "&lt;ok&gt;"}},
    )
    for page in (reader, writer):
        wait_message(page, "&lt;ok&gt;")
        assert message_texts(page) == [*payloads, "&lt;ok&gt;"]
        assert page.evaluate("window.__pwned") is None
        # Nothing was parsed as markup: no element but the page's own inside the list.
        assert (
            page.eval_on_selector_all(
                "#messages img, #messages script, #messages svg, #messages a, #messages b", "n => n.length"
            )
            == 0
        )
        whos = page.eval_on_selector_all("#messages li .who", "nodes => nodes.map(n => n.textContent)")
        assert whos[-1] == "<b onmouseover=alert(1)>x</b>"
        # The presence list shows the writer's HTML-looking name as text too.
        wait_people(page, ["<img src=x onerror=__pwned=1>", "Reader"])
        assert page.eval_on_selector_all("#people img", "n => n.length") == 0


def test_reconnect_after_network_cut_shows_missed_messages_once(
    herald_server: ServerProcess, new_page: Any, proxy: TcpProxy
) -> None:
    name = room()
    channel = f"chat:{name}"
    page = new_page()
    # The page and its WebSocket both go through the proxy (same origin, as behind a real proxy).
    page.goto(f"{proxy.http}/static/chat.html?name=Ada&room={name}&join=1")
    page.wait_for_selector("body[data-ready=true]")
    api(
        herald_server, "/api/publish", {"channel": channel, "data": {"name": "bot", "text": "before the cut"}}
    )
    wait_message(page, "before the cut")

    proxy.cut()
    page.wait_for_selector("#banner:not([hidden])")
    assert "reconnecting" in page.text_content("#banner").lower()
    assert page.get_attribute("#status", "data-state") == "reconnecting"

    # Published while the page is offline: it must get these on its return.
    missed = [f"missed {i}" for i in range(1, 4)]
    for text in missed:
        api(herald_server, "/api/publish", {"channel": channel, "data": {"name": "bot", "text": text}})
    # Still offline: nothing arrived.
    assert message_texts(page) == ["before the cut"]

    proxy.restore()
    page.wait_for_selector("#banner", state="hidden", timeout=15_000)
    assert page.get_attribute("#status", "data-state") == "connected"
    wait_message(page, "missed 3")
    api(herald_server, "/api/publish", {"channel": channel, "data": {"name": "bot", "text": "after"}})
    wait_message(page, "after")

    assert message_texts(page) == ["before the cut", *missed, "after"]
    offsets = page.eval_on_selector_all(
        "#messages li[data-offset]", "nodes => nodes.map(n => Number(n.dataset.offset))"
    )
    assert offsets == sorted(set(offsets)), offsets
    # The client reported a full recovery of the three missed publications.
    assert page.evaluate("document.body.dataset.recovered") == "3"
    # Presence is refreshed after the reconnect: only the new connection is listed.
    wait_people(page, ["Ada"])
    assert proxy.accepted >= 2
