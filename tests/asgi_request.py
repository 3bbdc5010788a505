"""An ASGI HTTP scope for driving an ASGI app in process, as a server would call it."""

from __future__ import annotations

from typing import Any


def get_scope(path: str = "/events") -> dict[str, Any]:
    """Return a fresh scope of a plain HTTP/1.1 GET of `path` from 127.0.0.1."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
