"""ASGI entry point of the Django test project (uvicorn), as the docs give it.

``ssecast.django.get_asgi_application`` adds the lifespan Django lacks, which closes the
broadcaster on SIGTERM: every stream ends at once, and uvicorn's graceful shutdown finds
no connection left to wait for.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apps.django_project.settings")

from apps.django_project.views import broadcaster
from ssecast.django import get_asgi_application

application = get_asgi_application(broadcaster)
