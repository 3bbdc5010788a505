"""Raw-socket HTTP/1.1 clients for the reliability tests: cheap enough to run hundreds at once.

httpx costs more CPU per event than the server under test, and on a shared 2-core machine
that would make the clients, not the server, drop behind. These clients parse only what the
tests check: the status line and headers, chunked transfer coding, and SSE frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Chunked",
    "Response",
    "SeqReader",
    "exchange",
    "get_json",
    "open_stream",
    "parse_head",
    "post_json",
    "read_head",
    "request_bytes",
    "stalled_socket",
]

_SEQ = re.compile(rb'\ndata: \{"seq":(\d+),')


def request_bytes(
    path: str, host: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> bytes:
    """Return a GET request for ``path``, as an EventSource's unless ``headers`` say otherwise."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
    merged = {"Accept": "text/event-stream", **(headers or {})}
    lines += [f"{name}: {value}" for name, value in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class Response:
    """A response's status, headers (lower-case names) and the body bytes read with them."""

    status: int
    headers: dict[str, str]
    rest: bytes


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """Parse a status line and header lines (without the blank line)."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_head(reader: asyncio.StreamReader) -> Response:
    """Read up to the end of the response headers."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = parse_head(head[:-4])
    return Response(status, headers, b"")


async def open_stream(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Response]:
    """Connect, send a GET for ``path`` and read the response headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(request_bytes(path, headers=headers))
    response = await read_head(reader)
    return reader, writer, response


class Chunked:
    """An incremental decoder of HTTP/1.1 chunked transfer coding."""

    def __init__(self) -> None:
        self._buffer = b""
        self.finished = False
        """Whether the terminal zero-length chunk arrived: the server ended the response."""

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the socket; return the body bytes they complete."""
        self._buffer += data
        out = []
        while not self.finished:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                break
            size = int(self._buffer[:line_end].split(b";")[0], 16)
            if len(self._buffer) < line_end + 2 + size + 2:
                break
            start = line_end + 2
            out.append(self._buffer[start : start + size])
            self._buffer = self._buffer[start + size + 2 :]
            if size == 0:
                self.finished = True
        return b"".join(out)


@dataclass
class SeqReader:
    """Counts the ``tick`` events of a burst and checks that their ``seq`` runs 0, 1, 2, ...

    Each frame's data begins ``{"seq":N,``; a gap, a repeat or a reordering is an error.
    """

    received: int = 0
    errors: list[str] = field(default_factory=list)
    _tail: bytes = b"\n"

    def feed(self, body: bytes) -> None:
        """Take body bytes; count the complete frames among them."""
        text = self._tail + body
        cut = text.rfind(b"\n\n")
        if cut < 0:
            self._tail = text
            return
        # Keep the last "\n" so that the next frame's first line still follows a newline.
        complete, self._tail = text[: cut + 2], text[cut + 1 :]
        for match in _SEQ.finditer(complete):
            seq = int(match.group(1))
            if seq != self.received:
                self.errors.append(f"expected seq {self.received}, got {seq}")
                if len(self.errors) > 10:
                    raise AssertionError(self.errors)
            self.received = seq + 1


def exchange(
    port: int, request: bytes, timeout: float = 15.0, *, first_chunk_only: bool = True
) -> dict[str, Any]:
    """Send raw ``request``; return the status, headers and body.

    Of a stream, the body is its first chunk (``first_chunk_only``), or what arrived until
    a heartbeat comment followed the opening one, for servers that write the opening, the
    replay and the heartbeats separately (WSGI).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may refuse a huge request before reading all of it.
        with contextlib.suppress(OSError):
            sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                piece = b""
            if not piece:
                return {"status": None, "headers": {}, "body": data}
            data += piece
        head, _, rest = data.partition(b"\r\n\r\n")
        status, headers = parse_head(head)
        if request.startswith(b"HEAD "):
            body = rest  # no body follows the headers of a HEAD response
        elif headers.get("content-type", "").startswith("text/event-stream"):
            body = _read_stream(sock, headers, rest, first_chunk_only)
        elif headers.get("transfer-encoding") == "chunked":
            chunked = Chunked()
            body = chunked.feed(rest)
            while not chunked.finished:
                piece = sock.recv(65536)
                if not piece:
                    break
                body += chunked.feed(piece)
        else:
            length = int(headers.get("content-length", "0"))
            body = rest
            while len(body) < length:
                piece = sock.recv(65536)
                if not piece:
                    break
                body += piece
        return {"status": status, "headers": headers, "body": body}


def _read_stream(
    sock: socket.socket, headers: dict[str, str], rest: bytes, first_chunk_only: bool
) -> bytes:
    chunked = Chunked() if headers.get("transfer-encoding") == "chunked" else None
    body = chunked.feed(rest) if chunked else rest
    deadline = time.monotonic() + 3.0

    def enough() -> bool:
        if first_chunk_only:
            return bool(body) if chunked else b"\n\n" in body
        return body.count(b":\n\n") >= 2 or time.monotonic() > deadline

    while not enough() and not (chunked and chunked.finished):
        piece = sock.recv(65536)
        if not piece:
            break
        body += chunked.feed(piece) if chunked else piece
    return body


def get_json(port: int, path: str) -> Any:
    """GET a control route."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        return json.loads(reply.read())


def post_json(port: int, path: str) -> Any:
    """POST to a control route."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def stalled_socket(port: int, path: str, rcvbuf: int = 4096) -> socket.socket:
    """Open a stream that never reads, with a small receive buffer so the server feels it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request_bytes(path))
    return sock
