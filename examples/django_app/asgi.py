"""The ASGI application, for uvicorn.

Run it from the root of a clone of the repository::

    python3 -m venv .venv && .venv/bin/pip install -e '.[django]' uvicorn
    .venv/bin/uvicorn --app-dir examples/django_app asgi:application --timeout-graceful-shutdown 5

and watch the raw stream::

    curl -N http://127.0.0.1:8000/events

``ssecast.django.get_asgi_application`` is Django's own, plus a lifespan that closes the
broadcaster on Ctrl+C or SIGTERM: every open stream ends at once, and uvicorn's graceful
shutdown has nothing left to wait for.
"""

from __future__ import annotations

from prices import broadcaster

import ssecast.django

application = ssecast.django.get_asgi_application(broadcaster)
