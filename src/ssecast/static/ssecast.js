/*
 * ssecast.js: an EventSource that outlives server restarts, deploys and outages.
 * No dependencies. Shipped with ssecast (ssecast/static/ssecast.js); MIT licence.
 *
 *   const source = new SsecastSource("/events", {
 *     onGap: () => reloadState(),               // missed events are gone: reload the state
 *     onUnavailable: (reason) => showBanner(reason),  // refused for a while; it comes back
 *     onStateChange: (state) => showState(state),     // "open", "connecting", "waiting"...
 *   });
 *   source.addEventListener("price_update", (event) => show(JSON.parse(event.data)));
 *
 * The browser's EventSource reconnects by itself after a network error or the end of a
 * stream, but gives up for good (readyState CLOSED) on any status other than 200, such as
 * a proxy's 502 while the app restarts. SsecastSource then opens a new EventSource after
 * a delay that doubles from minDelay to maxDelay ms, with jitter, resuming after the last
 * event it dispatched with a lastEventId query parameter (EventSource sets no headers).
 */
"use strict";

class SsecastSource extends EventTarget {
  constructor(url, options = {}) {
    super();
    const { onGap, onUnavailable, onStateChange, minDelay = 1000, maxDelay = 30000 } = options;
    this.url = String(url);
    this.lastEventId = "";
    this.state = "connecting";
    this._options = { onStateChange, minDelay, maxDelay, withCredentials: !!options.withCredentials };
    this._types = new Set(["message", "ssecast.gap", "ssecast.unavailable"]);
    this._failures = 0;
    this._timer = null;
    if (onGap) super.addEventListener("ssecast.gap", onGap);
    if (onUnavailable) {
      super.addEventListener("ssecast.unavailable", (event) =>
        onUnavailable(JSON.parse(event.data).reason, event));
    }
    this._open();
  }

  addEventListener(type, listener, options) {
    if (!this._types.has(type)) {
      this._types.add(type);
      this._forward(this._source, type);
    }
    super.addEventListener(type, listener, options);
  }

  close() {
    clearTimeout(this._timer);
    this._source.close();
    this._setState("closed");
  }

  _open() {
    const { minDelay, maxDelay, withCredentials } = this._options;
    const url = new URL(this.url, globalThis.document?.baseURI ?? globalThis.location?.href);
    if (this.lastEventId) { // replacing the URL's own lastEventId: the server reads the first
      const kept = url.search.slice(1).split("&").filter((p) => p && !p.startsWith("lastEventId="));
      url.search = [...kept, "lastEventId=" + encodeURIComponent(this.lastEventId)].join("&");
    }
    const source = (this._source = new EventSource(url.href, { withCredentials }));
    source.onopen = () => {
      this._failures = 0;
      this._setState("open");
    };
    source.onerror = () => {
      if (source.readyState !== EventSource.CLOSED) return this._setState("connecting");
      // The browser gave up: wait a random part of the next ceiling, then start over.
      const ceiling = Math.min(maxDelay, minDelay * 2 ** this._failures++);
      this._timer = setTimeout(() => this._open(), ceiling * (0.5 + Math.random() / 2));
      this._setState("waiting");
    };
    for (const type of this._types) this._forward(source, type);
  }

  _forward(source, type) {
    source.addEventListener(type, (event) => {
      // The id is kept over events without one; "" only before the first id on a source.
      if (event.lastEventId) this.lastEventId = event.lastEventId;
      const { data, lastEventId, origin } = event;
      this.dispatchEvent(new MessageEvent(type, { data, lastEventId, origin }));
    });
  }

  _setState(state) {
    this.state = state;
    if (this._options.onStateChange) this._options.onStateChange(state);
  }
}

globalThis.SsecastSource = SsecastSource;
