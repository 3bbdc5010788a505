"""Events as a browser's EventSource would dispatch them, read through httpx-sse.

Once it has seen an id, httpx-sse also yields an "event" for every block without a data
line: each heartbeat comment and each ``retry:`` field. The specification dispatches
none of those, and a test counting events must not count them either. Every frame
ssecast sends names its type, so such a block is the only thing that shows up as a
``message`` with empty data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from httpx_sse import ServerSentEvent


def dispatched(event: ServerSentEvent) -> bool:
    """Whether an ``EventSource`` would dispatch ``event``."""
    return not (event.event == "message" and event.data == "")


def events(source: Iterator[ServerSentEvent]) -> Iterator[ServerSentEvent]:
    """Yield the events of ``iter_sse()`` that an ``EventSource`` would dispatch."""
    return filter(dispatched, source)


async def aevents(source: AsyncIterator[ServerSentEvent]) -> AsyncIterator[ServerSentEvent]:
    """Yield the events of ``aiter_sse()`` that an ``EventSource`` would dispatch."""
    async for event in source:
        if dispatched(event):
            yield event
