"""Flask adapter: answer a view with a subscription streamed as Server-Sent Events.

Call [`stream`][ssecast.flask.stream] inside a view, so the app's own decorators (login,
permissions) decide first who may listen:

```python
@app.get("/events")
@login_required
def events():
    return ssecast.flask.stream(broadcaster, "prices")
```

Each open stream holds one server thread for as long as the client listens, so run it
under a server with many threads: werkzeug's threaded dev server, or gunicorn with
`--worker-class gthread --threads N` where N is more than the streams you expect (the
`sync` worker has one thread and would serve one client at a time).
"""

from __future__ import annotations

from collections.abc import Callable

try:
    import flask
except ModuleNotFoundError as error:  # pragma: no cover - tested in a subprocess
    if error.name != "flask":
        raise
    raise ImportError(
        "ssecast.flask needs Flask, which is not installed; "
        "install it with: pip install 'ssecast[flask]'"
    ) from error
from werkzeug.exceptions import BadRequest, ServiceUnavailable, TooManyRequests

from ssecast._broadcaster import Broadcaster
from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    InvalidFieldError,
)
from ssecast._http import (
    RETRY_AFTER_SECONDS,
    STREAM_HEADERS,
    UNAVAILABLE,
    per_request,
    refusal,
    request_key,
    resume_id,
    unavailable_reason,
)
from ssecast._wsgi import WSGIStream, close_on_sigterm

__all__ = ["close_on_sigterm", "health", "stream"]


def stream(
    broadcaster: Broadcaster,
    *channels: str,
    key: str | Callable[[flask.Request], str | None] | None = None,
    lifetime: float | Callable[[flask.Request], float | None] | None = None,
) -> flask.Response:
    """Subscribe the current request to `channels` and return the streaming response.

    The client resumes where it left off with the `Last-Event-ID` header or, for
    clients that cannot set headers, a `lastEventId` query parameter. Refusals are
    raised as werkzeug HTTP exceptions, so the app's `errorhandler` renders them.
    Call it after the view's own checks: `key`, then `lifetime`, are worked out after.

    :param broadcaster: where the events come from.
    :param channels: the channels to receive (`"default"` if none).
    :param key: the subscription's key (see
        [`Broadcaster.subscribe`][ssecast.Broadcaster.subscribe]), or a callable taking
        the request and returning it (a user id, say) or `None`.
    :param lifetime: seconds after which the stream ends cleanly (less up to 10% at
        random), so that its client reconnects and resumes with `Last-Event-ID`, or a
        callable taking the request and returning them or `None` for no end.
    :raises werkzeug.exceptions.BadRequest: a channel name or the key is invalid (400).
    :raises werkzeug.exceptions.TooManyRequests: `max_subscribers_per_key` streams
        with this key are open (429, with `Retry-After`).
    :raises werkzeug.exceptions.ServiceUnavailable: the broadcaster is full
        (`max_subscribers`) or closed, or its backend is unreachable (503, with
        `Retry-After`); but an `EventSource` (`Accept: text/event-stream`) gets a `200`
        stream instead, a `retry:` field and one `ssecast.unavailable` event, so that it
        reconnects after that delay rather than give up.
    :raises ssecast.ConfigurationError: `lifetime` is out of range.
    """
    request = flask.request
    if request.method == "HEAD":
        # A HEAD response has no body, so a subscription would only hold a thread.
        return flask.Response(headers=STREAM_HEADERS)
    last_event_id = resume_id(
        request.headers.get("Last-Event-ID"), request.query_string.decode("latin-1")
    )
    key = request_key(key, request)
    lifetime = per_request(lifetime, request)
    try:
        subscription = broadcaster.subscribe(
            *channels, last_event_id=last_event_id, key=key, lifetime=lifetime
        )
    except InvalidFieldError as error:
        raise BadRequest(str(error)) from error
    except UNAVAILABLE as error:
        refused = refusal(error, request.headers.get("Accept"))
        if refused.stream:
            return flask.Response(refused.stream, headers=STREAM_HEADERS)
        refuse = TooManyRequests if refused.status == 429 else ServiceUnavailable
        raise refuse(refused.reason, retry_after=RETRY_AFTER_SECONDS) from error
    return flask.Response(WSGIStream(subscription, request.environ), headers=STREAM_HEADERS)


def health(broadcaster: Broadcaster) -> flask.Response:
    """Return a health check's response: whether `broadcaster` can serve now.

    `200` with `ok`, or `503` with a short reason and `Retry-After` when its backend is
    unreachable or it was closed; the reason names no host nor credentials. It runs
    [`Broadcaster.check`][ssecast.Broadcaster.check], which asks the backend's store and
    takes a few seconds at most:

    ```python
    app.add_url_rule("/health", view_func=lambda: ssecast.flask.health(broadcaster))
    ```

    :param broadcaster: the broadcaster to check.
    """
    try:
        broadcaster.check()
    except (BackendUnavailableError, BroadcasterClosedError) as error:
        return flask.Response(
            unavailable_reason(error) + "\n",
            status=503,
            mimetype="text/plain",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    return flask.Response("ok\n", mimetype="text/plain")
