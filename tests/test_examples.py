"""The examples' own install, run and ``curl -N`` lines, run as written against real servers.

Each example's docstring (or README) gives the lines a reader types from a clone: a
``pip install`` of extras, a ``.venv/bin/...`` run command and a ``curl -N`` line. These
tests check that the extras exist and install the tool the run command uses, start the
server with that very command (only the port added), run the real ``curl`` with the port
substituted, and read the events the docstring promises from what curl prints.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from curl import curl
from servers import PYTHON, free_port, running

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
INSTALL = re.compile(
    r"(python3 -m venv \.venv && )?\.venv/bin/pip install"
    r"(?: -e (?P<project>\.|'\.\[(?P<extras>[\w,-]+)\]'))?(?P<packages>(?: [\w-]+)*)"
)


def doc_lines(path: Path) -> list[str]:
    """The lines of ``path``'s docstring (or of a Markdown file), continuations joined."""
    text = path.read_text()
    if path.suffix == ".py":
        text = ast.get_docstring(ast.parse(text)) or ""
    text = re.sub(r"\\\n\s*", "", text)
    return [line.strip() for line in text.splitlines()]


@dataclass(frozen=True)
class Example:
    """A server example: where its lines are, which run line, and the events it promises."""

    id: str
    doc: str  # relative to examples/
    tool: str  # the run line is the one that starts with .venv/bin/<tool>
    port_flags: tuple[str, ...]
    event: str  # the type of the events its curl line shows
    retry: int

    def lines(self) -> list[str]:
        return doc_lines(EXAMPLES / self.doc)

    def argv(self, port: int) -> list[str]:
        """The run command of the docstring, as this venv runs it, with the port added."""
        prefix = f".venv/bin/{self.tool} "
        [line] = [line for line in self.lines() if line.startswith(prefix)]
        words = shlex.split(line)
        start = [PYTHON] if self.tool == "python" else [PYTHON, "-m", self.tool]
        return [*start, *words[1:], *(flag.format(port=port) for flag in self.port_flags)]

    def curl(self, port: int, index: int = 0) -> list[str]:
        """The docstring's ``index``-th curl line, on ``port``, with a bound on its time."""
        line = [line for line in self.lines() if line.startswith("curl ")][index]
        words = shlex.split(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", line))
        return [words[0], "--silent", "--show-error", "--max-time", "60", *words[1:]]


SERVERS = [
    Example("ticker", "ticker/__main__.py", "python", ("--port", "{port}"), "price_update", 1000),
    Example("starlette", "starlette_app.py", "uvicorn", ("--port", "{port}"), "price", 2000),
    Example("fastapi", "fastapi_app.py", "uvicorn", ("--port", "{port}"), "message", 2000),
    Example("flask", "flask_app.py", "flask", ("--port", "{port}"), "price", 2000),
    Example(
        "flask-gunicorn", "flask_app.py", "gunicorn", ("-b", "127.0.0.1:{port}"), "price", 2000
    ),
    Example("django-asgi", "django_app/asgi.py", "uvicorn", ("--port", "{port}"), "price", 2000),
    Example(
        "django-wsgi", "django_app/wsgi.py", "gunicorn", ("-b", "127.0.0.1:{port}"), "price", 2000
    ),
]
TICKER_STREAM = Example("ticker-stream", "ticker_stream.py", "python", (), "", 0)


def installs(lines: list[str]) -> tuple[list[str], list[str]]:
    """The extras and the plain packages that the ``pip install`` lines of ``lines`` name."""
    extras: list[str] = []
    packages: list[str] = []
    for line in lines:
        if match := INSTALL.fullmatch(line):
            extras += (match["extras"] or "").split(",") if match["extras"] else []
            packages += match["packages"].split()
    return extras, packages


def requirement_names(extras: list[str]) -> set[str]:
    names = set()
    for extra in extras:
        for requirement in EXTRAS[extra]:
            names.add(re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0].lower())
    return names


@pytest.mark.parametrize("example", [*SERVERS, TICKER_STREAM], ids=lambda example: example.id)
def test_the_install_lines_name_real_extras_and_install_the_run_commands_tool(
    example: Example,
) -> None:
    """From a clone, the docstring's pip lines install what its run line needs."""
    lines = example.lines()
    assert any(
        line.startswith("python3 -m venv .venv && .venv/bin/pip install -e ") for line in lines
    )
    extras, packages = installs(lines)
    assert set(extras) <= set(EXTRAS), (
        f"no such extra in pyproject.toml: {set(extras) - set(EXTRAS)}"
    )
    for package in packages:
        assert importlib.util.find_spec(package) is not None, package
    if example.tool != "python":
        assert example.tool in requirement_names(extras) | set(packages)


def test_the_examples_readme_gives_the_docstrings_lines() -> None:
    """Every run and curl line of examples/README.md is one an example's docstring gives."""
    readme = (EXAMPLES / "README.md").read_text()
    given = {line for example in [*SERVERS, TICKER_STREAM] for line in example.lines()}
    shown = re.findall(
        r"`((?:curl -N|\.venv/bin/(?:python|uvicorn|flask|gunicorn)) [^`]+)`", readme
    )
    assert shown
    assert set(shown) <= given, set(shown) - given


@pytest.mark.slow
@pytest.mark.parametrize("example", SERVERS, ids=lambda example: example.id)
def test_the_curl_line_shows_the_events_the_docstring_promises(example: Example) -> None:
    """The docstring's run command serves, its curl line prints its events, SIGTERM ends it."""
    port = free_port()
    server = running(example.argv(port), port=port, cwd=ROOT)
    with server as served, curl(example.curl(port)) as stream:
        if example.id == "fastapi":
            stream.until()  # the stream is open: post as the docstring's second line does
            posted = subprocess.run(example.curl(port, 1), capture_output=True, check=True)
            assert posted.stdout == b""
            received = stream.until(1)
            assert [json.loads(event.data) for event in received.events] == [
                {"author": "ann", "text": "hi"}
            ]
        else:
            received = stream.until(3)
            prices = [json.loads(e.data) for e in received.events if e.type == example.event]
            assert len(prices) >= 2
            assert all(set(price) == {"ticker", "price"} for price in prices)
        if example.id != "flask":  # Flask's development server just dies on SIGTERM
            # "Ctrl+C or SIGTERM stops the server at once": the open stream ends cleanly
            # (curl sees the end of the response), before any graceful timeout cuts it.
            served.stop()
            assert stream.end() == 0, stream.output
            assert "timeout graceful shutdown exceeded" not in served.log(), served.log()
    assert received.retry == example.retry
    assert {event.type for event in received.events} <= {example.event, "alert"}
    ids = [event.last_event_id for event in received.events]
    assert len(set(ids)) == len(ids)


def test_ticker_stream_prints_what_its_two_clients_receive() -> None:
    """The no-server example, run as its docstring says, prints frames and the counters."""
    argv = TICKER_STREAM.argv(0)
    finished = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=60, check=True)
    output = finished.stdout.decode()
    assert "[thread client] 'retry: 2000\\n\\n'" in output
    assert 'event: price_update\\ndata: {"ticker"' in output
    assert output.rstrip().splitlines()[-1].startswith("Stats(subscribers=0, published=")
