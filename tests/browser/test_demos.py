"""The live dashboard and the multiplayer game in real Chromium; the demo index."""

from __future__ import annotations

import itertools
import secrets
import time
from typing import Any

import pytest

from ..helpers import ServerProcess, http_get
from .conftest import PHONE, page_width, screenshot

pytestmark = pytest.mark.browser


def test_index_links_the_three_demos(herald_server: ServerProcess, new_page: Any) -> None:
    page = new_page(PHONE)
    page.goto(herald_server.http + "/")
    assert page.url.endswith("/static/index.html")
    links = page.eval_on_selector_all(".demos a", "nodes => nodes.map(n => n.getAttribute('href'))")
    assert links == ["chat.html", "dashboard.html", "game.html"]
    for link in links:
        assert http_get(f"{herald_server.http}/static/{link}")[0] == 200
    # Nothing overflows the phone's width.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_dashboard_chart_updates_every_second(herald_server: ServerProcess, new_page: Any) -> None:
    page = new_page()
    page.goto(herald_server.http + "/static/dashboard.html")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("Number(document.getElementById('chart').dataset.updates) >= 1")

    # Four consecutive samples: each arrives within ~1 s of the previous one, and the
    # server's timestamps are one interval apart.
    arrivals: list[float] = []
    server_times: list[float] = []
    count = int(page.get_attribute("#chart", "data-updates") or 0)
    for _ in range(4):
        page.wait_for_function(
            "n => Number(document.getElementById('chart').dataset.updates) > n", arg=count, timeout=3000
        )
        arrivals.append(time.monotonic())
        count = int(page.get_attribute("#chart", "data-updates") or 0)
        server_times.append(float(page.get_attribute("#chart", "data-last-time") or 0))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # One per second on average; a single late tick is tolerated on a busy 2-core machine.
    assert sum(gaps) / len(gaps) < 1.3 and max(gaps) < 1.9, gaps
    server_gaps = [b - a for a, b in itertools.pairwise(server_times)]
    assert sum(server_gaps) / len(server_gaps) < 1.3, server_gaps
    assert all(0.5 < gap < 1.9 for gap in server_gaps), server_gaps

    # The chart is drawn from real figures: this page's own connection is counted, and a
    # burst of publications shows up in the messages-per-second series.
    assert int(page.text_content(".card[data-key=connections] .number") or 0) >= 1
    page.click("#burst")
    page.wait_for_function(
        "() => window.dashboardPoints.some(p => p.messages_in_per_s >= 100 && p.messages_out_per_s >= 100)",
        timeout=5000,
    )
    path = page.get_attribute("#chart path[data-series=messages_in_per_s]", "d") or ""
    assert path.count("L") >= 3
    # A second burst a moment later, so that the screenshot shows some activity.
    count = int(page.get_attribute("#chart", "data-updates") or 0)
    page.wait_for_function(
        "n => Number(document.getElementById('chart').dataset.updates) > n", arg=count, timeout=3000
    )
    page.click("#burst")
    page.wait_for_function(
        "n => Number(document.getElementById('chart').dataset.updates) > n + 2", arg=count, timeout=5000
    )
    screenshot(page, "dashboard.png", full_page=True)


def test_dashboard_fits_a_phone(herald_server: ServerProcess, new_page: Any) -> None:
    page = new_page(PHONE)
    page.goto(herald_server.http + "/static/dashboard.html")
    page.wait_for_selector("body[data-ready=true]")
    # history: the chart starts with the samples of the last minute, not empty.
    page.wait_for_function("Number(document.getElementById('chart').dataset.points) >= 2")
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def board(page: Any) -> str:
    return page.get_attribute("#board", "data-board") or ""


def wait_board(page: Any, expected: str) -> None:
    page.wait_for_function(
        "b => document.getElementById('board').dataset.board === b", arg=expected, timeout=5000
    )


def test_tic_tac_toe_keeps_two_browsers_in_sync(herald_server: ServerProcess, new_page: Any) -> None:
    room = "match-" + secrets.token_hex(3)
    ada = new_page()
    bob = new_page(PHONE)
    ada.goto(f"{herald_server.http}/static/game.html?room={room}&name=Ada")
    bob.goto(f"{herald_server.http}/static/game.html?room={room}&name=Bob")
    for page in (ada, bob):
        page.wait_for_selector("body[data-ready=true]")
    ada.wait_for_function("document.getElementById('watch-count').textContent === '2'")

    moves = [(ada, 4, "X"), (bob, 0, "O"), (ada, 2, "X"), (bob, 8, "O")]
    cells = ["-"] * 9
    for player, cell, mark in moves:
        player.click(f"#board button[data-cell='{cell}']")
        cells[cell] = mark
        for page in (ada, bob):
            wait_board(page, "".join(cells))
        # Now it is the other player's turn: the mover's empty cells are locked.
        assert player.is_disabled("#board button[data-cell='6']")
    assert bob.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert "Ada" in (bob.text_content("#players") or "")
    assert "Bob" in (ada.text_content("#players") or "")

    # A latecomer replays the moves from the channel's history and sees the same board.
    carol = new_page()
    carol.goto(f"{herald_server.http}/static/game.html?room={room}&name=Carol")
    carol.wait_for_selector("body[data-ready=true]")
    assert board(carol) == "".join(cells)
    # Carol is not seated: she cannot move.
    assert carol.is_disabled("#board button[data-cell='6']")

    ada.click("#board button[data-cell='6']")  # X: 2-4-6 diagonal wins
    cells[6] = "X"
    for page in (ada, bob, carol):
        wait_board(page, "".join(cells))
    assert ada.text_content("#turn") == "You win!"
    assert bob.text_content("#turn") == "Ada (X) wins."
    assert ada.eval_on_selector_all("#board button.win", "n => n.length") == 3
    screenshot(ada, "game.png")

    bob.click("#new-game")
    for page in (ada, bob, carol):
        wait_board(page, "-" * 9)


@pytest.mark.parametrize(
    ("width", "per_row"), [(1180, 6), (1000, 6), (800, 3), (390, 2)], ids=["1180", "1000", "800", "390"]
)
def test_dashboard_cards_fill_their_rows(
    herald_server: ServerProcess, new_page: Any, width: int, per_row: int
) -> None:
    """Six cards: 6, 3 + 3 or 2 + 2 + 2 per row, never 5 + 1; and nothing scrolls sideways."""
    page = new_page({"width": width, "height": 800})
    page.goto(herald_server.http + "/static/dashboard.html")
    page.wait_for_selector("body[data-ready=true]")
    tops = page.eval_on_selector_all(
        ".card", "cards => cards.map(c => Math.round(c.getBoundingClientRect().top))"
    )
    rows = [tops.count(top) for top in sorted(set(tops))]
    assert rows == [per_row] * (6 // per_row), rows
    # The cards' contents stay inside them.
    assert page.eval_on_selector_all(".card", "cards => cards.every(c => c.scrollWidth <= c.clientWidth)")
    document, window = page_width(page)
    assert document <= window
    screenshot(page, f"dashboard-{width}.png", full_page=True)
