"""The built documentation shows no raw Sphinx markup, and the API reference covers the API.

The site is built once per session with `mkdocs build --strict` (as `.ci/run` does), so an
unresolved cross-reference fails here too; the checks then read the text a browser would
show, parsed from the HTML, never the Markdown or the docstrings it came from.
"""

from __future__ import annotations

import ast
import html
import importlib
import os
import pkgutil
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

import ssecast

ROOT = Path(__file__).resolve().parents[1]

# A Sphinx role as it survives Markdown: ":class:`Event`" renders as ":class:" then the
# code "Event", so the text reads ":class:Event" (or keeps its backticks inside a code block).
ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|exc|data|obj|ref):[`~\w]")
# A Markdown cross-reference that autorefs left unresolved: "[`Broadcaster`][ssecast.Broadcaster]".
UNRESOLVED_REFERENCE = re.compile(r"\]\[[\w.]+\]")
# The elements whose text is one paragraph or list item; a reST literal block's "::" ends one.
BLOCKS = frozenset(("p", "li", "dd", "dt", "td", "th", "h1", "h2", "h3", "h4", "h5", "h6"))


class _PageText(HTMLParser):
    """Collect a page's visible text: every block's text, and the text of code blocks apart."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.code: list[str] = []
        self._current: list[str] = []
        self._hidden = 0  # inside <script> or <style>
        self._pre = 0  # inside <pre>: a code block, where "::" may be code

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._hidden += 1
        elif tag == "pre":
            self._end_block()
            self._pre += 1
        elif tag in BLOCKS:
            self._end_block()

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden -= 1
        elif tag == "pre":
            self.code.append("".join(self._current))
            self._current = []
            self._pre -= 1
        elif tag in BLOCKS:
            self._end_block()

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self._current.append(data)

    def _end_block(self) -> None:
        text = " ".join("".join(self._current).split())
        if text and not self._pre:
            self.blocks.append(text)
        if not self._pre:
            self._current = []


def _page_text(path: Path) -> _PageText:
    parser = _PageText()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the documentation as CI does, once, into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


@pytest.fixture(scope="session")
def pages(site: Path) -> dict[str, _PageText]:
    """Every built HTML page's text, by its path in the site."""
    return {str(path.relative_to(site)): _page_text(path) for path in sorted(site.rglob("*.html"))}


def test_no_page_shows_a_sphinx_role(pages: dict[str, _PageText]) -> None:
    """No `:class:`, `:meth:` or other Sphinx role reaches a reader, in prose or code."""
    found = [
        f"{page}: {match.group()!r} in {text[:120]!r}"
        for page, parsed in pages.items()
        for text in parsed.blocks + parsed.code
        for match in ROLE.finditer(text)
    ]
    assert found == []


def test_no_paragraph_ends_in_a_literal_block_marker(pages: dict[str, _PageText]) -> None:
    """A reST `::` before a code block is gone: the block is a fenced Markdown one."""
    found = [
        f"{page}: {text[-120:]!r}"
        for page, parsed in pages.items()
        for text in parsed.blocks
        if text.endswith("::")
    ]
    assert found == []


def test_no_page_shows_an_unresolved_cross_reference(pages: dict[str, _PageText]) -> None:
    """Every `[title][identifier]` became a link; none is left as brackets."""
    found = [
        f"{page}: {match.group()!r} in {text[:120]!r}"
        for page, parsed in pages.items()
        for text in parsed.blocks
        for match in UNRESOLVED_REFERENCE.finditer(text)
    ]
    assert found == []


def _anchors(path: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))


def _public_adapter_modules() -> list[str]:
    return [
        f"ssecast.{module.name}"
        for module in pkgutil.iter_modules(ssecast.__path__)
        if not module.name.startswith("_")
    ]


def test_reference_has_an_anchor_for_every_public_name(site: Path) -> None:
    """The API reference documents each name in `ssecast.__all__` and in each adapter's."""
    anchors = _anchors(site / "reference" / "index.html")
    names = [f"ssecast.{name}" for name in ssecast.__all__]
    for module_name in _public_adapter_modules():
        module = importlib.import_module(module_name)
        names.append(module_name)
        names.extend(f"{module_name}.{name}" for name in module.__all__)
    assert {"ssecast.asgi", "ssecast.flask", "ssecast.django", "ssecast.redis"} <= set(names)
    assert [name for name in names if name not in anchors] == []


def test_every_cross_reference_in_a_docstring_names_a_reference_anchor(site: Path) -> None:
    """Cross-references in docstrings the reference does not render still point somewhere."""
    anchors = _anchors(site / "reference" / "index.html")
    package = Path(ssecast.__file__).resolve().parent
    written = {
        f"{path.name}: {identifier}"
        for path in sorted(package.glob("*.py"))
        for docstring in _docstrings(path)
        for identifier in re.findall(r"\]\[([A-Za-z_][\w.]*)\]", docstring)
        if identifier not in anchors
    }
    assert written == set()


def _docstrings(path: Path) -> list[str]:
    """Every string statement of a module: docstrings, and the strings after attributes."""
    return [
        node.value.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]


# mkdocstrings-python's default `line_length`: a longer signature goes to the formatter.
SIGNATURE_LINE_LENGTH = 60
SIGNATURE = re.compile(r'<div class="doc-signature highlight"><pre>(.*?)</pre>', re.DOTALL)


def test_long_signatures_are_formatted(site: Path) -> None:
    """A formatter from the `docs` extra (Ruff) breaks long signatures, one parameter a line."""
    page = (site / "reference" / "index.html").read_text(encoding="utf-8")
    signatures = [html.unescape(re.sub(r"<[^>]+>", "", code)) for code in SIGNATURE.findall(page)]
    assert len(signatures) > 30
    lines = [line for code in signatures for line in code.splitlines()]
    too_long = [line for line in lines if len(line) > SIGNATURE_LINE_LENGTH]
    assert too_long == []
