"""Live stock prices in the browser with Django: a one-module project (settings, views, URLs).

See README.md in this folder for how to run it under uvicorn (ASGI) or gunicorn (WSGI).
"""

from __future__ import annotations

import random
import threading
import time

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="example-only-not-secret",
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    ROOT_URLCONF=__name__,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
)

from django.http import HttpRequest, HttpResponse  # noqa: E402 - after settings
from django.urls import path  # noqa: E402

from ssecast import Broadcaster, BroadcasterClosedError  # noqa: E402
from ssecast.django import EventStreamView  # noqa: E402

broadcaster = Broadcaster(event_types=["price"], retry=2000)

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>ssecast prices</title>
<h1>Prices</h1>
<ul id="prices"></ul>
<script>
  const list = document.getElementById("prices");
  const source = new EventSource("/events");
  source.addEventListener("price", (event) => {
    const {ticker, price} = JSON.parse(event.data);
    const item = document.getElementById(ticker) || list.appendChild(document.createElement("li"));
    item.id = ticker;
    item.textContent = `${ticker} ${price.toFixed(2)} (event ${event.lastEventId})`;
  });
</script>
"""


def homepage(request: HttpRequest) -> HttpResponse:
    return HttpResponse(PAGE)


urlpatterns = [
    path("", homepage),
    # Wrap it like any view for authorization, e.g. login_required(EventStreamView.as_view(...)).
    path("events", EventStreamView.as_view(broadcaster=broadcaster, channels=["default"])),
]


def publish_prices() -> None:
    prices = {"TSLA": 200.0, "AAPL": 190.0, "MSFT": 410.0}
    while True:
        ticker = random.choice(list(prices))
        prices[ticker] *= 1 + random.uniform(-0.01, 0.01)
        try:
            broadcaster.publish("price", {"ticker": ticker, "price": prices[ticker]})
        except BroadcasterClosedError:
            return  # the server is stopping
        time.sleep(0.5)


# Started when the server imports the project, in the serving process; a daemon, so that
# it never keeps the process alive.
threading.Thread(target=publish_prices, name="prices", daemon=True).start()
