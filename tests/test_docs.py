"""Every Python block of the README and the docs runs, as a reader would paste it.

How the blocks run (the convention is in tests/snippets.py and CONTRIBUTING.md): each
page in one fresh interpreter, its blocks in order in one namespace, in a temporary
directory of its own; ``<!-- snippet: fragment -->`` above a fence skips the block, and
``<!-- snippet: pytest -->`` runs it as a test module through pytest. A page's interpreter
is started once, by the first test of one of its blocks; each block is its own test, named
after its location, and fails with the traceback its page printed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from browser import chromium
from curl import curl
from servers import PYTHON, free_port, running
from snippets import KINDS, PAGES, PYTHON_LANGUAGES, ROOT, Block, blocks, stray_markers

RUNNER = Path(__file__).resolve().parent / "run_snippets.py"
# Ten times what the slowest page takes on a loaded 2-core machine (about 3 s: importing
# Django or FastAPI); only a block that never ends (a server started in the foreground)
# reaches it.
PAGE_TIMEOUT = 60.0
PYTEST_TIMEOUT = 120.0

# Files a page says the reader already has, saved in its directory before its blocks run.
PREMISES = {
    "docs/frameworks/django.md": {
        # What `django-admin startproject project` makes, cut to what the page needs.
        "project/settings.py": 'SECRET_KEY = "docs-only"\nINSTALLED_APPS = []\n',
    },
}

ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language in PYTHON_LANGUAGES and b.marker != "pytest"]
PYTEST_BLOCKS = [b for b in ALL_BLOCKS if b.marker == "pytest"]


def runnable(block: Block) -> bool:
    return block.language in PYTHON_LANGUAGES and block.marker is None


def write_named_files(page_blocks: list[Block], directory: Path) -> None:
    """Save the page's premises, and every runnable block that names its file (``# app.py``)."""
    for name, text in PREMISES.get(str(page_blocks[0].page.relative_to(ROOT)), {}).items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    for block in page_blocks:
        if runnable(block) and block.file_name is not None:
            path = directory / block.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.source)


def run_page(
    page_blocks: list[Block], directory: Path, timeout: float = PAGE_TIMEOUT
) -> dict[str, str | None]:
    """Run the page's runnable blocks in one interpreter; map each location to its error.

    A block that did not run (an earlier one failed, or the page timed out) maps to a
    message that says why.
    """
    write_named_files(page_blocks, directory)
    todo = [b for b in page_blocks if runnable(b)]
    blocks_json = directory / "_blocks.json"
    results_jsonl = directory / "_results.jsonl"
    blocks_json.write_text(
        json.dumps(
            [
                {"location": b.location, "path": str(b.page), "line": b.line, "source": b.source}
                for b in todo
            ]
        )
    )
    command = [sys.executable, str(RUNNER), str(blocks_json), str(results_jsonl)]
    try:
        finished = subprocess.run(
            command, cwd=directory, capture_output=True, timeout=timeout, check=False
        )
        ending = f"the page's interpreter exited with {finished.returncode}"
        output = finished.stdout + finished.stderr
    except subprocess.TimeoutExpired as expired:
        ending = f"the page did not finish within {timeout} s (a server in the foreground?)"
        output = (expired.stdout or b"") + (expired.stderr or b"")
    results: dict[str, str | None] = {}
    if results_jsonl.exists():
        for line in results_jsonl.read_text().splitlines():
            result = json.loads(line)
            results[result["location"]] = result["error"]
    printed = output.decode(errors="replace")
    failed = next((location for location, error in results.items() if error), None)
    for block in todo:
        if block.location in results:
            continue
        if failed is not None:
            results[block.location] = f"not run: the block at {failed} failed first"
        else:
            results[block.location] = f"{ending} while running this block\n{printed}"
            failed = block.location
    return results


@dataclass
class PageRuns:
    """Each page's results, run once, the first time one of its blocks is asked for."""

    directories: pytest.TempPathFactory
    results: dict[Path, dict[str, str | None]] = field(default_factory=dict)

    def error(self, block: Block) -> str | None:
        if block.page not in self.results:
            directory = self.directories.mktemp(block.page.stem)
            page_blocks = [b for b in ALL_BLOCKS if b.page == block.page]
            self.results[block.page] = run_page(page_blocks, directory)
        return self.results[block.page][block.location]


def run_pytest_block(block: Block, directory: Path) -> subprocess.CompletedProcess[bytes]:
    """Save ``block`` as a test module in ``directory`` and run pytest on it there."""
    module = directory / f"test_{block.page.stem.replace('-', '_')}_{block.line}.py"
    module.write_text(block.source)
    # Warnings are errors, as in this repository; the loop-scope option only silences
    # pytest-asyncio's notice that a project should choose one.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error"]
    command += ["-o", "asyncio_default_fixture_loop_scope=function"]
    return subprocess.run(
        [*command, module.name],
        cwd=directory,
        capture_output=True,
        timeout=PYTEST_TIMEOUT,
        check=False,
    )


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory: pytest.TempPathFactory) -> PageRuns:
    return PageRuns(tmp_path_factory)


def _param(block: Block) -> object:
    if block.marker == "fragment":
        return pytest.param(block, id=block.location, marks=pytest.mark.skip(reason="fragment"))
    return pytest.param(block, id=block.location)


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON_BLOCKS])
def test_the_python_block_runs(block: Block, page_runs: PageRuns) -> None:
    """The block runs after the blocks above it on its page, in a fresh interpreter."""
    error = page_runs.error(block)
    if error is not None:
        pytest.fail(f"{block.location} failed:\n{error}", pytrace=False)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.location) for b in PYTEST_BLOCKS])
def test_the_pytest_block_passes(block: Block, tmp_path: Path) -> None:
    """The block, saved as a test module next to its page's named files, passes under pytest."""
    write_named_files([b for b in ALL_BLOCKS if b.page == block.page], tmp_path)
    finished = run_pytest_block(block, tmp_path)
    assert finished.returncode == 0, (
        f"{block.location} did not pass:\n{(finished.stdout + finished.stderr).decode()}"
    )


def page_source(page_blocks: list[Block]) -> str:
    """The page's runnable blocks as one module, each at its own line numbers."""
    lines: list[str] = []
    for block in page_blocks:
        lines += [""] * (block.line - 1 - len(lines))
        lines += block.source.rstrip("\n").split("\n")
    return "\n".join(lines) + "\n"


PAGES_WITH_CODE = [page for page in PAGES if any(runnable(b) for b in blocks(page))]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: str(page.relative_to(ROOT)))
def test_the_page_uses_no_name_it_does_not_define(page: Path) -> None:
    """Names used only inside functions, which running the page does not reach, are defined."""
    source = page_source([b for b in blocks(page) if runnable(b)])
    name = f"{page.relative_to(ROOT)}.py"
    ruff = [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F821"]
    checked = subprocess.run(
        [*ruff, "--output-format", "concise", "--stdin-filename", name, "-"],
        input=source.encode(),
        capture_output=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout.decode()


# Pages whose blocks build one ASGI app, with the path of its stream and, where the page
# has one, its route that publishes a price of 200.5.
SERVED = {
    "docs/frameworks/starlette.md": ("/events", None),
    "docs/frameworks/fastapi.md": ("/events/", "/prices/TSLA?price=200.5"),
    "docs/frameworks/litestar.md": ("/events", None),
    "docs/frameworks/quart.md": ("/events", "/prices/TSLA/200.5"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", SERVED)
def test_the_pages_app_serves_its_stream_and_stops_on_sigterm(name: str, tmp_path: Path) -> None:
    """The page's blocks, saved as app.py and run with the page's uvicorn line, stream events.

    SIGTERM ends the open stream cleanly at once (``close_on_signal``): curl sees the end
    of the response, not a connection cut by the server's graceful timeout.
    """
    page = ROOT / name
    path, publish = SERVED[name]
    page_blocks = [b for b in blocks(page) if runnable(b)]
    write_named_files(page_blocks, tmp_path)
    (tmp_path / "app.py").write_text(page_source(page_blocks))
    [command] = set(re.findall(r"uvicorn app:app[^`\n]*", page.read_text()))
    port = free_port()
    argv = [PYTHON, "-m", *shlex.split(command), "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with running(argv, port=port, cwd=tmp_path) as server:
        with curl(
            ["curl", "-N", "--silent", "--show-error", "--max-time", "60", url + path]
        ) as stream:
            stream.until()
            if publish is not None:
                httpx.post(url + publish).raise_for_status()
                [event] = stream.until(1).events
                assert (event.type, json.loads(event.data)) == (
                    "price_update",
                    {"ticker": "TSLA", "price": 200.5},
                )
            server.stop()
            assert stream.end() == 0, stream.output
        # uvicorn's line when its graceful timeout had to cut open responses:
        assert "timeout graceful shutdown exceeded" not in server.log(), server.log()
        assert stream.output.startswith(b":")
        assert stream.output.endswith(b"\n\n")


def test_every_marker_is_known_and_directly_above_a_fence() -> None:
    """A misspelled or misplaced marker is an error, not a block silently run or skipped."""
    unknown = [b.location for b in ALL_BLOCKS if b.marker is not None and b.marker not in KINDS]
    stray = [location for page in PAGES for location in stray_markers(page)]
    assert (unknown, stray) == ([], [])


FIXTURE = [*blocks(Path(__file__).resolve().parent / "docs_fixture" / "page.md")]


def test_a_pytest_block_imports_its_pages_files_and_must_pass(tmp_path: Path) -> None:
    """A pytest block sees the files its page names, and a failing test in it is a failure."""
    named, passing, failing = FIXTURE[:3]
    assert (named.file_name, passing.marker, failing.marker) == ("greeting.py", "pytest", "pytest")
    write_named_files(FIXTURE, tmp_path)
    assert run_pytest_block(passing, tmp_path).returncode == 0
    finished = run_pytest_block(failing, tmp_path)
    assert finished.returncode == 1
    assert b"1 failed" in finished.stdout


def test_a_failing_block_names_its_line_and_the_blocks_after_it_do_not_run(tmp_path: Path) -> None:
    """Blocks share their page's namespace; the traceback points into the page; fragments skip."""
    results = run_page(FIXTURE, tmp_path)
    named, _, _, fragment, shout, raising, after = FIXTURE
    assert fragment.location not in results
    assert (results[named.location], results[shout.location]) == (None, None)
    error = results[raising.location]
    assert error is not None
    assert f'docs_fixture/page.md", line {raising.line}' in error
    assert error.rstrip().endswith("RuntimeError: HELLO BOB")
    assert results[after.location] == f"not run: the block at {raising.location} failed first"


def test_a_block_that_never_ends_fails_instead_of_hanging(tmp_path: Path) -> None:
    """A block that blocks forever (a server in the foreground) is reported, not waited for."""
    hanging = Block(
        FIXTURE[0].page, 1, "python", "import threading\nthreading.Event().wait()\n", None
    )
    results = run_page([hanging, FIXTURE[4]], tmp_path, timeout=2.0)
    failure = results[hanging.location]
    assert failure is not None
    assert failure.startswith("the page did not finish within 2.0 s")
    assert results[FIXTURE[4].location] == f"not run: the block at {hanging.location} failed first"


@pytest.mark.slow
def test_the_gap_snippet_reloads_the_state_and_goes_on() -> None:
    """In Chromium, concepts.md's listener reloads the state after a gap, then shows new events.

    The server restarts with another state: the page resumes with an id of the previous
    run, gets ``ssecast.gap``, and can only show the new price by fetching ``/state``.
    """
    port = free_port()
    argv = [PYTHON, "-m", "uvicorn", "apps.gap_app:app", "--port", str(port)]
    argv += ["--timeout-graceful-shutdown", "1"]
    with chromium() as browser:
        with running(argv, port=port, env={"GAP_TEST_PRICE": "1.5"}) as first:
            browser.get(f"{first.url}/")
            wait_for_text(browser, "TSLA 1.5")  # the state when the page opened
            httpx.post(f"{first.url}/publish", params={"price": "2.5"}).raise_for_status()
            wait_for_text(browser, "TSLA 2.5")  # an event, whose id the page keeps
        with running(argv, port=port, env={"GAP_TEST_PRICE": "7.5"}) as second:
            wait_for_text(browser, "TSLA 7.5")  # reconnected, got the gap, reloaded
            httpx.post(f"{second.url}/publish", params={"price": "8.5"}).raise_for_status()
            wait_for_text(browser, "TSLA 8.5")  # and goes on with the stream


def wait_for_text(browser: WebDriver, text: str, timeout: float = 30.0) -> None:
    """Wait until ``#prices`` reads ``text``; the bound is ten times a loaded machine's need."""
    deadline = time.monotonic() + timeout
    while (shown := browser.find_element("id", "prices").text) != text:
        assert time.monotonic() < deadline, f"the page shows {shown!r}, not {text!r}"
        time.sleep(0.05)
