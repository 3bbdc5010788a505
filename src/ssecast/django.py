"""Django adapter: answer a view with a subscription streamed as Server-Sent Events.

Call [`stream`][ssecast.django.stream] from a view, after the view's own checks, or route
[`EventStreamView`][ssecast.django.EventStreamView] in a URLconf. Under ASGI (uvicorn,
daphne) the stream is an async iterator read on the event loop, so an open stream holds no
thread; under WSGI (gunicorn, runserver) it is a plain iterator and holds one server
thread, so run gunicorn with `--worker-class gthread --threads N` where N is more than the
streams you expect.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeAlias

try:
    from django.core.asgi import get_asgi_application as get_django_asgi_application
    from django.core.exceptions import ImproperlyConfigured
    from django.core.handlers.asgi import ASGIRequest
    from django.http import (
        HttpRequest,
        HttpResponse,
        HttpResponseBadRequest,
        StreamingHttpResponse,
    )
    from django.http.response import HttpResponseBase
    from django.views import View
except ModuleNotFoundError as error:  # pragma: no cover - tested in a subprocess
    if error.name != "django":
        raise
    raise ImportError(
        "ssecast.django needs Django, which is not installed; "
        "install it with: pip install 'ssecast[django]'"
    ) from error

from ssecast._broadcaster import Broadcaster
from ssecast._exceptions import (
    BackendUnavailableError,
    BroadcasterClosedError,
    InvalidFieldError,
)
from ssecast._http import (
    OPENING,
    RETRY_AFTER_SECONDS,
    STREAM_HEADERS,
    UNAVAILABLE,
    per_request,
    refusal,
    request_key,
    resume_id,
    unavailable_reason,
)
from ssecast._subscription import Subscription
from ssecast._wsgi import WSGIStream, close_on_sigterm
from ssecast.asgi import Receive, Scope, Send, close_on_signal

__all__ = [
    "EventStreamView",
    "close_on_sigterm",
    "get_asgi_application",
    "health",
    "stream",
]

Key: TypeAlias = str | Callable[[HttpRequest], str | None] | None
"""A subscription's key, or a callable taking the request and returning it or `None`."""
Lifetime: TypeAlias = float | Callable[[HttpRequest], float | None] | None
"""A stream's lifetime in seconds, or a callable taking the request and returning it."""


def stream(
    request: HttpRequest,
    broadcaster: Broadcaster,
    *channels: str,
    key: Key = None,
    lifetime: Lifetime = None,
) -> HttpResponseBase:
    """Subscribe `request` to `channels` and return the streaming response.

    The client resumes where it left off with the `Last-Event-ID` header or, for
    clients that cannot set headers, a `lastEventId` query parameter. Refusals come
    back as ordinary responses rather than exceptions: 400 for an invalid channel name or key,
    429 with `Retry-After` when `max_subscribers_per_key` streams with this key are
    open, 503 with `Retry-After` when the broadcaster is full (`max_subscribers`) or
    closed, or its backend is unreachable; but then an `EventSource` (`Accept:
    text/event-stream`) gets a `200` stream instead, a `retry:` field and one
    `ssecast.unavailable` event, so that it reconnects after that delay rather than give up.
    Call it after the view's own checks: `key`, then `lifetime`, are worked out after.

    :param request: the request being answered; an `ASGIRequest` gets an async stream.
    :param broadcaster: where the events come from.
    :param channels: the channels to receive (`"default"` if none).
    :param key: the subscription's key (see
        [`Broadcaster.subscribe`][ssecast.Broadcaster.subscribe]), or a callable taking
        the request and returning it (a user id, say) or `None`.
    :param lifetime: seconds after which the stream ends cleanly (less up to 10% at
        random), so that its client reconnects and resumes with `Last-Event-ID`, or a
        callable taking the request and returning them or `None` for no end.
    :raises ssecast.ConfigurationError: `lifetime` is out of range.
    """
    if request.method == "HEAD":
        # A HEAD response has no body, so a subscription would only hold a thread.
        return _with_stream_headers(HttpResponse())
    last_event_id = resume_id(
        request.headers.get("Last-Event-ID"), str(request.META.get("QUERY_STRING", ""))
    )
    subscription_key = request_key(key, request)
    try:
        subscription = broadcaster.subscribe(
            *channels,
            last_event_id=last_event_id,
            key=subscription_key,
            lifetime=per_request(lifetime, request),
        )
    except InvalidFieldError as error:
        return HttpResponseBadRequest(str(error), content_type="text/plain; charset=utf-8")
    except UNAVAILABLE as error:
        refused = refusal(error, request.headers.get("Accept"))
        if refused.stream:
            return _with_stream_headers(HttpResponse(refused.stream))
        response = HttpResponse(
            refused.reason, status=refused.status, content_type="text/plain; charset=utf-8"
        )
        response["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    body: _ASGIStream | WSGIStream
    if isinstance(request, ASGIRequest):
        body = _ASGIStream(subscription)
    else:
        body = WSGIStream(subscription, request.META)
    return _with_stream_headers(StreamingHttpResponse(body))


def health(request: HttpRequest, broadcaster: Broadcaster) -> HttpResponse:
    """Return a health check's response: whether `broadcaster` can serve now.

    `200` with `ok`, or `503` with a short reason and `Retry-After` when its backend is
    unreachable or it was closed; the reason names no host nor credentials. It runs
    [`Broadcaster.check`][ssecast.Broadcaster.check], which asks the backend's store and
    takes a few seconds at most, so call it from a plain (sync) view: under ASGI, Django
    runs that in a thread.

    ```python
    path("health/", lambda request: ssecast.django.health(request, broadcaster))
    ```

    :param request: the request being answered.
    :param broadcaster: the broadcaster to check.
    """
    try:
        broadcaster.check()
    except (BackendUnavailableError, BroadcasterClosedError) as error:
        refused = HttpResponse(
            unavailable_reason(error) + "\n", status=503, content_type="text/plain; charset=utf-8"
        )
        refused["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return refused
    return HttpResponse("ok\n", content_type="text/plain; charset=utf-8")


def _with_stream_headers(response: HttpResponseBase) -> HttpResponseBase:
    for name, value in STREAM_HEADERS:
        response[name] = value
    return response


class EventStreamView(View):
    """A class-based view that streams a broadcaster's channels to every GET.

    Configure it in the URLconf, and wrap it for authorization as any view:

    ```python
    path("prices/", login_required(EventStreamView.as_view(broadcaster=b, channels=["prices"])))
    ```

    Override [`get_channels`][ssecast.django.EventStreamView.get_channels] to pick
    channels per request (from `self.kwargs`, the user, ...); raise `PermissionDenied`
    there to answer 403 before subscribing, and check it before raising `Http404` for a
    channel that does not exist, so that a refused caller cannot learn which exist.

    :cvar broadcaster: where the events come from; required.
    :cvar channels: the channels to receive (`"default"` if empty).
    :cvar key: the subscription's key, or a callable taking the request and returning
        it; give it to `as_view`, as a function set on a subclass would become a method.
    :cvar lifetime: the stream's lifetime in seconds, or a callable taking the request
        and returning them; give it to `as_view` too.
    """

    broadcaster: Broadcaster | None = None
    channels: Sequence[str] = ()
    key: Key = None
    lifetime: Lifetime = None
    # HEAD would subscribe a client that reads no body.
    http_method_names = ["get", "options"]  # noqa: RUF012 - View declares a plain list

    def get_channels(self) -> Sequence[str]:
        """Return the channels this request receives; by default `channels`.

        :raises ImproperlyConfigured: `channels` is a single `str`.
        """
        if isinstance(self.channels, str):
            raise ImproperlyConfigured(
                f"EventStreamView channels must be a list of names, not the str "
                f"{self.channels!r}; write channels=[{self.channels!r}]"
            )
        return self.channels

    def get(self, request: HttpRequest, *args: object, **kwargs: object) -> HttpResponseBase:
        """Answer the GET with the stream (see [`stream`][ssecast.django.stream]).

        :raises ImproperlyConfigured: no broadcaster was given to `as_view`.
        """
        if self.broadcaster is None:
            raise ImproperlyConfigured(
                "EventStreamView needs a broadcaster: EventStreamView.as_view(broadcaster=b)"
            )
        channels = self.get_channels()
        return stream(request, self.broadcaster, *channels, key=self.key, lifetime=self.lifetime)


class _ASGIStream:
    """An ASGI response body: read on the event loop, holding no thread while it waits."""

    __slots__ = ("_subscription",)

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _frames(self._subscription)

    def close(self) -> None:
        """End the subscription; Django calls this when the response is done."""
        self._subscription.close()


async def _frames(subscription: Subscription) -> AsyncIterator[bytes]:
    # On a disconnect Django cancels the task reading this and does not close the
    # response, so the subscription ends here, in the generator's finally.
    try:
        yield OPENING
        async for chunk in subscription:
            yield chunk
    finally:
        subscription.close()


def get_asgi_application(
    broadcaster: Broadcaster,
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """Return Django's ASGI application, made to close `broadcaster` on SIGTERM and SIGINT.

    Use it in place of Django's own `get_asgi_application()` in `asgi.py`:

    ```python
    application = ssecast.django.get_asgi_application(broadcaster)
    ```

    A server waits for open responses before it stops, and an event stream never ends by
    itself. Django answers no ASGI lifespan, so this adds one that enters
    [`ssecast.asgi.close_on_signal`][ssecast.asgi.close_on_signal] once the server
    (uvicorn) has installed its signal handlers: a stop signal then closes the broadcaster
    first and every stream ends at once.

    :param broadcaster: the broadcaster whose streams must end on a stop signal.
    """
    django_application = get_django_asgi_application()

    async def application(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            # django-stubs spell the ASGI types more narrowly (dict scope); same objects.
            await django_application(scope, receive, send)  # type: ignore[arg-type]
            return
        await receive()  # lifespan.startup
        async with close_on_signal(broadcaster):
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
        await send({"type": "lifespan.shutdown.complete"})

    return application
