"""The WSGI application, for gunicorn (see README.md).

Run from the repository root::

    gunicorn --chdir examples/django_app -c examples/django_app/gunicorn.conf.py wsgi:application

Each open stream holds one of the worker's threads; gunicorn.conf.py says how many.
"""

import prices  # noqa: F401 - configures the settings, starts the publisher
from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
