"""SSE requests over bare sockets: cheap enough to hold a thousand of, opened many at once."""

from __future__ import annotations

import asyncio


class RawStream:
    """One SSE request over a bare socket: what it received, and whether it ended cleanly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = b""

    @classmethod
    async def open(cls, port: int, channel: str, *, body: bytes | None = None) -> RawStream:
        """Send the request (with the start of a chunked body if given), read the opening."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"GET /events/?channel={channel} HTTP/1.1\r\nHost: x\r\n"
        if body is not None:
            head += "Transfer-Encoding: chunked\r\n"
        writer.write(f"{head}\r\n".encode() + (body or b""))
        stream = cls(reader, writer)
        while b"\r\n\r\n" not in stream.received or b":\n\n" not in stream.received:
            chunk = await reader.read(4096)
            if not chunk:
                raise ConnectionError(f"closed early: {stream.received!r}")
            stream.received += chunk
        assert stream.received.startswith(b"HTTP/1.1 200 "), stream.received
        return stream

    async def read_to_end(self) -> bool:
        """Read until the response ends; return whether it ended cleanly (last chunk)."""
        while not self.ended_cleanly:
            chunk = await self.reader.read(65536)
            if not chunk:
                break
            self.received += chunk
        return self.ended_cleanly

    @property
    def ended_cleanly(self) -> bool:
        """Whether the chunked response ended with its zero-length last chunk."""
        return self.received.endswith(b"\r\n0\r\n\r\n")

    def close(self) -> None:
        """Close the socket: the client leaves."""
        self.writer.close()


async def open_many(port: int, count: int, channel: str, at_once: int = 50) -> list[RawStream]:
    """Open ``count`` streams to ``channel``, at most ``at_once`` connecting at a time."""
    gate = asyncio.Semaphore(at_once)

    async def one() -> RawStream:
        async with gate:
            return await RawStream.open(port, channel)

    async with asyncio.timeout(60):
        return await asyncio.gather(*(one() for _ in range(count)))
