// Open COUNT EventSources (the `eventsource` package, which follows the WHATWG spec as
// browsers do) on URL, and print one JSON line per thing each of them sees.
//
//   node listen.mjs URL COUNT SECONDS TYPE...
//
// A line is {"client": i, "kind": "open" | "error" | TYPE, "id", "data", "state", "ms"}, where
// state is the source's readyState (2 is CLOSED: the source gave up for good); an error also
// has "code" (the HTTP status, when one caused it) and "message", which the package adds. The
// process exits by itself after SECONDS, a bound for a test that forgot to stop it.
import { EventSource } from "eventsource";

const [url, count, seconds, ...types] = process.argv.slice(2);
for (let client = 0; client < Number(count); client++) {
  const source = new EventSource(url);
  const say = (kind, event, more = {}) =>
    console.log(JSON.stringify({
      client, kind, id: event.lastEventId ?? "", data: event.data ?? "",
      state: source.readyState, ms: Date.now(), ...more,
    }));
  source.onopen = (event) => say("open", event);
  source.onerror = (event) =>
    say("error", event, { code: event.code ?? null, message: event.message ?? "" });
  for (const type of types) source.addEventListener(type, (event) => say(type, event));
}
setTimeout(() => process.exit(0), Number(seconds) * 1000);
