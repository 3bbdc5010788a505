"""A Flask worker serving ``/events?channel=...`` from a PostgreSQL-backed broadcaster."""

from __future__ import annotations

from flask import Flask, request
from flask.typing import ResponseReturnValue

from apps.postgres_support import broadcaster_from_env
from ssecast.flask import stream

broadcaster = broadcaster_from_env()
app = Flask(__name__)


@app.get("/events")
def events() -> ResponseReturnValue:
    return stream(broadcaster, *request.args.getlist("channel"))
