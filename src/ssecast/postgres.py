"""A PostgreSQL backend: many processes act as one broadcaster, with no Redis.

Design
------
Every backend with the same database and `table` shares the events in that table
(see `_postgres_table.py` for its columns, ids and trimming):

- `publish` appends the event in one transaction, under a transaction-level advisory
  lock, so rows commit in id order; the transaction also trims old rows and sends
  `NOTIFY` with the row's id, never its payload, so any payload up to
  `max_payload_bytes` fits. `apublish` does the same from a worker thread.
- `listen` creates the table if it is missing, runs `LISTEN`, notes the newest row and
  starts ONE listener thread (`_postgres_reader.py`), which reads the rows after the
  last one it delivered whenever a notification comes, and delivers them in id order.
  A process therefore holds one listening connection however many SSE clients it serves.
- `replay` reads a range of ids by the primary key, and checks that no row of it was
  trimmed (its numbering) and that the client's id is of the table's generation now (its
  token: a table emptied, with its ids restarted or not, begins a new one).

Faults
------
- `publish`, `apublish` and `replay` raise
  [`BackendUnavailableError`][ssecast.BackendUnavailableError] when PostgreSQL cannot be
  reached or refuses the statement. Statements are never retried behind the caller's
  back, except once after creating a missing table. When the connection is lost during
  the commit, the event may still have been published.
- The listener reconnects with backoff and reads what was published meanwhile from the
  table; where rows were trimmed before it read them, or the table was emptied (a new
  generation), every subscriber of the process gets an `ssecast.gap` event: never a
  silent hole.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Final

from ssecast import _fork
from ssecast._backend import Ahead, Deliver, ReportGap
from ssecast._event import Draft, Event
from ssecast._exceptions import BackendUnavailableError, ConfigurationError

try:
    import psycopg
except ImportError as error:  # pragma: no cover - tested in a subprocess without psycopg
    if error.name != "psycopg" and not (error.name or "").startswith("psycopg."):
        raise
    raise ImportError(
        "ssecast.postgres needs the psycopg package; install it with: "
        "pip install 'ssecast[postgres]'"
    ) from error

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ssecast._postgres_connections import Connection, Connections, unavailable
from ssecast._postgres_reader import Reader
from ssecast._postgres_table import IdsBehindError, Newest, Table, format_id, parse_id

__all__ = ["PostgresBackend"]

_REPLAY_PAGE: Final = 1000
# Keys of a Django database's OPTIONS that Django itself reads; the rest go to libpq.
_DJANGO_ONLY: Final = frozenset({"isolation_level", "server_side_binding", "assume_role", "pool"})


class PostgresBackend:
    """Carry events between processes through one PostgreSQL table; keep history there.

    Pass it to [`Broadcaster`][ssecast.Broadcaster] in every process that publishes or
    serves subscribers; backends on the same database and `table` act as one
    broadcaster. It connects on first use, never in the constructor, so a broadcaster made
    at import time survives a pre-forking server. One backend serves one broadcaster.

    :param dsn: where PostgreSQL is, as libpq takes it: `postgresql://user@host/db` or
        `host=... dbname=...`. Every connection's `application_name` is set to
        `ssecast <table>` (the `application_name` attribute), whatever the DSN says.
    :param table: the table that holds the events, `name` or `schema.name` (letters,
        digits and underscores, at most 55 characters); created if missing.
    :param maxlen: about how many events the table keeps for `Last-Event-ID` resume
        (trimmed every few publishes, so up to a tenth more, at most 99, may stay).
    :raises ConfigurationError: an argument is out of range.
    """

    def __init__(self, dsn: str, *, table: str = "ssecast_events", maxlen: int = 10_000) -> None:
        if not isinstance(dsn, str):
            raise ConfigurationError(f"dsn must be a str, got {dsn!r}")
        try:
            conninfo_to_dict(dsn)
        except psycopg.Error as error:
            raise ConfigurationError(f"dsn is not a libpq connection string: {error}") from None
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ConfigurationError(f"maxlen must be an int of at least 1, got {maxlen!r}")
        if not isinstance(table, str):
            raise ConfigurationError(f"table must be a str, got {table!r}")
        self._table = Table(table, maxlen)
        self.application_name: Final = "ssecast " + table
        """The `application_name` of this backend's connections, in `pg_stat_activity`."""
        self._connections = Connections(dsn, self.application_name)

        # A leaf lock (see the table in _broadcaster.py) for the state below; never held
        # while PostgreSQL is asked anything.
        self._lock = threading.Lock()
        self._deliver: Deliver | None = None
        self._report_gap: ReportGap | None = None
        self._listening = False  # listen() was called and has not failed
        self._reader: Reader | None = None
        self._closed = False
        # The newest row when delivery began: replay's default end.
        self._origin: Newest | None = None
        # In a forked child, the parent's listener, if any: its connection must not be
        # closed here, and dropping it would warn.
        self._parents: list[Reader | None] = []
        _fork.guard(self, self._lock, PostgresBackend._in_child)

    @classmethod
    def from_django(cls, using: str = "default", **options: object) -> PostgresBackend:
        """Return a backend on the database of Django's `DATABASES[using]`.

        Its name, user, password, host, port and `OPTIONS` (the libpq ones) are used;
        the connections are ssecast's own, never Django's.

        :param using: the alias of a PostgreSQL database in Django's settings.
        :param options: `table` and `maxlen`, as for the constructor.
        :raises ConfigurationError: there is no such alias, or it is not PostgreSQL.
        """
        from django.db import connections
        from django.utils.connection import ConnectionDoesNotExist

        try:
            settings = connections[using].settings_dict
        except ConnectionDoesNotExist:
            raise ConfigurationError(f"Django has no database {using!r}") from None
        if "postgresql" not in settings["ENGINE"]:
            raise ConfigurationError(
                f"Django's database {using!r} is not PostgreSQL: {settings['ENGINE']}"
            )
        params: dict[str, object] = {
            "dbname": settings["NAME"],
            "user": settings["USER"],
            "password": settings["PASSWORD"],
            "host": settings["HOST"],
            "port": settings["PORT"],
        }
        params.update(
            (key, value) for key, value in settings["OPTIONS"].items() if key not in _DJANGO_ONLY
        )
        try:
            dsn = make_conninfo(**{key: str(v) for key, v in params.items() if v not in (None, "")})
        except psycopg.Error as error:
            raise ConfigurationError(f"Django's database {using!r}: {error}") from None
        return cls(dsn, **options)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._reader is not None:
            state = "listening"
        else:
            state = "started" if self._deliver else "not started"
        return f"<PostgresBackend table={self._table.name!r} {state}>"

    # -- delivery ----------------------------------------------------------------------

    def start(self, deliver: Deliver, report_gap: ReportGap) -> None:
        """Remember where `listen` will deliver; connect to nothing yet.

        :param deliver: called with each event, one call at a time.
        :param report_gap: called when events may have been lost before the next one.
        :raises RuntimeError: the backend was started before or closed.
        """
        with self._lock:
            if self._deliver is not None or self._closed:
                raise RuntimeError("a PostgresBackend serves one broadcaster and starts once")
            self._deliver, self._report_gap = deliver, report_gap

    def listen(self) -> None:
        """Create the table if need be, `LISTEN`, and start the thread that delivers.

        Every event published after this call returns, by any process, is passed to the
        `deliver` given to `start`, in id order, from the listener thread.

        :raises BackendUnavailableError: PostgreSQL could not be reached, or the backend
            was closed meanwhile; call again to retry.
        :raises RuntimeError: the backend was not started, listens already, or is closed.
        """
        with self._lock:
            deliver, report_gap = self._deliver, self._report_gap
            if deliver is None or report_gap is None or self._listening or self._closed:
                raise RuntimeError(
                    "a PostgresBackend listens once, after start() and before close()"
                )
            self._listening = True
        try:
            with unavailable("could not start listening", self._connections.availability):
                conn = self._connections.connect()
                try:
                    self._table.ensure(conn)
                    self._table.listen(conn)
                    start = self._table.newest(conn)
                except BaseException:
                    conn.close()
                    raise
            with self._lock:
                closed: bool = self._closed  # close() may have run meanwhile
                if not closed:
                    reader = self._reader = Reader(
                        conn,
                        table=self._table,
                        connect=self._connections.connect,
                        deliver=deliver,
                        report_gap=report_gap,
                        start=start,
                        availability=self._connections.availability,
                    )
                    self._origin = start
            if closed:
                conn.close()
                raise BackendUnavailableError("the PostgresBackend was closed while it connected")
        except BaseException:
            with self._lock:
                self._listening = False
            raise
        reader.start()

    # -- publishing --------------------------------------------------------------------

    def publish(self, draft: Draft) -> Event:
        """Append `draft` to the table and notify listeners; return the event it became.

        :param draft: the validated, encoded event.
        :raises BackendUnavailableError: PostgreSQL could not be reached or refused.
        """
        with (
            self._connections.borrow() as conn,
            unavailable("could not publish", self._connections.availability),
        ):
            try:
                return self._table.insert(conn, draft)
            except psycopg.errors.UndefinedTable:
                self._table.ensure(conn)  # the first publish ever, or the table was dropped
            except (IdsBehindError, psycopg.errors.UniqueViolation):
                self._table.catch_up(conn)  # its identity was set back under its rows
            return self._table.insert(conn, draft)

    async def apublish(self, draft: Draft) -> Event:
        """Do what `publish` does in a worker thread, leaving the loop free.

        :param draft: the validated, encoded event.
        :raises BackendUnavailableError: PostgreSQL could not be reached or refused.
        """
        return await asyncio.to_thread(self.publish, draft)

    # -- history -----------------------------------------------------------------------

    def replay(
        self, after: str, until: str | None, channels: frozenset[str]
    ) -> list[Event] | Ahead | None:
        """Return the events on `channels` after id `after`, up to `until` included.

        :param after: the id the client saw last.
        :param until: the last id already delivered to this process; `None` means the
            newest row when `listen` ran.
        :param channels: the channels to keep.
        :returns: an [`Ahead`][ssecast.Ahead] when `after` is in the table but newer
            than `until`; `None` when it is not an id of this table's generation
            (malformed, from another table or database, or from before the table was
            emptied), is not in it (trimmed), or events after it may be lost (a number
            missing in `seq`).
        :raises BackendUnavailableError: PostgreSQL could not be reached or refused.
        """
        wanted = parse_id(after)
        if wanted is None:
            return None
        token, first = wanted
        if until is None:
            origin = self._origin
            # An origin in an empty table (no token) comes before its rows, whatever theirs.
            end = origin.id if origin is not None and origin.token in (None, token) else None
        else:
            known = parse_id(until)
            end = known[1] if known is not None and known[0] == token else None
        if end is None:
            return None  # the client's id is of another table than this process's
        with (
            self._connections.borrow() as conn,
            unavailable("could not read history", self._connections.availability),
        ):
            if first <= end:
                return self._range(conn, token, first, end, channels)
            page = self._table.read(conn, first, first, 1)
        if not page.rows or page.rows[0].token != token:
            return None  # never published, or lost: a gap
        # The client saw it through a faster process; this one has yet to deliver it.
        return Ahead(lambda event_id: _follows(event_id, token, first))

    def _range(
        self, conn: Connection, token: str, first: int, end: int, channels: frozenset[str]
    ) -> list[Event] | None:
        """Read ids (`first`, `end`] page by page; `None` where events may be missing."""
        events: list[Event] = []
        cursor = first
        while True:
            # Each page begins with its cursor's row: if it is still there, of the client's
            # generation, no row after it was trimmed before the page was read, and the
            # page's rows are of that generation (a table holds one at a time).
            page = self._table.read(conn, cursor, end, _REPLAY_PAGE)
            first_row = page.rows[0] if page.rows else None
            if first_row is None or first_row.id != cursor or first_row.token != token:
                return None
            seq = page.rows[0].seq
            for row in page.rows[1:]:
                if row.seq != seq + 1:
                    return None  # rows are missing there: the client gets a gap
                seq = row.seq
                if row.draft.channel in channels:
                    events.append(row.draft.stamp(format_id(token, row.id)))
            if len(page.rows) < _REPLAY_PAGE:
                return events
            cursor = page.rows[-1].id

    # -- health ------------------------------------------------------------------------

    def check(self) -> None:
        """Run `SELECT 1` on a new connection; return when PostgreSQL answers.

        A new connection, rather than a pooled one: its connect timeout (2 seconds)
        bounds the whole check even when the server accepts connections and never
        answers, which no statement timeout would.

        :raises BackendUnavailableError: PostgreSQL could not be reached or did not answer.
        """
        with (
            unavailable("the health check failed", self._connections.availability),
            self._connections.connect() as conn,
        ):
            conn.execute("SELECT 1")

    @property
    def available(self) -> bool:
        """Whether the last statement reached PostgreSQL (`True` before the first); no I/O."""
        return self._connections.availability.up

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the listener thread and close every connection. Safe to call twice.

        It may wait a few seconds for a statement in flight; `aclose` waits in a worker
        thread.
        """
        self._connections.availability.close()  # what fails as it closes is no outage
        with self._lock:
            self._closed = True
            reader, self._reader = self._reader, None
        if reader is not None:
            reader.stop()
        self._connections.close()

    async def aclose(self) -> None:
        """Do what `close` does without blocking the running event loop."""
        await asyncio.to_thread(self.close)

    def _in_child(self) -> None:
        """In a forked child: the listener was the parent's; this process needs its own."""
        self._parents.append(self._reader)
        self._reader = None
        self._listening = False


def _follows(event_id: str, token: str, number: int) -> bool:
    """Say whether `event_id` comes after row `number` of the table whose token is `token`.

    An id with another token follows it too: that table is gone, with the awaited row.
    """
    parsed = parse_id(event_id)
    return parsed is not None and (parsed[0] != token or parsed[1] > number)
