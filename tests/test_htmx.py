"""docs/frameworks/htmx.md's pages, as written, on uvicorn and in headless Chromium.

Each section's ``app.py`` and ``index.html`` are taken from the doc and served by
``apps/htmx_page_app.py``, which answers the page's CDN script URLs from the npm packages
that ``npm ci`` installs in tests/js at the exact versions of its package-lock.json: a page
that names another version gets a 404, and a file that differs from the doc's
``integrity`` hash is refused by the browser.

Times: each test takes under 6 s here, Chromium's start included, on 2 cores with a load
average of 18; the longest single wait (a reconnection: htmx 2 waits the 1 s ``retry``) is
under 2 s. The 30 s bound of each wait is there only to catch a hang.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver

from browser import chromium
from servers import PYTHON, TESTS, Server, free_port, running

DOC = TESTS.parent / "docs" / "frameworks" / "htmx.md"
JS = TESTS / "js"
CDN = "https://cdn.jsdelivr.net/npm/"
HTMX_2 = "htmx 2 with htmx-ext-sse"
HTMX_4 = "htmx 4"
VERSIONS = {HTMX_2: "2.0.11", HTMX_4: "4.0.1"}
BOUND = 30.0

# Installed before any page script runs: the errors the page raises, for the assertions.
RECORD_ERRORS = (
    "window.pageErrors = [];"
    "window.addEventListener('error', (e) => window.pageErrors.push(e.message));"
)


def doc_section(title: str) -> dict[str, str]:
    """Return the code blocks of the doc's ``## title`` section, by language."""
    sections = re.split(r"^## ", DOC.read_text(), flags=re.MULTILINE)
    (section,) = (s for s in sections if s.startswith(f"{title}\n"))
    blocks: dict[str, str] = {}
    for _indent, language, body in re.findall(
        r"^( *)```(\w+)\n(.*?)^\1```$", section, flags=re.MULTILINE | re.DOTALL
    ):
        assert language not in blocks, f"{title}: two {language} blocks"
        blocks[language] = textwrap.dedent(body)
    return blocks


def wait_for(condition: Callable[[], Any], what: str, timeout: float = BOUND) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@dataclass
class Site:
    """One section's app on uvicorn, and a client for its routes."""

    server: Server
    client: httpx.Client
    folder: Path

    def connections(self) -> list[dict[str, Any]]:
        """What each ``/events`` request sent as ``Last-Event-ID``, and the ids it got."""
        return list(self.client.get("/test/log").json()["connections"])

    def reloads(self) -> int:
        """How often a page asked for the price row (``GET /price``)."""
        return int(self.client.get("/test/log").json()["reloads"])

    def publish(self, kind: str, **params: str) -> None:
        """Publish through the doc's own route (``/price`` or ``/alert``)."""
        assert self.client.post(f"/{kind}", params=params).status_code == 204

    def write_page(self, name: str, html: str) -> str:
        """Write a page for ``/test/pages/NAME``, its CDN scripts served locally."""
        (self.folder / name).write_text(html.replace(CDN, "/npm/"))
        return f"{self.server.url}/test/pages/{name}"


@contextmanager
def serve(section: str, folder: Path) -> Iterator[Site]:
    """Run the section's ``app.py`` from ``folder``, its ``index.html`` beside it."""
    blocks = doc_section(section)
    (folder / "htmx_doc_app.py").write_text(blocks["python"])
    (folder / "index.html").write_text(blocks["html"].replace(CDN, "/npm/"))
    port = free_port()
    argv = [
        *(PYTHON, "-m", "uvicorn", "apps.htmx_page_app:app", "--host", "127.0.0.1"),
        *("--port", str(port), "--timeout-graceful-shutdown", "1", "--no-access-log"),
    ]
    env = {"HTMX_DOC_MODULE": "htmx_doc_app"}
    with (
        running(argv, port=port, env=env, cwd=folder) as server,
        httpx.Client(base_url=server.url, timeout=BOUND) as client,
    ):
        yield Site(server, client, folder)
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(params=[HTMX_2, HTMX_4])
def section(request: pytest.FixtureRequest) -> str:
    """The doc's section under test."""
    return str(request.param)


@pytest.fixture
def site(section: str, node_modules: Path, tmp_path: Path) -> Iterator[Site]:
    with serve(section, tmp_path) as site:
        yield site


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium() as driver:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_ERRORS})
        yield driver


def text_of(browser: webdriver.Chrome, selector: str) -> list[str]:
    """The ``textContent`` of every element ``selector`` matches."""
    return list(
        browser.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)",
            selector,
        )
    )


def test_the_page_swaps_each_event_type_into_its_target_and_resumes_after_the_stream_ends(
    section: str, site: Site, browser: webdriver.Chrome
) -> None:
    """Prices replace the row, alerts append to the list; a stream the server ends resumes.

    After the cut, the page reconnects by itself with ``Last-Event-ID`` set to the last id
    it received, and gets the alert published while it was away from the history.
    """
    browser.get(f"{site.server.url}/")
    assert browser.execute_script("return htmx.version") == VERSIONS[section]
    wait_for(lambda: len(site.connections()) == 1, "the page opens its stream")

    site.publish("price", ticker="TSLA", price="201.5")
    wait_for(lambda: text_of(browser, "#price td") == ["TSLA", "201.50"], "the price row")
    site.publish("price", ticker="<b>AAPL</b>", price="99")
    wait_for(lambda: text_of(browser, "#price td") == ["<b>AAPL</b>", "99.00"], "a new row")
    site.publish("alert", text="first")
    site.publish("alert", text="two\nlines")
    wait_for(lambda: len(text_of(browser, "#alerts li")) == 2, "two alerts")
    assert text_of(browser, "#alerts li") == ["first", "two\nlines"]
    assert text_of(browser, "#price td") == ["<b>AAPL</b>", "99.00"]  # alerts went elsewhere
    assert browser.execute_script("return document.querySelectorAll('b').length") == 0

    (first,) = site.connections()
    last_seen = first["ids"][-1]
    assert site.client.post("/test/cut").json() == {"ended": 1}
    site.publish("alert", text="while away")  # the page has no stream now
    site.client.post("/test/release")

    wait_for(lambda: len(text_of(browser, "#alerts li")) == 3, "the missed alert")
    site.publish("price", ticker="MSFT", price="400")
    wait_for(lambda: text_of(browser, "#price td") == ["MSFT", "400.00"], "a live price")
    assert text_of(browser, "#alerts li") == ["first", "two\nlines", "while away"]
    first, second = site.connections()
    assert first["last_event_id"] is None
    assert second["last_event_id"] == last_seen
    assert len(second["ids"]) == 2  # the missed alert from the history, then the price
    assert second["types"] == ["alert", "price"]
    assert site.reloads() == 0
    assert browser.execute_script("return window.pageErrors") == []


def test_after_a_gap_the_page_reloads_the_price_row_and_carries_on(
    section: str, site: Site, browser: webdriver.Chrome
) -> None:
    """Away while more events came than the history keeps, the page reloads its row.

    Its reconnection's ``Last-Event-ID`` is no longer in the history, so the stream begins
    with ``ssecast.gap``, and the page's gap handler fetches the current row.
    """
    browser.get(f"{site.server.url}/")
    wait_for(lambda: len(site.connections()) == 1, "the page opens its stream")
    site.publish("price", ticker="TSLA", price="201.5")
    site.publish("alert", text="first")
    wait_for(lambda: text_of(browser, "#alerts li") == ["first"], "the first alert")
    last_seen = site.connections()[0]["ids"][-1]

    assert site.client.post("/test/cut").json() == {"ended": 1}
    latest = site.client.post("/test/flood").json()
    site.client.post("/test/release")

    cells = [latest["ticker"], latest["price"]]
    wait_for(lambda: text_of(browser, "#price td") == cells, "the reloaded price row")
    site.publish("alert", text="live again")
    wait_for(lambda: len(text_of(browser, "#alerts li")) == 2, "a live alert")
    assert text_of(browser, "#alerts li") == ["first", "live again"]
    _, second = site.connections()
    assert second["last_event_id"] == last_seen
    assert second["types"] == ["ssecast.gap", "alert"]
    assert site.reloads() == 1
    assert browser.execute_script("return window.pageErrors") == []


def test_both_sections_give_the_same_server() -> None:
    """The htmx 4 section says its app.py is the htmx 2 one again: it is, to the character."""
    assert doc_section(HTMX_2)["python"] == doc_section(HTMX_4)["python"]


def scripts(section: str) -> list[str]:
    """The ``<script>`` elements of the section's page, in order: htmx, then its SSE."""
    return re.findall(r"<script .*?</script>", doc_section(section)["html"], flags=re.DOTALL)


@pytest.mark.parametrize(
    ("page", "extension", "error"),
    [
        (HTMX_4, HTMX_2, "Uncaught TypeError: htmx.defineExtension is not a function"),
        (HTMX_2, HTMX_4, "Uncaught TypeError: htmx.registerExtension is not a function"),
    ],
)
def test_an_sse_extension_of_the_other_major_version_fails_as_the_doc_says(
    page: str, extension: str, error: str, node_modules: Path, tmp_path: Path, browser: Any
) -> None:
    """The page of one version with the other's SSE script raises the doc's error, opens nothing."""
    html = doc_section(page)["html"].replace(scripts(page)[1], scripts(extension)[1])
    assert error in DOC.read_text()
    with serve(page, tmp_path) as site:
        browser.get(site.write_page("mixed.html", html))
        assert wait_for(lambda: browser.execute_script("return window.pageErrors"), error) == [
            error
        ]
        site.publish("alert", text="nobody listens")
        time.sleep(1)  # long enough for the page to connect, had it been able to
        assert site.connections() == []
        assert text_of(browser, "#alerts li") == []
