"""What every benchmark server shares: the publisher loop, the control endpoints, the process setup.

Each server process runs its own publisher, started by the load client with
``POST /start?rate=R&seconds=S&burst=B&thread=0|1`` once all its clients are connected, so every
server is driven the same way. ``GET /stats`` answers JSON: subscribers, run, published,
publishing, plus whatever the server adds, and (from ``control_app``) the pid of the process
that serves it. The event's data is the same JSON object for every server,
``{"run": r, "seq": n, "t": time.time_ns()}``, serialized once per event.

``run_asgi`` serves an app with the ASGI server that ``HTTP_FANOUT_ASGI`` names.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Payload = dict[str, int]
Publish = Callable[[Payload], Awaitable[None] | None]

CHANNEL = "bench"
EVENT_TYPE = "tick"


def dumps(payload: Payload) -> str:
    """Serialize the payload as every server does: compact JSON, once per event."""
    return json.dumps(payload, separators=(",", ":"))


class Publisher:
    """Runs one publishing run at a time, from a task of the server's loop or from a thread.

    ``rate`` events per second (0: as fast as possible, yielding to the loop after every
    ``burst`` events) for ``seconds`` of wall time. A publisher that falls behind its
    schedule publishes the next event at once (a task yields to the loop in between),
    and stops at the deadline whatever it managed: a stalled publisher shows as fewer
    published events, not as a longer run.

    With ``thread``, a thread keeps the schedule by the wall clock, whatever the loop is
    doing. It calls ``threadsafe`` when the server has a thread-safe publish (ssecast's
    ``Broadcaster.publish``), else hands each event to the loop with
    ``call_soon_threadsafe``, as an application with a thread producer must.
    """

    def __init__(self, publish: Publish, threadsafe: Callable[[Payload], object] | None = None):
        self._publish = publish
        self._threadsafe = threadsafe
        self.run = 0
        self.published = 0
        self.publishing = False
        self.failed = ""
        self._tasks: set[asyncio.Future[Any]] = set()

    def start(self, rate: float, seconds: float, burst: int, thread: bool = False) -> int:
        if self.publishing:
            raise RuntimeError("a run is in progress")
        if thread and rate <= 0:
            raise ValueError("a thread publisher needs a rate")
        self.run += 1
        self.published = 0
        self.publishing = True
        self.failed = ""
        loop = asyncio.get_running_loop()
        if thread:
            threading.Thread(
                target=self._thread, args=(loop, self.run, rate, seconds), daemon=True
            ).start()
        else:
            self._keep(loop.create_task(self._loop(self.run, rate, seconds, max(1, burst))))
        return self.run

    async def _loop(self, run: int, rate: float, seconds: float, burst: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + seconds
        publish = self._publish
        seq = 0
        per_turn = 1 if rate > 0 else burst
        try:
            while loop.time() < deadline:
                for _ in range(per_turn):
                    result = publish({"run": run, "seq": seq, "t": time.time_ns()})
                    if result is not None:
                        await result
                    seq += 1
                self.published = seq
                delay = started + seq / rate - loop.time() if rate > 0 else 0.0
                await asyncio.sleep(delay if delay > 0 else 0)
        except Exception as error:  # reported through /stats; the benchmark shows it
            self.failed = repr(error)
        finally:
            self.published = seq
            self.publishing = False

    def _thread(self, loop: asyncio.AbstractEventLoop, run: int, rate: float, seconds: float):
        started = time.monotonic()
        deadline = started + seconds
        threadsafe = self._threadsafe
        seq = 0
        try:
            while time.monotonic() < deadline:
                payload = {"run": run, "seq": seq, "t": time.time_ns()}
                if threadsafe is not None:
                    threadsafe(payload)
                else:
                    loop.call_soon_threadsafe(self._in_loop, payload)
                seq += 1
                self.published = seq
                delay = started + seq / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except Exception as error:  # reported through /stats; the benchmark shows it
            self.failed = repr(error)
        finally:
            self.published = seq
            self.publishing = False

    def _in_loop(self, payload: Payload) -> None:
        result = self._publish(payload)
        if result is not None:
            self._keep(asyncio.ensure_future(result))

    def _keep(self, task: asyncio.Future[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def stats(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "published": self.published,
            "publishing": self.publishing,
            "failed": self.failed,
        }


def start_from_query(publisher: Publisher, query: str) -> dict[str, Any]:
    """Start a run from ``rate``, ``seconds``, ``burst`` and ``thread`` query parameters."""
    params = {name: values[-1] for name, values in parse_qs(query).items()}
    run = publisher.start(
        float(params.get("rate", "0")),
        float(params.get("seconds", "5")),
        int(params.get("burst", "1")),
        params.get("thread", "0") == "1",
    )
    return {"run": run}


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def control_app(
    events: ASGIApp,
    publisher: Publisher,
    stats: Callable[[], dict[str, Any]],
    on_startup: Callable[[], Awaitable[None]] | None = None,
) -> ASGIApp:
    """Wrap the ``/events`` app with ``/stats``, ``/start`` and the lifespan, in plain ASGI.

    Plain ASGI, so the control endpoints add nothing to the streaming path of any server.
    """

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if on_startup is not None:
                        await on_startup()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        if path == "/events" or path.startswith("/events/"):
            await events(scope, receive, send)
            return
        status = 200
        if path == "/stats":
            body: dict[str, Any] = {**publisher.stats(), **stats(), "pid": os.getpid()}
        elif path == "/start" and scope["method"] == "POST":
            try:
                body = start_from_query(publisher, scope["query_string"].decode())
            except (RuntimeError, ValueError) as error:
                status, body = 409, {"error": str(error)}
        else:
            status, body = 404, {"error": "not found"}
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    return app


def setup_process(cpu: int | None) -> None:
    """Pin this process to ``cpu`` and raise its open-file limit as far as allowed."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as error:
            print(f"could not pin to CPU {cpu}: {error}", file=sys.stderr)
    raise_nofile()


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


ASGI_SERVERS = {
    # name -> (server, event loop, HTTP/1.1 parser where the server has a choice)
    "uvicorn": ("uvicorn", "asyncio", "h11"),
    "uvicorn-httptools": ("uvicorn", "asyncio", "httptools"),
    "uvicorn-uvloop": ("uvicorn", "uvloop", "h11"),
    "uvicorn-standard": ("uvicorn", "uvloop", "httptools"),
    "hypercorn": ("hypercorn", "asyncio", "h11"),
    "hypercorn-uvloop": ("hypercorn", "uvloop", "h11"),
    "granian": ("granian", "asyncio", ""),
    "granian-uvloop": ("granian", "uvloop", ""),
}
DEFAULT_ASGI_SERVER = "uvicorn"
ASGI_SERVER_ENV = "HTTP_FANOUT_ASGI"
BACKLOG = 4096


def run_asgi(app: ASGIApp, port: int) -> None:
    """Serve ``app`` on 127.0.0.1:``port``, quietly, with the ASGI server the environment names.

    ``HTTP_FANOUT_ASGI`` holds a name of ``ASGI_SERVERS`` (uvicorn with asyncio and h11
    when unset). Each stops within about a second of SIGTERM or SIGINT, open streams or not.
    """
    name = os.environ.get(ASGI_SERVER_ENV) or DEFAULT_ASGI_SERVER
    if name not in ASGI_SERVERS:
        raise ValueError(f"{ASGI_SERVER_ENV}={name!r}: not one of {', '.join(ASGI_SERVERS)}")
    server, loop, http = ASGI_SERVERS[name]
    if server == "uvicorn":
        run_uvicorn(app, port, loop, http)
    elif server == "hypercorn":
        run_hypercorn(app, port, loop)
    else:
        run_granian(app, port, loop)


def run_uvicorn(app: ASGIApp, port: int, loop: str, http: str) -> None:
    """Serve ``app`` with uvicorn: ``loop`` asyncio or uvloop, ``http`` h11 or httptools."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop=loop,
        http=http,
        lifespan="on",
        log_level="warning",
        access_log=False,
        backlog=BACKLOG,
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run()


def run_hypercorn(app: ASGIApp, port: int, loop: str) -> None:
    """Serve ``app`` with hypercorn's asyncio worker in this process, on ``loop``."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.backlog = BACKLOG
    config.graceful_timeout = 1.0
    config.loglevel = "WARNING"
    config.accesslog = None

    async def main() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            running.add_signal_handler(signum, stop.set)
        await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def run_granian(app: ASGIApp, port: int, loop: str) -> None:
    """Serve ``app`` with granian's ASGI interface: one worker, one runtime thread, on ``loop``.

    granian forks its worker from this process (which keeps the listening socket and waits):
    the worker holds the streams, and ``/stats`` answers its pid. The app is built here
    before the fork, as uvicorn builds it before it starts its loop.
    """
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    server = Granian(
        "ssecast-benchmark",
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        workers=1,
        runtime_threads=1,
        loop=Loops(loop),
        backlog=BACKLOG,
        # At most this many requests at once per worker (backlog by default): streams
        # are requests that never end, so no lower cap than the open-file limit.
        backpressure=raise_nofile(),
        log_level=LogLevels.warning,
        workers_kill_timeout=2,
    )
    server.serve(target_loader=lambda: app, wrap_loader=False)
