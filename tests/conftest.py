"""Fixtures shared by every test module."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import TESTS
from ssecast import Broadcaster

JS = TESTS / "js"

# uvicorn picks uvloop and httptools when they are installed (the bench extra installs them
# for the benchmarks); the tests' servers run on its defaults, asyncio and h11, unless a
# test names others on the command line. Set here, before any server starts.
os.environ.setdefault("UVICORN_LOOP", "asyncio")
os.environ.setdefault("UVICORN_HTTP", "h11")


@pytest.fixture
def broadcaster() -> Iterator[Broadcaster]:
    """A broadcaster with default settings, closed after the test."""
    with Broadcaster() as b:
        yield b


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """tests/js/node_modules as its package-lock.json says; ``npm ci`` when it is not."""
    lock = (JS / "package-lock.json").read_bytes()
    stamp = JS / "node_modules" / ".ssecast-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return JS / "node_modules"
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail(
            "the browser and EventSource tests need npm to install the packages tests/js/"
            "package-lock.json pins: install Node.js with npm (Debian: apt-get install npm)"
        )
    command = [npm, "ci", "--prefix", str(JS), "--ignore-scripts", "--no-audit", "--no-fund"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    stamp.write_text(digest)
    return JS / "node_modules"
