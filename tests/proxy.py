"""A TCP proxy on loopback that a test can use to cut, or hold up, every connection at once."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from servers import free_port


class Proxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``, in a thread of its own."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready = threading.Event()
        self._flowing: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def drop_all(self) -> None:
        """Close both sides of every open connection, as a network failure would."""
        future = asyncio.run_coroutine_threadsafe(self._drop_all(), self._loop)
        future.result(timeout=5)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold up every byte in either direction for the duration of the block.

        The connections stay open, as with a peer that stopped reading (or a process
        that was stopped): what is sent meanwhile is delivered when the block ends.
        """
        self._loop.call_soon_threadsafe(self._flow().clear)
        try:
            yield
        finally:
            self._loop.call_soon_threadsafe(self._flow().set)

    def _flow(self) -> asyncio.Event:
        assert self._flowing is not None, "the proxy is not running"
        return self._flowing

    async def _drop_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing = asyncio.Event()
        self._flowing.set()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for writer in self._writers:
                writer.transport.abort()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target)
        self._writers |= {client, upstream}
        try:
            flowing = self._flow()
            await asyncio.gather(
                _pipe(client_reader, upstream, flowing), _pipe(upstream_reader, client, flowing)
            )
        finally:
            for writer in (client, upstream):
                self._writers.discard(writer)
                writer.transport.abort()

    def __enter__(self) -> Proxy:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
    writer.transport.abort()


@contextmanager
def proxy_to(target: int) -> Iterator[Proxy]:
    """Run a :class:`Proxy` to ``target`` for the duration of the block."""
    with Proxy(target) as proxy:
        yield proxy
