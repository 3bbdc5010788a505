"""The ASGI application: ``uvicorn --app-dir examples/django_app asgi:application``.

``ssecast.django.get_asgi_application`` is Django's own, plus a lifespan that closes the
broadcaster on Ctrl+C or SIGTERM: every open stream ends at once, and uvicorn's graceful
shutdown has nothing left to wait for.
"""

from __future__ import annotations

from prices import broadcaster

import ssecast.django

application = ssecast.django.get_asgi_application(broadcaster)
