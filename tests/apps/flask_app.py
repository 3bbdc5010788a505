"""The Flask app the adapter tests run under werkzeug and gunicorn.

Its broadcaster is configured by ``SSECAST_TEST_*`` variables; ``/publish``,
``/stats`` and ``/close`` let the test drive it from outside the server process.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Flask, abort, jsonify, request
from flask.typing import ResponseReturnValue

from apps.flask_django_support import TOKEN, broadcaster_from_env, lifetime, publish_batch
from ssecast.flask import stream

broadcaster = broadcaster_from_env()
app = Flask(__name__)


def token_required(view: Callable[..., Any]) -> Callable[..., Any]:
    """Answer 403 unless the request carries the app's bearer token."""

    @wraps(view)
    def checked(*args: Any, **kwargs: Any) -> Any:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            abort(403)
        return view(*args, **kwargs)

    return checked


@app.get("/events")
@token_required
def events() -> ResponseReturnValue:
    return stream(
        broadcaster,
        *request.args.getlist("channel"),
        key=lambda request: request.args.get("user"),
        lifetime=lambda request: lifetime(request.args),
    )


@app.get("/prices")
def prices() -> ResponseReturnValue:
    """The ``prices`` channel, open to everyone: what a page's EventSource can reach."""
    return stream(broadcaster, "prices")


@app.post("/publish")
def publish() -> ResponseReturnValue:
    return jsonify(ids=publish_batch(broadcaster, request.get_json()))


@app.get("/stats")
def stats() -> ResponseReturnValue:
    return jsonify(broadcaster.stats()._asdict())


@app.post("/close")
def close() -> ResponseReturnValue:
    broadcaster.close()
    return "", 204
