"""Start one benchmark server: ``python serve.py NAME --port P [--cpu N]``.

Pins itself to the CPU, raises its open-file limit, then serves until SIGTERM. With
``HTTP_FANOUT_PROFILE=PREFIX`` in the environment it runs under cProfile and writes
``PREFIX-NAME-PORT.prof`` when it stops (the profiler slows it: for finding hot spots only).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import importlib
import os
import signal
import sys

from _control import setup_process

# name -> (module, function)
SERVERS = {
    "ssecast": ("ssecast_app", "main"),
    "ssecast-starlette": ("ssecast_app", "main_starlette"),
    "ssecast-fastapi": ("ssecast_app", "main_fastapi"),
    "ssecast-ops": ("ssecast_app", "main_ops"),
    "sse-starlette-queues": ("sse_starlette_queues", "main"),
    "sse-starlette-broadcaster": ("sse_starlette_broadcaster", "main"),
    "floor": ("floor", "main"),
    "asgi-floor": ("asgi_floor", "main"),
    "ssecast-redis-worker": ("ssecast_redis", "worker"),
    "ssecast-redis-publisher": ("ssecast_redis", "publisher"),
    "ssecast-postgres-worker": ("ssecast_postgres", "worker"),
    "ssecast-postgres-publisher": ("ssecast_postgres", "publisher"),
    "flask-sse-worker": ("flask_sse_app", "worker"),
    "flask-sse-publisher": ("flask_sse_app", "publisher"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(SERVERS))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    args = parser.parse_args()
    setup_process(args.cpu)
    # SIGTERM stops every server as Ctrl+C does (uvicorn hands it on when it has stopped).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    module_name, function = SERVERS[args.name]
    serve = getattr(importlib.import_module(module_name), function)
    prefix = os.environ.get("HTTP_FANOUT_PROFILE")
    profiler = cProfile.Profile() if prefix else None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            if profiler is None:
                serve(args.port)
            else:
                profiler.runcall(serve, args.port)
    finally:
        if profiler is not None:
            profiler.dump_stats(f"{prefix}-{args.name}-{args.port}.prof")


if __name__ == "__main__":
    sys.exit(main())
