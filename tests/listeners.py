"""EventSource clients nobody here wrote, for the restart tests: npm's and Chromium's.

Both report what each source saw as the same records: ``{"client", "kind", "id", "data",
"state", "ms"}``, where ``kind`` is ``open``, ``error`` or an event type, ``state`` the
source's ``readyState`` then (2: it gave up for good) and ``ms`` the wall clock.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver

from servers import TESTS

Record = dict[str, Any]

HANG = 60.0
"""Seconds any wait here allows: ten times the slowest recovery seen on a loaded machine."""

# Installed in a page of the server's origin: opens plain EventSources that record what
# they see in window.seen, as tests/js/listen.mjs prints it.
_RECORDER = """
window.seen = window.seen || [];
window.openSources = window.openSources || [];
const url = arguments[0], count = arguments[1], types = arguments[2];
for (let i = 0; i < count; i++) {
  const client = window.openSources.length;
  const source = new EventSource(url);
  window.openSources.push(source);
  const say = (kind, event) => window.seen.push({
    client, kind, id: event.lastEventId || "", data: event.data || "",
    state: source.readyState, ms: Date.now(),
  });
  source.onopen = (event) => say("open", event);
  source.onerror = (event) => say("error", event);
  for (const type of types) source.addEventListener(type, (event) => say(type, event));
}
"""


class NpmListeners:
    """``count`` EventSources of the ``eventsource`` package in one Node process."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self._records: list[Record] = []
        self._lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._records.append(json.loads(line))

    def records(self) -> list[Record]:
        """Everything seen so far, in order."""
        with self._lock:
            return list(self._records)


@contextmanager
def npm_listeners(
    node_modules: Path, url: str, count: int, types: Sequence[str]
) -> Iterator[NpmListeners]:
    """Run ``count`` npm EventSources on ``url`` until the block ends; stop them by pid."""
    node = shutil.which("node")
    assert node is not None, "the restart tests need Node.js (Debian: apt-get install nodejs)"
    script = TESTS / "js" / "listen.mjs"
    argv = [node, str(script), url, str(count), str(int(HANG * 3)), *types]
    process = subprocess.Popen(argv, cwd=node_modules.parent, stdout=subprocess.PIPE, text=True)
    listeners = NpmListeners(process)
    try:
        yield listeners
    finally:
        process.kill()
        process.wait()
        listeners.reader.join()
        assert process.stdout is not None
        process.stdout.close()


def browser_listen(browser: webdriver.Chrome, url: str, count: int, types: Sequence[str]) -> None:
    """Open ``count`` plain EventSources on ``url`` in the page ``browser`` shows."""
    browser.execute_script(_RECORDER, url, count, list(types))


def browser_records(browser: webdriver.Chrome) -> list[Record]:
    """Everything the page's recorded EventSources saw so far, in order."""
    records: list[Record] = browser.execute_script("return window.seen || []")
    return records


def by_client(records: list[Record], count: int = 0) -> dict[int, list[Record]]:
    """The records of each client, in order; clients 0 to ``count - 1`` even with none yet."""
    clients: dict[int, list[Record]] = {client: [] for client in range(count)}
    for record in records:
        clients.setdefault(record["client"], []).append(record)
    return clients


def wait_until(
    condition: Callable[[], Any],
    what: str,
    timeout: float = HANG,
    fail: Callable[[], str] | None = None,
) -> Any:
    """Return ``condition()`` once it is true; fail after ``timeout`` seconds.

    The failure's message ends with ``fail()``, when given: what the test knows then.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}" + (f"\n{fail()}" if fail else ""))


def report(label: str, clients: int, outages: int, waits: list[float]) -> None:
    """Print the figures docs/reliability.md reports: ``waits`` are seconds to recover."""
    print(
        f"{label}: {clients} clients, {outages} outages, {len(waits)} recoveries, seconds to "
        f"recover: median {statistics.median(waits):.2f}, worst {max(waits):.2f}"
    )
