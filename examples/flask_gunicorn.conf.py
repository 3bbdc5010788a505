"""gunicorn settings for flask_app.py, the Flask example.

Run from the root of a clone of the repository (see flask_app.py for the install line)::

    .venv/bin/gunicorn --chdir examples -c examples/flask_gunicorn.conf.py flask_app:app

Each open event stream holds one thread until the client leaves, so the gthread worker
with more threads than the listeners you expect (the default sync worker has one thread
and would serve one listener at a time). One worker, because the broadcaster lives in
memory; more workers need the Redis backend.
"""

worker_class = "gthread"
workers = 1
threads = 200
worker_connections = 250


def post_worker_init(worker):
    """On SIGTERM close the broadcaster first: open streams end, the worker stops at once.

    gunicorn's worker waits for open responses (up to ``graceful_timeout``, then it is
    killed), and an event stream never ends by itself.
    """
    from flask_app import broadcaster

    from ssecast.flask import close_on_sigterm

    close_on_sigterm(broadcaster)
