"""The ASGI application: ``uvicorn --app-dir examples/django_app asgi:application``.

Django answers no ASGI lifespan events, so this wraps it and enters
``ssecast.asgi.close_on_signal`` at lifespan startup, after uvicorn installed its signal
handlers: on Ctrl+C or SIGTERM the broadcaster closes first, every open stream ends at
once, and uvicorn's graceful shutdown has nothing left to wait for.
"""

from __future__ import annotations

from typing import Any

from django.core.asgi import get_asgi_application
from prices import broadcaster

from ssecast.asgi import close_on_signal

django_application = get_asgi_application()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "lifespan":
        await django_application(scope, receive, send)
        return
    await receive()  # lifespan.startup
    async with close_on_signal(broadcaster):
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
    await send({"type": "lifespan.shutdown.complete"})
