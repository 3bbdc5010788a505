r"""A chat room per URL: FastAPI, ssecast's ASGI adapter and ``EventSource``.

Run it from the root of a clone of the repository::

    python3 -m venv .venv && .venv/bin/pip install -e '.[asgi]' fastapi uvicorn
    .venv/bin/uvicorn --app-dir examples fastapi_app:app --timeout-graceful-shutdown 1

then open http://127.0.0.1:8000/rooms/lobby in two windows, or watch a room's stream
and post to it from a shell::

    curl -N http://127.0.0.1:8000/events/lobby
    curl -H 'Content-Type: application/json' -d '{"author": "ann", "text": "hi"}' \
        http://127.0.0.1:8000/rooms/lobby/messages

Each room is a channel taken from the URL; a background task posts the time to every
room once a minute. Ctrl+C stops the server at once: ``close_on_signal`` closes the
broadcaster, which ends every open stream cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import time
from collections.abc import AsyncIterator, MutableMapping, Sequence
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import BaseModel

from ssecast import Broadcaster
from ssecast.asgi import EventStream, close_on_signal

ROOMS = ("lobby", "python", "random")
ROOM_NAME = re.compile(r"[a-z0-9-]{1,32}")

broadcaster = Broadcaster(event_types=["message"], retry=2000)


class Message(BaseModel):
    author: str
    text: str


def room_channels(scope: MutableMapping[str, Any]) -> Sequence[str]:
    """Return the room under the mount point: ``/events/lobby`` is channel ``lobby``."""
    name = scope["path"][len(scope["root_path"]) :].strip("/")
    if name not in ROOMS:
        raise LookupError(name)
    return [name]


async def announce_time() -> None:
    while True:
        now = time.strftime("%H:%M UTC", time.gmtime())
        for room in ROOMS:
            await broadcaster.apublish("message", {"author": "clock", "text": now}, channel=room)
        await asyncio.sleep(60)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with close_on_signal(broadcaster):
        clock = asyncio.create_task(announce_time())
        yield
        clock.cancel()


app = FastAPI(lifespan=lifespan)
app.mount("/events", EventStream(broadcaster, room_channels))


@app.get("/")
async def index() -> RedirectResponse:
    return RedirectResponse("/rooms/lobby")


@app.post("/rooms/{room}/messages", status_code=204)
async def post_message(room: str, message: Message) -> None:
    if room not in ROOMS:
        raise HTTPException(404, f"no room {room!r}")
    await broadcaster.apublish("message", message.model_dump(), channel=room)


@app.get("/rooms/{room}", response_class=HTMLResponse)
async def room_page(room: str) -> str:
    if room not in ROOMS:
        raise HTTPException(404, f"no room {room!r}")
    return PAGE.replace("{room}", html.escape(room))


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>ssecast chat: {room}</title>
<h1>#{room}</h1>
<ul id="messages"></ul>
<form id="send"><input id="author" value="me" size="8"> <input id="text" size="40">
<button>Send</button></form>
<script>
  const list = document.getElementById("messages");
  const source = new EventSource("/events/{room}");
  source.addEventListener("message", (event) => {
    const {author, text} = JSON.parse(event.data);
    list.appendChild(document.createElement("li")).textContent = `${author}: ${text}`;
  });
  document.getElementById("send").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {author: author.value, text: text.value};
    await fetch("/rooms/{room}/messages", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
    text.value = "";
  });
</script>
"""
