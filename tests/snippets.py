"""Find the code blocks of the README and the docs, and what their markers say to do with them.

The convention, which CONTRIBUTING.md states for writers:

- every ``python`` block of a page runs, in order, in one fresh interpreter per page and
  one namespace, so a block may use what an earlier block of its page defined (the
  numbered steps of a framework page build one app); nothing else is predefined;
- a block whose first line is a comment naming a file (``# prices/events.py``) is also
  saved as that file in the page's temporary directory, which is the interpreter's working
  directory and on ``sys.path``, so later blocks (and pytest blocks) can import it;
- top-level ``await`` is allowed: such a block runs in ``asyncio.run``;
- ``<!-- snippet: fragment -->`` on the line directly above a fence: not run (a piece of a
  larger program that cannot stand alone);
- ``<!-- snippet: pytest -->`` on the line directly above a fence: a pytest test module,
  saved in the page's directory and run by pytest in a subprocess; it must pass.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))

MARKER = re.compile(r"<!--\s*snippet:\s*(?P<kind>\S*)\s*-->")
KINDS = ("fragment", "pytest")
_FENCE = re.compile(r"(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
_FILE_COMMENT = re.compile(r"#\s*(?P<path>[\w./-]+\.py)\s*$")
PYTHON_LANGUAGES = ("python", "py", "python3")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # of the first line inside the fence, 1-based
    language: str
    source: str  # dedented to the fence's indentation
    marker: str | None  # the kind named by a marker directly above the fence

    @property
    def location(self) -> str:
        """``docs/quickstart.md:18``: where a reader finds it."""
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def file_name(self) -> str | None:
        """The file the block says it is (``# app.py`` as its first line), if any."""
        first = self.source.split("\n", 1)[0]
        match = _FILE_COMMENT.fullmatch(first.strip())
        return match["path"] if match else None


def blocks(page: Path) -> list[Block]:
    """Return every fenced block of ``page`` in order, with the marker above it."""
    lines = page.read_text().split("\n")
    found = []
    index = 0
    while index < len(lines):
        opening = _FENCE.fullmatch(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        above = lines[index - 1].strip() if index else ""
        marker = MARKER.fullmatch(above)
        end = index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and lines[end].strip().strip(fence[0]) == ""
        ):
            end += 1
        body = [
            line[len(indent) :] if line.startswith(indent) else line.lstrip()
            for line in lines[index + 1 : end]
        ]
        found.append(
            Block(
                page=page,
                line=index + 2,
                language=opening["info"].lower(),
                source=textwrap.dedent("\n".join(body)) + "\n",
                marker=marker["kind"] if marker else None,
            )
        )
        index = end + 1
    return found


def stray_markers(page: Path) -> list[str]:
    """Return the locations of markers not directly above a fence (a typo, or a lost block)."""
    lines = page.read_text().split("\n")
    return [
        f"{page.relative_to(ROOT)}:{number}"
        for number, line in enumerate(lines, 1)
        if MARKER.fullmatch(line.strip())
        and (number == len(lines) or _FENCE.fullmatch(lines[number]) is None)
    ]
