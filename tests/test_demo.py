"""The ticker demo, run as its README says, in a real server and a real browser."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browser import chromium
from proxy import proxy_to
from servers import PYTHON, Server, free_port, running

DEMO = Path(__file__).resolve().parent.parent / "examples" / "ticker"


@pytest.fixture(scope="module")
def demo() -> Iterator[Server]:
    port = free_port()
    with running([PYTHON, str(DEMO), "--port", str(port), "--rate", "50"], port=port) as server:
        yield server


def wait_for(condition: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout} s: {condition}")


def consecutive(ids: list[str]) -> bool:
    """Ids of one memory broadcaster are PREFIX-N with N counting up by one."""
    parsed = [re.fullmatch(r"([0-9a-f]+)-(\d+)", event_id) for event_id in ids]
    assert all(parsed), ids
    prefixes = {match.group(1) for match in parsed if match}
    numbers = [int(match.group(2)) for match in parsed if match]
    return len(prefixes) == 1 and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


def test_the_page_shows_live_prices_and_alerts_and_resumes_without_a_gap(demo: Server) -> None:
    """Prices update, an alert appears, and after the connection drops the page resumes."""
    with proxy_to(demo.port) as proxy, chromium() as browser:
        browser.get(f"http://127.0.0.1:{proxy.port}/")
        first = wait_for(lambda: browser.find_element("css selector", "#prices td.price").text)
        wait_for(lambda: browser.find_element("css selector", "#prices td.price").text != first)
        wait_for(
            lambda: browser.execute_script("return document.querySelectorAll('li.alert').length")
        )
        before = browser.execute_script("return window.ticker.receivedIds.length")
        assert browser.find_element("id", "state").text == "open"

        proxy.drop_all()
        wait_for(lambda: browser.execute_script("return window.ticker.opens") >= 2)
        wait_for(
            lambda: browser.execute_script("return window.ticker.receivedIds.length") > before + 50
        )

        ticker = browser.execute_script("return window.ticker")
        assert ticker["gaps"] == 0
        assert len(set(ticker["receivedIds"])) == len(ticker["receivedIds"])
        assert consecutive(ticker["receivedIds"])
        assert proxy.connections >= 2  # the page's stream really was cut and reopened


def test_the_page_reloads_its_state_after_a_gap(demo: Server) -> None:
    """A resume id the server no longer knows makes the page reload its state, not guess."""
    with chromium() as browser:
        browser.get(f"{demo.url}/")
        wait_for(lambda: browser.execute_script("return window.ticker.receivedIds.length"))
        reloads = browser.execute_script("return window.ticker.reloads")
        browser.execute_script(
            "window.gapSource = new EventSource('/events?lastEventId=unknown-1');"
            "window.gapSource.addEventListener('ssecast.gap', () => { window.sawGap = true; });"
        )
        wait_for(lambda: browser.execute_script("return window.sawGap === true"))
        assert reloads >= 1  # the page loads its state at start too


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/history/TSLA?limit=0", 400),
        ("/history/TSLA?limit=abc", 400),
        ("/history/TSLA?limit=99999999999999999999", 400),
        ("/history/NOPE", 404),
        ("/history/%00%0d%0a", 404),
        ("/events?lastEventId=%0d%0aevent:%20evil", 200),
        ("/nowhere", 404),
    ],
)
def test_bad_input_to_the_demo_gets_a_clear_answer(demo: Server, path: str, status: int) -> None:
    """Hostile paths and parameters get a 4xx (or a safe stream), never a 500."""
    with httpx.Client(base_url=demo.url, timeout=5) as client:
        if status == 200:
            with client.stream("GET", path) as response:
                assert response.status_code == 200
                first = next(response.iter_raw())
                assert b"evil" not in first
        else:
            response = client.get(path)
            assert response.status_code == status
            assert response.text


def test_the_demo_answers_its_state_and_history(demo: Server) -> None:
    """The state the page reloads from holds every ticker's prices."""
    with httpx.Client(base_url=demo.url, timeout=5) as client:
        state = client.get("/state").json()
        assert set(state["prices"]) == {"TSLA", "AAPL", "MSFT", "NVDA", "AMZN"}
        history = client.get("/history/TSLA", params={"limit": 3}).json()
        assert history["ticker"] == "TSLA"
        assert 1 <= len(history["prices"]) <= 3
