"""A pretend stock market: random-walk prices, and an alert when a price crosses a line."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

OPENING_PRICES = {"TSLA": 200.0, "AAPL": 190.0, "MSFT": 410.0, "NVDA": 120.0, "AMZN": 180.0}
HISTORY = 120  # prices kept per ticker, for the page's chart after a reload
ALERT_MOVE = 0.02  # an alert when a price is 2% away from where the last alert left it


@dataclass
class Market:
    """Prices that move one ticker per step, and the alerts their moves raise."""

    seed: int | None = None
    prices: dict[str, deque[float]] = field(default_factory=dict)
    alerts: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=50))
    _anchors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        for ticker, price in OPENING_PRICES.items():
            self.prices[ticker] = deque([price], maxlen=HISTORY)
            self._anchors[ticker] = price

    def step(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Move one price; return the events to publish as (type, channel, data)."""
        ticker = self._random.choice(list(self.prices))
        old = self.prices[ticker][-1]
        new = round(old * (1 + self._random.gauss(0, 0.004)), 2)
        self.prices[ticker].append(new)
        events: list[tuple[str, str, dict[str, Any]]] = [
            ("price_update", "prices", {"ticker": ticker, "price": new})
        ]
        anchor = self._anchors[ticker]
        if abs(new - anchor) / anchor >= ALERT_MOVE:
            self._anchors[ticker] = new
            direction = "up" if new > anchor else "down"
            alert = {
                "ticker": ticker,
                "price": new,
                "message": f"{direction} {100 * abs(new - anchor) / anchor:.1f}% to {new:.2f}",
            }
            self.alerts.append(alert)
            events.append(("alert", "alerts", alert))
        return events

    def snapshot(self) -> dict[str, Any]:
        """Return the state a page reloads after a gap: recent prices and alerts."""
        return {
            "prices": {ticker: list(points) for ticker, points in self.prices.items()},
            "alerts": list(self.alerts),
        }
