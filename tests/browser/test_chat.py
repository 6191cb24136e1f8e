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


def pill_colours(page: Any, state: str) -> tuple[str, str]:
    """The computed (text, background) colours of a status pill in `state`, on this page's CSS."""
    return tuple(
        page.evaluate(
            """(state) => {
              const pill = document.createElement("span");
              pill.className = "status";
              pill.dataset.state = state;
              document.querySelector("header").append(pill);
              const style = getComputedStyle(pill);
              const colours = [style.color, style.backgroundColor];
              pill.remove();
              return colours;
            }""",
            state,
        )
    )


def test_offline_pill_does_not_look_like_connecting(herald_server: ServerProcess, new_page: Any) -> None:
    page = new_page(PHONE)
    page.goto(f"{herald_server.http}/static/chat.html")
    # Before joining: offline, in its own (grey) colours, not the amber of "connecting".
    assert page.text_content("#status") == "offline"
    assert page.get_attribute("#status", "data-state") == "offline"
    shown = page.eval_on_selector(
        "#status", "n => [getComputedStyle(n).color, getComputedStyle(n).backgroundColor]"
    )
    connecting = pill_colours(page, "connecting")
    assert tuple(shown) == pill_colours(page, "offline")
    assert shown[0] != connecting[0] and shown[1] != connecting[1], (shown, connecting)
    assert tuple(shown) != pill_colours(page, "connected")
    screenshot(page, "chat-offline-phone.png")

    page.fill("#name", "Ada")
    page.fill("#room", room())
    page.click("#join")
    page.wait_for_selector("body[data-ready=true]")
    assert page.get_attribute("#status", "data-state") == "connected"
    # Leaving the room is the page's choice: offline again, not the red of a refusal.
    page.click("#leave")
    page.wait_for_selector("#status[data-state=offline]")
    assert page.text_content("#status") == "offline"
    assert pill_colours(page, "offline") != pill_colours(page, "closed")


def shown_times(page: Any) -> dict[str, dict[str, str]]:
    """Each message's text -> its time element (source, datetime, text)."""
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("#messages li[data-offset]")].map((li) => {
          const time = li.querySelector("time.time");
          return [li.querySelector(".text").textContent,
                  {source: time.dataset.source, datetime: time.getAttribute("datetime"), text: time.textContent}];
        }))"""
    )


def test_chat_shows_the_send_time_a_message_carries_else_when_received(
    herald_server: ServerProcess, new_page: Any
) -> None:
    """The publication push has no timestamp: `data.time` is the send time when present;
    otherwise the page shows when it received the message, labelled "received"."""
    name = room()
    channel = f"chat:{name}"
    sent_ms = 1614834360000  # 2021-03-04T05:06:00Z: long before this page existed
    api(
        herald_server,
        "/api/publish",
        {"channel": channel, "data": {"name": "bot", "text": "timed", "time": sent_ms}},
    )
    api(herald_server, "/api/publish", {"channel": channel, "data": {"name": "bot", "text": "untimed"}})
    api(
        herald_server,
        "/api/publish",
        {"channel": channel, "data": {"name": "bot", "text": "iso", "time": "2022-01-02T03:04:05Z"}},
    )
    # A `time` no date can hold: shown as received (and no error in the page).
    api(
        herald_server,
        "/api/publish",
        {"channel": channel, "data": {"name": "bot", "text": "bad", "time": 1e20}},
    )
    page = new_page()
    page.goto(f"{herald_server.http}/static/chat.html")
    before_join = page.evaluate("Date.now()")
    page.goto(f"{herald_server.http}/static/chat.html?name=Ada&room={name}&join=1")
    page.wait_for_selector("body[data-ready=true]")
    after_join = page.evaluate("Date.now()")

    times = shown_times(page)
    assert times["timed"]["source"] == "sent"
    assert times["timed"]["datetime"] == "2021-03-04T05:06:00.000Z"
    expected_clock = page.evaluate(
        "ms => new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' })", sent_ms
    )
    # Another day (another year): the date is shown with the clock.
    assert times["timed"]["text"].endswith(", " + expected_clock) and "2021" in times["timed"]["text"]
    assert times["iso"]["source"] == "sent"
    assert times["iso"]["datetime"] == "2022-01-02T03:04:05.000Z"
    # No time in the data: the time this browser received it, and it says so.
    untimed = times["untimed"]
    assert untimed["source"] == "received"
    assert untimed["text"].startswith("received ")
    received_ms = page.evaluate("iso => Date.parse(iso)", untimed["datetime"])
    assert before_join <= received_ms <= after_join
    assert times["bad"]["source"] == "received"
    assert message_texts(page) == ["timed", "untimed", "iso", "bad"]  # offset order, whatever the times

    # Live: an untimed message gets the moment it arrived; the page's own messages carry `time`.
    before_live = page.evaluate("Date.now()")
    api(herald_server, "/api/publish", {"channel": channel, "data": {"name": "bot", "text": "live untimed"}})
    wait_message(page, "live untimed")
    after_live = page.evaluate("Date.now()")
    live = shown_times(page)["live untimed"]
    assert live["source"] == "received"
    assert before_live <= page.evaluate("iso => Date.parse(iso)", live["datetime"]) <= after_live
    page.fill("#text", "from the page")
    page.press("#text", "Enter")
    wait_message(page, "from the page")
    assert shown_times(page)["from the page"]["source"] == "sent"
    assert message_texts(page) == ["timed", "untimed", "iso", "bad", "live untimed", "from the page"]
    screenshot(page, "chat-times.png")
