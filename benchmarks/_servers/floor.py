"""The floor: a bare asyncio server that writes each pre-encoded frame to every socket.

No framework, no per-client task on the write path, no HTTP chunking: ``publish``
encodes the frame once and calls ``transport.write`` for every connection. Nothing in
Python delivers bytes to N sockets for much less. A connection whose unsent bytes pass
``WRITE_LIMIT`` is dropped (as ssecast evicts a slow client) so memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from _control import EVENT_TYPE, Payload, Publisher, dumps, start_from_query

WRITE_LIMIT = 4 * 1024 * 1024

HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Accel-Buffering: no\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b":\n\n"
)


class Floor:
    def __init__(self) -> None:
        self.clients: set[asyncio.WriteTransport] = set()
        self.dropped = 0
        self.publisher = Publisher(self.publish)
        self._prefix = b"event: " + EVENT_TYPE.encode() + b"\ndata: "

    def publish(self, payload: Payload) -> None:
        frame = b"id: %d\n%s%s\n\n" % (payload["seq"], self._prefix, dumps(payload).encode())
        slow = []
        for transport in self.clients:
            if transport.get_write_buffer_size() > WRITE_LIMIT:
                slow.append(transport)
            else:
                transport.write(frame)
        for transport in slow:
            self.clients.discard(transport)
            transport.abort()
            self.dropped += 1

    def stats(self) -> dict[str, Any]:
        return {
            **self.publisher.stats(),
            "subscribers": len(self.clients),
            "evicted": self.dropped,
        }

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
            path, _, query = target.partition(b"?")
            if path == b"/events":
                await self._stream(reader, writer)
                return
            status, body = b"200 OK", {}
            if path == b"/stats":
                body = self.stats()
            elif path == b"/start" and method == b"POST":
                try:
                    body = start_from_query(self.publisher, query.decode())
                except (RuntimeError, ValueError) as error:
                    status, body = b"409 Conflict", {"error": str(error)}
            else:
                status, body = b"404 Not Found", {"error": "not found"}
            data = json.dumps(body).encode()
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(data), data)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        transport.write(HEADERS)
        self.clients.add(transport)
        try:
            while await reader.read(4096):
                pass  # a GET has no body; this returns b"" when the client goes
        finally:
            self.clients.discard(transport)


async def serve(port: int) -> None:
    floor = Floor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    server = await asyncio.start_server(floor.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await stop.wait()
        for transport in list(floor.clients):
            transport.abort()
        await asyncio.sleep(0.1)  # let the handlers see their connections end


def main(port: int) -> None:
    asyncio.run(serve(port))
