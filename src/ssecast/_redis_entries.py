"""How an event is stored in the Redis Stream, and read back without serializing again.

An entry holds the fields `seq`, `type`, `channel`, `data` and `body` (the
encoded SSE frame without its `id:` line); the stream id Redis assigns is the event
id. `seq` counts the entries of the stream: a Lua script reads the newest entry's and
appends the next in one atomic step, so a reader that finds a number missing knows that
an entry was trimmed away before it could read it.

Each entry also holds `run`, the `run_id` of the server that wrote it. When the
script finds the newest entry written by another run, the server restarted since, and
what was published just before may be gone (an append-only file not yet synced, a
snapshot minutes old): it appends a *gap marker*, an entry of type `ssecast.gap`,
before the event. No client receives a marker as such: every reader that reads one gives
its subscribers a gap, and no replay crosses one. It takes no process listening across
the restart, since the first publish after it writes the marker.
"""

from __future__ import annotations

import logging
import re
from typing import Final, NamedTuple, cast

from ssecast._encoder import GAP_EVENT_TYPE
from ssecast._event import Draft, Event

__all__ = [
    "PUBLISH_SCRIPT",
    "STREAM_START",
    "Entry",
    "parse_id",
    "publish_args",
    "read_reply",
]

logger = logging.getLogger("ssecast")

STREAM_START: Final = "0-0"
"""The id before every entry: reading after it reads the whole stream."""

# KEYS[1]: the stream. ARGV: maxlen, type, channel, data, body, the gap marker's type.
# Returns the new entry's id. The newest entry may be one ssecast did not write (no seq);
# then up to a hundred are looked at, and the count restarts at 1 when none has one,
# which readers take as a gap. INFO may be refused (an ACL): then restarts go unmarked,
# and an entry written so (no run) is compared with nothing.
PUBLISH_SCRIPT: Final = """
local function newest(count)
  local entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', count)
  for _, entry in ipairs(entries) do
    local fields, found = entry[2], {}
    for i = 1, #fields, 2 do
      found[fields[i]] = fields[i + 1]
    end
    if tonumber(found['seq']) then
      return found
    end
  end
  return nil
end
local function append(seq, run, kind, channel, data, body)
  return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
    'seq', string.format('%d', seq), 'run', run,
    'type', kind, 'channel', channel, 'data', data, 'body', body)
end
local info = redis.pcall('INFO', 'server')
local run = type(info) == 'string' and string.match(info, 'run_id:(%x+)') or ''
local last = newest(1) or newest(100)
local seq = last and tonumber(last['seq']) or 0
if last and run ~= '' and (last['run'] or '') ~= '' and last['run'] ~= run then
  seq = seq + 1
  append(seq, run, ARGV[6], '', '', '')
end
return append(seq + 1, run, ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"""

_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_MAX_ID_PART: Final = 2**64 - 1

# A stream entry as redis-py returns it without decoding: (id, {field: value}).
_Raw = tuple[bytes, dict[bytes, bytes]]


class Entry(NamedTuple):
    """One entry of the stream, as read."""

    id: str
    seq: int | None
    """Its number in the stream; `None` if it has none (written by ssecast 0.1)."""
    event: Event | None
    """The event it holds; `None` for a gap marker or an entry ssecast did not write."""
    gap: bool = False
    """Whether it is a gap marker."""

    @classmethod
    def parse(cls, raw: _Raw) -> Entry:
        """Rebuild the event of a raw entry: bytes are concatenated, nothing serialized.

        An entry ssecast did not write, from another program say, is logged and given no
        event, so that it is skipped rather than allowed to stop a reader.
        """
        stream_id, fields = raw
        entry_id = stream_id.decode()
        seq = fields.get(b"seq")
        try:
            draft = Draft(
                fields[b"type"].decode(),
                fields[b"channel"].decode(),
                fields[b"data"].decode(),
                fields[b"body"],
            )
            number = None if seq is None else int(seq)
        except (KeyError, UnicodeDecodeError, ValueError):
            logger.warning("skipped stream entry %s: not an ssecast event", entry_id)
            return cls(entry_id, None, None)
        if draft.type == GAP_EVENT_TYPE:
            return cls(entry_id, number, None, gap=True)
        return cls(entry_id, number, draft.stamp(entry_id))


def publish_args(maxlen: int, draft: Draft) -> list[str | bytes | int]:
    """Return the `ARGV` of `PUBLISH_SCRIPT` for `draft`."""
    return [maxlen, draft.type, draft.channel, draft.data, draft.body, GAP_EVENT_TYPE]


def read_reply(reply: object) -> list[Entry]:
    """Return the entries of an XREAD reply (RESP2: `[[key, [entry, ...]]]`)."""
    streams = cast("list[tuple[bytes, list[_Raw]]]", reply)
    return [Entry.parse(raw) for _key, raws in streams for raw in raws]


def parse_id(value: str) -> tuple[int, int] | None:
    """Return a stream id as a comparable pair, or `None` if it is not one."""
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        return None
    milliseconds, sequence = int(match[1]), int(match[2])
    if milliseconds > _MAX_ID_PART or sequence > _MAX_ID_PART:
        return None
    return milliseconds, sequence
