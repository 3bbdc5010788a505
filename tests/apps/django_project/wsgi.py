"""WSGI entry point of the Django test project (gunicorn)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apps.django_project.settings")
application = get_wsgi_application()
