"""The events table: its schema, the statements ssecast runs on it, and the ids it gives.

A row holds `id` (a bigint identity), `token`, `seq`, `type`, `channel`, `data` and
`body` (the encoded SSE frame without its `id:` line). Its primary key makes every read a
range scan over `id`. `data` is `bytea` (UTF-8), not `text`: raw data may hold NUL, which
`text` refuses.

Every publish takes a transaction-level advisory lock on the table, then reads the row
with the highest id, and writes its own:

- `seq` is that row's plus one: the rows are numbered without a hole, so a reader that
  finds a number missing knows that rows were trimmed before it read them. The same lock
  makes rows commit in id order: a row becomes visible before the next id is drawn, so a
  reader that reads "after the last id it delivered" never skips a row that commits late.
- `token` is that row's, or, in an empty table, 12 random hex digits: a *generation* of
  the table. An event id is `<token>-<id>`. Ids are handed out again only after the table
  was emptied (`TRUNCATE ... RESTART IDENTITY`, or dropped and created again), and the
  first publish after that begins a new generation, so an id of before it carries another
  token: foreign (a gap), never replayed from the new rows. So is an id from another
  database. The identity restarted while rows remain (`ALTER ... RESTART`, `setval`)
  shows as a new id not above the highest one: the publish is rolled back, and the
  sequence is moved past the rows (`catch_up`) before it is tried again.

So the rows of a table, at any moment, carry one token, and their ids increase with
`seq`. A trigger on `TRUNCATE` would miss a restarted sequence and need the table's owner;
the token costs the publish nothing it did not read already. A dump restored elsewhere
keeps its rows, tokens and identity, so its ids stay good. Not seen: the newest rows
deleted, then the identity set back among their ids (which no row holds any more).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final, LiteralString, NamedTuple

from psycopg import ClientCursor, Connection, errors, sql
from psycopg.rows import TupleRow

from ssecast._event import Draft, Event
from ssecast._exceptions import BackendUnavailableError, ConfigurationError

__all__ = ["LAST_ID", "IdsBehindError", "Newest", "Page", "Row", "Table", "format_id", "parse_id"]

LAST_ID: Final = 2**63 - 1
"""The largest id a bigint holds: reading up to it reads to the end."""

_PART = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
_NAME = re.compile(rf"{_PART}(\.{_PART})?")
_EVENT_ID = re.compile(r"([0-9a-f]{12})-([1-9][0-9]{0,18})")
_COLUMNS: Final = frozenset({"id", "token", "seq", "type", "channel", "data", "body"})
# application_name, "ssecast <table>", is cut at 63 bytes.
_MAX_NAME: Final = 55


class Row(NamedTuple):
    """One row of the table, as read: its event wants only its id."""

    id: int
    token: str
    """The generation of the table the row belongs to, which its event id carries."""
    seq: int
    draft: Draft


class Page(NamedTuple):
    """What one read of the table found: its generation now, and rows in id order."""

    token: str | None
    """The token of the row with the highest id; `None` when the table is empty."""
    rows: list[Row]


class Newest(NamedTuple):
    """The row with the highest id when the table was looked at: reading begins after it."""

    token: str | None
    """Its token; `None` for an empty table."""
    id: int
    """Its id; 0 for an empty table."""
    seq: int
    """Its number; 0 for an empty table."""


class _Resolved(NamedTuple):
    """What the table's schema-qualified name gives: the same for every spelling of it."""

    lock_key: int
    """The key of the publishers' advisory lock."""
    channel: str
    """The NOTIFY channel: each publish sends its id there, never its payload."""


class Table:
    """The statements for one events table, built once.

    :param name: the table, `name` or `schema.name`: letters, digits and underscores.
    :param maxlen: about how many rows to keep.
    :raises ConfigurationError: the name is not one.
    """

    def __init__(self, name: str, maxlen: int) -> None:
        if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
            raise ConfigurationError(
                f"table must be a name or schema.name of letters, digits and underscores, "
                f"at most {_MAX_NAME} characters, got {name!r}"
            )
        self.name = name
        self._maxlen = maxlen
        # Trimming runs on every step-th publish and deletes a range of old ids by the
        # primary key: about maxlen rows stay (up to step - 1 more), with no full scan.
        self._step = max(1, min(100, maxlen // 10))
        parts = name.split(".")
        self._regclass = ".".join(f'"{part}"' for part in parts)
        # The lock key and the channel come from the schema-qualified name, resolved on
        # first use: backends that spell the table differently (`x`, `public.x`, or `x`
        # under another search_path) take the same lock and hear each other.
        self._resolved: _Resolved | None = None
        table = sql.Identifier(*parts)
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, token text NOT NULL,"
            " seq bigint NOT NULL, type text NOT NULL, channel text NOT NULL,"
            " data bytea NOT NULL, body bytea NOT NULL)"
        ).format(table)
        # Two statements sent as one query, so a publish is one round trip and runs as
        # one transaction. The highest row's token and seq are read after the lock is
        # taken (by a statement of their own, whose snapshot sees every earlier publish).
        # SQL has no RAISE: dividing by zero aborts the transaction, lock and row, when
        # the identity handed out an id not above the highest row's (it was set back).
        self._insert = sql.SQL(
            "SELECT pg_advisory_xact_lock(%s);"
            " WITH last AS (SELECT id, token, seq FROM {table} ORDER BY id DESC LIMIT 1),"
            " new AS (INSERT INTO {table} (token, seq, type, channel, data, body)"
            "  SELECT coalesce((SELECT token FROM last), %s),"
            "   coalesce((SELECT seq FROM last), 0) + 1, %s, %s, %s, %s"
            "  RETURNING id, token, seq),"
            " trimmed AS (DELETE FROM {table}"
            "  WHERE id <= (SELECT id FROM new) - %s AND (SELECT seq FROM new) %% %s = 0)"
            " SELECT new.id, new.token, pg_notify(%s, new.id::text)::text,"
            "  1 / (new.id > coalesce((SELECT id FROM last), 0))::int"
            " FROM new"
        ).format(table=table)
        self._read = sql.SQL(
            "SELECT newest.token, e.id, e.token, e.seq, e.type, e.channel, e.data, e.body"
            " FROM (SELECT (SELECT token FROM {table} ORDER BY id DESC LIMIT 1) AS token) newest"
            " LEFT JOIN LATERAL (SELECT * FROM {table} WHERE id >= %s AND id <= %s"
            "  ORDER BY id LIMIT %s) e ON true ORDER BY e.id"
        ).format(table=table)
        self._newest = sql.SQL("SELECT token, id, seq FROM {} ORDER BY id DESC LIMIT 1").format(
            table
        )
        self._catch_up = sql.SQL(
            "SELECT setval(pg_get_serial_sequence(%s, 'id'), max(id)) FROM {}"
        ).format(table)

    # -- statements --------------------------------------------------------------------

    def ensure(self, conn: Connection[TupleRow]) -> None:
        """Create the table if it is missing; check that an existing one is ssecast's.

        Run under the publishers' lock, so that processes starting at once agree.

        :raises BackendUnavailableError: the table lacks a column of ssecast's: it is not
            ssecast's, and is left as it is.
        :raises psycopg.Error: the database refused or could not be reached.
        """
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._names(conn).lock_key,))
            # CREATE TABLE IF NOT EXISTS would need CREATE on the schema even when the
            # table exists, which a user who may only write it lacks.
            if self._value(conn, "SELECT to_regclass(%s)") is None:
                conn.execute(self._create)
                return
            columns = self._value(
                conn,
                "SELECT array_agg(attname::text) FROM pg_attribute"
                " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            )
            missing = sorted(_COLUMNS - set(columns))  # type: ignore[call-overload]
            if missing:
                raise BackendUnavailableError(
                    f"the table {self.name} is not ssecast's: it has no column "
                    f"{', '.join(missing)}; nothing was written to it (choose another table)"
                )

    def insert(self, conn: Connection[TupleRow], draft: Draft) -> Event:
        """Append `draft` in one transaction and notify its id; return its event.

        :raises IdsBehindError: the identity gave an id not above the highest row's;
            nothing was written.
        :raises psycopg.Error: the database refused (a missing table is `UndefinedTable`,
            an id given twice `UniqueViolation`).
        """
        names = self._names(conn)
        # Parameters bound on the client: the server takes several statements in one
        # query only without bound parameters.
        cursor = ClientCursor(conn)
        try:
            cursor.execute(
                self._insert,
                (
                    names.lock_key,
                    secrets.token_hex(6),  # a new generation's, if the table is empty
                    draft.type,
                    draft.channel,
                    draft.data.encode(),
                    draft.body,
                    self._maxlen,
                    self._step,
                    names.channel,
                ),
            )
        except errors.DivisionByZero:
            raise IdsBehindError(self.name) from None
        cursor.nextset()  # past the lock's result
        row = cursor.fetchone()
        assert row is not None  # an INSERT ... RETURNING of one row
        return draft.stamp(format_id(row[1], row[0]))

    def catch_up(self, conn: Connection[TupleRow]) -> None:
        """Move the id sequence to the highest row's id: it was set back under the rows.

        :raises psycopg.Error: the database refused (`setval` wants `UPDATE` on the
            sequence), or could not be reached.
        """
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._names(conn).lock_key,))
            conn.execute(self._catch_up, (self._regclass,))

    def read(self, conn: Connection[TupleRow], first: int, last: int, limit: int) -> Page:
        """Return the rows with ids from `first` to `last`, at most `limit` of them.

        :raises psycopg.Error: the database refused (a missing table is `UndefinedTable`).
        """
        found = conn.execute(self._read, (first, last, limit)).fetchall()
        rows = [
            Row(r[1], r[2], r[3], Draft(r[4], r[5], bytes(r[6]).decode(), bytes(r[7])))
            for r in found
            if r[1] is not None  # the table holds none of those ids
        ]
        return Page(found[0][0], rows)

    def newest(self, conn: Connection[TupleRow]) -> Newest:
        """Return the row with the highest id now.

        :raises psycopg.Error: the database refused (a missing table is `UndefinedTable`).
        """
        found = conn.execute(self._newest).fetchone()
        return Newest(None, 0, 0) if found is None else Newest(*found)

    def listen(self, conn: Connection[TupleRow]) -> None:
        """Have `conn` receive the notifications of publishes (it must be in autocommit)."""
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._names(conn).channel)))

    # -- helpers -------------------------------------------------------------------------

    def _names(self, conn: Connection[TupleRow]) -> _Resolved:
        """Return the lock key and channel, from the table's schema-qualified name.

        The name is the table's if it exists, else the one `CREATE TABLE` would give it.
        """
        if self._resolved is None:
            cursor = conn.execute(
                "SELECT coalesce("
                " (SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c"
                "  JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)),"
                " (SELECT CASE WHEN cardinality(p) = 2 THEN format('%%I.%%I', p[1], p[2])"
                "  ELSE format('%%I.%%I', current_schema(), p[1]) END FROM parse_ident(%s) p))",
                (self._regclass, self._regclass),
            )
            found = cursor.fetchone()
            assert found is not None  # a SELECT without FROM gives one row
            digest = hashlib.blake2b(f"ssecast {found[0]}".encode(), digest_size=8).digest()
            # A channel name is at most 63 bytes, which a schema-qualified name may pass.
            self._resolved = _Resolved(
                int.from_bytes(digest, "big", signed=True), "ssecast:" + digest.hex()
            )
        return self._resolved

    def _value(self, conn: Connection[TupleRow], query: LiteralString) -> object:
        """Return the one value `query` gives for this table's name."""
        cursor = conn.execute(query, (self._regclass,))
        found = cursor.fetchone()
        assert found is not None  # a SELECT without FROM gives one row
        return found[0]


class IdsBehindError(BackendUnavailableError):
    """The identity gave an id not above the table's highest: it was set back under its rows.

    The publish that raises it is rolled back; the caller catches up and tries again once.
    """

    def __init__(self, table: str) -> None:
        super().__init__(
            f"the identity of the table {table} was set back below its newest row; nothing "
            "was published (move it past the rows: ALTER TABLE ... ALTER COLUMN id RESTART "
            "WITH <the highest id plus one>)"
        )


def format_id(token: str, number: int) -> str:
    """Return the event id of row `number` of the generation `token`."""
    return f"{token}-{number}"


def parse_id(event_id: str) -> tuple[str, int] | None:
    """Return the token and row id of an event id; `None` if it is not one."""
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        return None
    number = int(match[2])
    return (match[1], number) if number <= LAST_ID else None
