"""ASGI entry point of the Django test project (uvicorn), as the docs give it.

Django answers no ASGI lifespan events, so this wraps it to enter
``ssecast.asgi.close_on_signal`` at lifespan startup, when uvicorn has installed its
signal handlers: SIGTERM then closes the broadcaster first, every stream ends at once,
and uvicorn's graceful shutdown finds no connection left to wait for.
"""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

from apps.django_project.views import broadcaster
from ssecast.asgi import close_on_signal

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apps.django_project.settings")
django_application = get_asgi_application()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve HTTP with Django; run the lifespan Django does not handle."""
    if scope["type"] != "lifespan":
        await django_application(scope, receive, send)
        return
    await receive()  # lifespan.startup
    async with close_on_signal(broadcaster):
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
    await send({"type": "lifespan.shutdown.complete"})
