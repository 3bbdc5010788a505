"""flask-sse on gunicorn's gevent worker, and a publisher process calling ``sse.publish``.

``worker`` runs one gunicorn (its arbiter plus ONE gevent worker process) on the port; the
benchmark starts two of them on two ports and spreads the clients over both, as it does
for ssecast's two uvicorn workers. ``/events`` is flask-sse's own ``stream`` view (a
generator over ``sse.messages``, which opens a Redis connection and SUBSCRIBEs once per
client), on the benchmark's channel ``<prefix>bench`` instead of the ``channel`` query
parameter, with one addition: it first yields an SSE comment, because a WSGI server sends
the response headers with the first body chunk and the load client waits for them.

``/stats`` answers ``subscribers`` (streams this worker serves) and ``pid`` (the gevent
worker's, not the arbiter's: its memory and CPU are the server's). A stream whose client
went away is only noticed at the next write, as with flask-sse anywhere.

``publisher`` serves ``/start`` and ``/stats`` (run, published) with the same
``_control.Publisher`` as every other server, and publishes each event with
``sse.publish(data, type="tick", channel=...)`` inside an app context, as a Flask
application does (flask-sse opens a new Redis client, hence a new connection, per call).

The workers' connections carry the client name ``flask-sse:<prefix>`` (``CLIENT LIST``
shows them); the publisher's do not, so that its per-event connection costs no extra
``CLIENT SETNAME``. Pub/sub leaves no key behind.
"""

from __future__ import annotations

import os
from typing import Any

from _control import (
    CHANNEL,
    EVENT_TYPE,
    Payload,
    Publisher,
    Receive,
    Scope,
    Send,
    control_app,
    run_asgi,
)

URL = os.environ.get("HTTP_FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0")


def _prefix() -> str:
    return os.environ["HTTP_FANOUT_REDIS_PREFIX"]


def client_name(prefix: str) -> str:
    """Return the client name of a deployment's worker connections (no space allowed)."""
    return "flask-sse:" + "".join(char if "!" <= char <= "~" else "_" for char in prefix)


def _flask_app(redis_url: str) -> Any:
    from flask import Flask

    app = Flask(__name__)
    app.config["SSE_REDIS_URL"] = redis_url
    return app


def build_worker_app() -> Any:
    """Build the worker's WSGI app; called in the gevent worker, after gevent patched it."""
    from flask import stream_with_context
    from flask_sse import sse

    prefix = _prefix()
    separator = "&" if "?" in URL else "?"
    app = _flask_app(f"{URL}{separator}client_name={client_name(prefix)}")
    channel = prefix + CHANNEL
    streams = 0

    @app.get("/events")
    def events() -> Any:
        # flask-sse's ``stream`` view, on a fixed channel, plus the first comment.
        @stream_with_context
        def generator() -> Any:
            nonlocal streams
            yield ":\n\n"
            streams += 1
            try:
                for message in sse.messages(channel=channel):
                    yield str(message)
            finally:
                streams -= 1

        return app.response_class(generator(), mimetype="text/event-stream")

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return {
            "subscribers": streams,
            "pid": os.getpid(),
            "run": 0,
            "published": 0,
            "publishing": False,
            "failed": "",
        }

    return app


def worker(port: int) -> None:
    """Serve ``/events`` with gunicorn: one arbiter, one gevent worker process."""
    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            settings = {
                "bind": f"127.0.0.1:{port}",
                "workers": 1,
                "worker_class": "gevent",
                "worker_connections": 10_000,
                "backlog": 4096,
                "timeout": 120,
                "graceful_timeout": 1,
                "loglevel": "warning",
                "accesslog": None,
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return build_worker_app()

    Gunicorn().run()


def publisher(port: int) -> None:
    """Publish with ``sse.publish`` on ``POST /start``, and serve no stream.

    ``sse.publish`` blocks on Redis: from a task it blocks this process's loop for each
    event (which serves only the control requests), from a thread (``thread=1``) it does not.
    """
    app = _flask_app(URL)
    from flask_sse import sse

    channel = _prefix() + CHANNEL

    def publish(payload: Payload) -> None:
        with app.app_context():
            sse.publish(payload, type=EVENT_TYPE, channel=channel)

    async def no_events(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"the workers serve /events\n"})

    run_asgi(control_app(no_events, Publisher(publish, threadsafe=publish), lambda: {}), port)
