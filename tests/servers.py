"""Real server processes for the adapter tests: start on a free port, stop by pid."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server process the test started, and where to reach it."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Return everything the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> float:
        """Send ``sig``; return the seconds until the server exited (killed at ``timeout``).

        A stop that took ``timeout`` seconds was a hang. The default is ten times the longest
        graceful timeout a test server runs with (5 s), which a stop may wait out; a server
        killed instead loses its coverage data.
        """
        if self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.monotonic() - started


def tail(text: str, lines: int = 40) -> str:
    """The last ``lines`` lines of ``text``, for a failure's message."""
    return "\n".join(text.splitlines()[-lines:])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout} s")


@contextmanager
def running(
    argv: Sequence[str],
    *,
    port: int,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    cwd: Path = TESTS,
    measured: bool = True,
) -> Iterator[Server]:
    """Run ``argv`` (which must listen on ``port``) until the block ends, then stop it.

    Start Python tools as ``[PYTHON, "-m", "uvicorn", ...]`` so they run in this venv.
    The command runs with this interpreter's environment plus ``env``, from ``cwd`` (the
    tests folder unless given); the tests folder is on ``PYTHONPATH`` either way, so test
    apps import as top-level modules. Under ``--cov`` its Python processes are measured
    too, unless ``measured`` is false: then they run as a user's would, without coverage's
    own SIGTERM handler.
    """
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    merged = {**os.environ, "PYTHONPATH": path, **(env or {})}
    if not measured:
        for name in [name for name in merged if name.startswith("COVERAGE_PROCESS_")]:
            del merged[name]
    with tempfile.NamedTemporaryFile(prefix="ssecast-server-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=merged,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", port, process, log_path)
    try:
        try:
            _wait_for_port(port, process, timeout)
        except (RuntimeError, TimeoutError) as error:
            raise type(error)(f"{error}; {argv[0]} printed:\n{tail(server.log())}") from None
        yield server
    finally:
        server.stop()
