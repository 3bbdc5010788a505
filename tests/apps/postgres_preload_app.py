"""The PostgreSQL Flask worker app, used by gunicorn's master before `--preload` forks it.

The master publishes at import, so the backend holds a pooled connection at the fork, as
an app that publishes a "started" event (or a migration that publishes) would.
"""

from __future__ import annotations

from apps.postgres_flask_app import app, broadcaster

__all__ = ["app"]

broadcaster.publish("boot", "published by the master, before the fork")
