"""The real ``curl`` binary on an event stream: what it printed, read up to a deadline."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sse_parser import ParsedStream, parse

# Ten times what reaching the events a test waits for takes on a loaded machine (about 3 s:
# a server's first half-second publish, or a POST); only a hang reaches it.
STREAM_TIMEOUT = 30.0


class Curl:
    """A running ``curl -N``: what it printed so far, read without blocking past a deadline."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.output = b""

    def until(self, enough: int | None = None) -> ParsedStream:
        """Read until ``enough`` events (or, with ``None``, any byte) came; return the stream."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + STREAM_TIMEOUT
        while True:
            stream = parse(self.output)
            if (len(stream.events) >= enough) if enough is not None else self.output:
                return stream
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"curl printed too little in {STREAM_TIMEOUT} s: {self.output!r}"
            if select.select([self.process.stdout], [], [], remaining)[0]:
                chunk = os.read(self.process.stdout.fileno(), 65536)
                assert chunk, f"curl ended after printing {self.output!r}"
                self.output += chunk

    def end(self) -> int:
        """Read the rest until curl exits (the server ended the stream); return its exit code."""
        rest, _ = self.process.communicate(timeout=STREAM_TIMEOUT)
        self.output += rest
        return self.process.returncode


@contextmanager
def curl(argv: list[str]) -> Iterator[Curl]:
    """Run ``argv`` (a curl command line) until the block ends, then stop it."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield Curl(process)
    finally:
        if process.returncode is None:
            process.terminate()
            process.communicate()
