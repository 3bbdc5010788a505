// Open one SsecastSource (src/ssecast/static/ssecast.js over the `eventsource` package) on
// URL and print one JSON line per thing it sees:
//
//   node ssecast_source.mjs SSECAST_JS URL SECONDS CLOSE_AFTER TYPE...
//
// A line is {"kind": TYPE | "state", "id", "data", "state", "ms"}. After CLOSE_AFTER events
// of the first TYPE (0: never), or when it first waits to reopen (CLOSE_AFTER "waiting"), it
// calls close() and prints {"kind": "closed"}. The process
// exits by itself after SECONDS, a bound for a test that forgot to stop it.
import { pathToFileURL } from "node:url";
import { EventSource } from "eventsource";

const [script, url, seconds, closeAfter, ...types] = process.argv.slice(2);
globalThis.EventSource = EventSource;
await import(pathToFileURL(script).href);
const say = (kind, fields) => console.log(JSON.stringify({ kind, ms: Date.now(), ...fields }));
const source = new globalThis.SsecastSource(url, {
  minDelay: 200, maxDelay: 1000,
  onStateChange: (state) => {
    say("state", { state });
    if (state === "waiting" && closeAfter === "waiting") {
      source.close();
      say("closed", {});
    }
  },
});
let counted = 0;
for (const type of types) {
  source.addEventListener(type, (event) => {
    say(type, { id: event.lastEventId, data: event.data, state: source.state });
    if (type === types[0] && ++counted === Number(closeAfter)) {
      source.close();
      say("closed", {});
    }
  });
}
setTimeout(() => process.exit(0), Number(seconds) * 1000);
