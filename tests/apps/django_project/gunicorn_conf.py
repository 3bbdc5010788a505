"""gunicorn settings for the Django test project, as the docs give them.

Each open stream holds a thread under WSGI, so the gthread worker with many threads.
One worker, because the broadcaster is in memory. On SIGTERM the broadcaster is closed
so open streams end and the worker stops at once instead of after graceful_timeout.
"""

import os

worker_class = "gthread"
workers = 1
threads = int(os.environ.get("SSECAST_TEST_THREADS", "256"))
worker_connections = threads + 64
graceful_timeout = 5
keepalive = 1
# gunicorn's control socket is one per user by default; tests run several servers at once.
control_socket_disable = True


def post_worker_init(worker: object) -> None:
    from apps.django_project.views import broadcaster
    from ssecast.django import close_on_sigterm

    close_on_sigterm(broadcaster)
