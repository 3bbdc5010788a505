"""Live stock prices in the browser: Flask, ssecast's Flask adapter and ``EventSource``.

Run it from the root of a clone of the repository, with Flask's threaded development
server::

    python3 -m venv .venv && .venv/bin/pip install -e '.[flask]'
    .venv/bin/flask --app examples/flask_app.py run

or with gunicorn. Every open stream holds a thread, so the settings in
``flask_gunicorn.conf.py`` use the gthread worker with many threads, and close the
broadcaster on SIGTERM so that gunicorn stops at once rather than waiting for streams that
never end::

    .venv/bin/pip install gunicorn
    .venv/bin/gunicorn --chdir examples -c examples/flask_gunicorn.conf.py flask_app:app

then open http://127.0.0.1:5000/ (gunicorn: http://127.0.0.1:8000/) or watch the raw
stream::

    curl -N http://127.0.0.1:5000/events

A background thread publishes a price every half second.
"""

from __future__ import annotations

import random
import threading
import time

from flask import Flask

from ssecast import Broadcaster, BroadcasterClosedError
from ssecast.flask import stream

broadcaster = Broadcaster(event_types=["price"], retry=2000)
app = Flask(__name__)

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


@app.get("/")
def homepage() -> str:
    return PAGE


@app.get("/events")
def events():  # put your login or permission decorators above, as for any view
    return stream(broadcaster)


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


# Started when the app is imported: in the serving process (gunicorn imports the app in
# each worker), as a daemon so that it never keeps the process alive.
threading.Thread(target=publish_prices, name="prices", daemon=True).start()
