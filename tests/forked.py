"""A broadcaster made before a fork, used by the parent and by two forked children.

Run as a script by test_backend_contract.py, in a process of its own (pytest's threads
must not be forked): ``python forked.py memory``, ``python forked.py redis URL PREFIX`` or
``python forked.py postgres DSN TABLE``.
It does what a pre-forking server does (gunicorn --preload): the broadcaster is made at
import time and used in the parent. Both children are forked from the same state of it,
as workers are, while a thread of the parent keeps publishing on another broadcaster.
Each child subscribes, publishes and reads its own events; the second also resumes from
an id the first child gave. It prints one JSON object with what each of them saw.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from sse_parser import parse
from ssecast import Backend, Broadcaster, Subscription
from ssecast.postgres import PostgresBackend
from ssecast.redis import RedisBackend

KIND = sys.argv[1]
BACKEND: Backend | None = None
if KIND == "redis":
    BACKEND = RedisBackend(sys.argv[2], prefix=sys.argv[3])
elif KIND == "postgres":
    BACKEND = PostgresBackend(sys.argv[2], table=sys.argv[3])
broadcaster = Broadcaster(backend=BACKEND, heartbeat=0.2, history=100)
churning = Broadcaster()


def read(sub: Subscription, count: int, timeout: float = 20.0) -> list[dict[str, str]]:
    """Read ``sub`` until ``count`` events arrived; return them as (type, id, data)."""
    stream = b""
    deadline = time.monotonic() + timeout
    while len(events := parse(stream).events) < count and time.monotonic() < deadline:
        stream += next(sub)
    return [{"type": e.type, "id": e.last_event_id, "data": e.data} for e in events]


def child(number: int, resume_from: str | None) -> dict[str, Any]:
    churning.publish("t", "a lock the parent's thread held at the fork is free here")
    channel = f"child-{number}"
    with broadcaster.subscribe(channel) as own:
        ids = [broadcaster.publish("t", f"{channel} {k}", channel=channel).id for k in range(3)]
        got = read(own, 3)
    resumed = None
    if resume_from is not None:
        with broadcaster.subscribe("child-0", last_event_id=resume_from) as sub:
            # Exactly the other two events of the first child, or (memory) a gap.
            resumed = read(sub, 1 if KIND == "memory" else 2, timeout=5.0)
    return {"ids": ids, "got": got, "resumed": resumed}


def exit_child(code: int) -> None:
    """Leave a forked child at once, saving its coverage data first (os._exit skips that)."""
    try:
        import coverage
    except ImportError:  # pragma: no cover - the test suite runs under coverage
        measuring = None
    else:
        measuring = coverage.Coverage.current()
    if measuring:
        measuring.stop()
        measuring.save()
    os._exit(code)


def fork(number: int, resume_from: str | None) -> dict[str, Any]:
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reading)
        try:
            result = child(number, resume_from)
        except BaseException as error:
            result = {"error": repr(error)}
        with os.fdopen(writing, "w") as pipe:
            json.dump(result, pipe)
        exit_child(0)
    os.close(writing)
    with os.fdopen(reading) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    return dict(json.loads(text))


def main() -> None:
    before = broadcaster.publish("t", "parent, before the forks")
    parent_sub = broadcaster.subscribe()  # the parent serves a client of its own
    stop = threading.Event()
    churned: list[str] = []

    def churn() -> None:  # publishing, so that a fork may come while a lock is held
        while not stop.is_set() and len(churned) < 100_000:
            churned.append(churning.publish("t", "churn").id)

    thread = threading.Thread(target=churn)
    thread.start()
    children = []
    resume_from = None
    for number in range(2):
        children.append(fork(number, resume_from))
        resume_from = children[0].get("ids", [None])[0]
    stop.set()
    thread.join()
    after = broadcaster.publish("t", "parent, after the forks")
    parent_got = read(parent_sub, 1)
    broadcaster.close()
    print(
        json.dumps(
            {
                "parent_ids": [before.id, after.id],
                "parent_got": parent_got,
                "children": children,
            }
        )
    )


if __name__ == "__main__":
    main()
