r"""The WSGI application, for gunicorn (see README.md).

Run it from the root of a clone of the repository::

    python3 -m venv .venv && .venv/bin/pip install -e '.[django]' gunicorn
    .venv/bin/gunicorn --chdir examples/django_app -c examples/django_app/gunicorn.conf.py \
        wsgi:application

and watch the raw stream::

    curl -N http://127.0.0.1:8000/events

Each open stream holds one of the worker's threads; gunicorn.conf.py says how many.
"""

import prices  # noqa: F401 - configures the settings, starts the publisher
from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
