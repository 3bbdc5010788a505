"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ssecast import Broadcaster


@pytest.fixture
def broadcaster() -> Iterator[Broadcaster]:
    """A broadcaster with default settings, closed after the test."""
    with Broadcaster() as b:
        yield b
