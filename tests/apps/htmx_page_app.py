"""An app of docs/frameworks/htmx.md, served as it is, behind routes only the tests use.

``HTMX_DOC_MODULE`` names the module holding the page's ``app`` (the test writes it from
the doc, with the page beside it in the working directory). In front of it:

- ``/npm/NAME@VERSION/PATH`` serves a file of the npm package installed in tests/js, in
  place of the CDN the page names; 404 unless exactly that version is installed.
- ``/events`` goes to the doc's app, recording what each connection sent as
  ``Last-Event-ID``, and the ids and event types it was sent.
- ``POST /test/cut`` ends every open stream from the server side (the doc's stream sees
  its client leave, and ends its response) and holds new ones until ``POST /test/release``.
- ``POST /test/flood`` publishes more prices than the doc's broadcaster keeps in its
  history (with the doc's ``publish_price``), so that a page away meanwhile gets a gap.
- ``GET /test/log`` answers the connections so far and how often a page reloaded the
  price row; ``GET /test/pages/NAME`` a page the
  test wrote into the working directory.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
from pathlib import Path
from typing import Any

from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

NODE_MODULES = Path(__file__).resolve().parents[1] / "js" / "node_modules"
DISCONNECT = {"type": "http.disconnect"}

doc = importlib.import_module(os.environ["HTMX_DOC_MODULE"])

connections: list[dict[str, Any]] = []
reloads: list[str] = []
# Of each open stream: the event that ends it, and the event it sets once it has ended.
open_streams: dict[asyncio.Event, asyncio.Event] = {}
gate = asyncio.Event()
gate.set()


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        await doc.app(scope, receive, send)
        return
    path, method = scope["path"], scope["method"]
    response: Response
    if path == "/events":
        await stream(scope, receive, send)
        return
    if path.startswith("/npm/"):
        response = npm_file(path.removeprefix("/npm/"))
    elif path == "/test/cut" and method == "POST":
        response = JSONResponse(await cut())
    elif path == "/test/release" and method == "POST":
        gate.set()
        response = Response(status_code=204)
    elif path == "/test/flood" and method == "POST":
        response = JSONResponse(flood())
    elif path == "/test/log":
        response = JSONResponse({"connections": connections, "reloads": len(reloads)})
    elif path.startswith("/test/pages/"):
        name = path.removeprefix("/test/pages/")
        if re.fullmatch(r"[\w-]+\.html", name):
            response = FileResponse(name, media_type="text/html")
        else:
            response = PlainTextResponse("no such page", status_code=404)
    else:
        if path == "/price" and method == "GET":
            reloads.append(path)
        await doc.app(scope, receive, send)
        return
    await response(scope, receive, send)


def npm_file(spec: str) -> Response:
    """Serve ``NAME@VERSION/PATH`` from the installed package of that name and version."""
    package, _, file = spec.partition("/")
    name, _, version = package.rpartition("@")
    for folder in NODE_MODULES.iterdir():
        manifest = folder / "package.json"
        if not manifest.is_file():
            continue
        installed = json.loads(manifest.read_text())
        if (installed["name"], installed["version"]) == (name, version):
            target = (folder / file).resolve()
            if folder.resolve() in target.parents and target.is_file():
                return FileResponse(target, media_type="text/javascript")
    return PlainTextResponse(f"{spec} is not installed in tests/js", status_code=404)


async def stream(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Pass one stream request to the doc's app; record it, and let /test/cut end it."""
    await gate.wait()
    headers = dict(scope["headers"])
    last_event_id = headers.get(b"last-event-id")
    record: dict[str, Any] = {
        "last_event_id": None if last_event_id is None else last_event_id.decode(),
        "ids": [],
        "types": [],
        "ended": False,
    }
    connections.append(record)
    cut_now, ended = asyncio.Event(), asyncio.Event()
    open_streams[cut_now] = ended

    async def receive_until_cut() -> dict[str, Any]:
        if cut_now.is_set():
            return DISCONNECT
        message = asyncio.ensure_future(receive())
        cutting = asyncio.ensure_future(cut_now.wait())
        await asyncio.wait({message, cutting}, return_when=asyncio.FIRST_COMPLETED)
        cutting.cancel()
        if message.done():
            received: dict[str, Any] = message.result()
            return received
        message.cancel()
        return DISCONNECT

    async def send_recording(message: dict[str, Any]) -> None:
        for line in message.get("body", b"").split(b"\n"):
            if line.startswith(b"id: "):
                record["ids"].append(line.removeprefix(b"id: ").decode())
            elif line.startswith(b"event: "):
                record["types"].append(line.removeprefix(b"event: ").decode())
        await send(message)

    try:
        await doc.app(scope, receive_until_cut, send_recording)
    finally:
        record["ended"] = True
        ended.set()
        del open_streams[cut_now]


async def cut() -> dict[str, int]:
    """End every open stream and hold new ones; answer once all have ended."""
    gate.clear()
    streams = list(open_streams.items())
    for cut_now, _ in streams:
        cut_now.set()
    async with asyncio.timeout(10):
        for _, ended in streams:
            await ended.wait()
    return {"ended": len(streams)}


def flood() -> dict[str, str]:
    """Publish prices until the history holds none of the events published before."""
    count = 2 * 1024  # twice the default history, which the doc's broadcaster keeps
    for number in range(1, count + 1):
        doc.publish_price(f"T{number}", number)
    return {"ticker": f"T{count}", "price": f"{count:.2f}"}
