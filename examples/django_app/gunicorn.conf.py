"""gunicorn settings for the Django example under WSGI (see README.md).

Each open event stream holds one thread until the client leaves, so the gthread worker
with more threads than the listeners you expect (the default sync worker has one thread
and would serve one listener at a time). One worker, because the broadcaster lives in
memory; more workers need the Redis backend.
"""

import signal
import threading

worker_class = "gthread"
workers = 1
threads = 200
worker_connections = 250


def post_worker_init(worker):
    """On SIGTERM close the broadcaster first: open streams end, the worker stops at once.

    gunicorn's worker waits for open responses (up to ``graceful_timeout``, then it is
    killed); an event stream never ends by itself. The hook chains to gunicorn's own
    handler, which it installed before loading the app.
    """
    from prices import broadcaster

    previous = signal.getsignal(signal.SIGTERM)

    def close_then_stop(signum, frame):
        # Closed from another thread: the handler may run while this thread holds the
        # broadcaster's lock.
        threading.Thread(target=broadcaster.close).start()
        previous(signum, frame)

    signal.signal(signal.SIGTERM, close_then_stop)
