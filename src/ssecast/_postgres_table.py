"""The events table: its schema, the statements ssecast runs on it, and the ids it gives.

A row holds `id` (a bigint identity: never handed out twice, unless someone restarts it,
as `TRUNCATE ... RESTART IDENTITY` does; see `_postgres_reader.py`),
`seq`, `type`, `channel`, `data` and `body` (the encoded SSE frame without its
`id:` line). Its primary key makes every read a range scan over `id`.

`data` is `bytea` (UTF-8), not `text`: raw data may hold NUL, which `text` refuses.

`seq` counts the rows without a hole: each publish takes a transaction-level advisory
lock on the table, then writes the newest row's `seq` plus one. So a reader that finds a
number missing knows that rows were trimmed before it read them. The same lock makes rows
commit in id order: a row becomes visible before the next id is drawn, so a reader that
reads "after the last id it delivered" never skips a row that commits late.

The table's comment holds its *token*, `ssecast <12 hex digits>`, drawn when ssecast
creates the table (or finds it without one). An event id is `<token>-<id>`: an id from a
dropped and recreated table, another database, or another backend carries another token,
so it is foreign (a gap), never replayed from the wrong rows. A dump restored elsewhere
keeps its comment and identity, so its ids stay good.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Final, LiteralString, NamedTuple

from psycopg import Connection, sql
from psycopg.rows import TupleRow

from ssecast._event import Draft, Event
from ssecast._exceptions import BackendUnavailableError, ConfigurationError

__all__ = ["LAST_ID", "Newest", "NoTokenError", "Page", "Row", "Table", "format_id", "parse_id"]

LAST_ID: Final = 2**63 - 1
"""The largest id a bigint holds: reading up to it reads to the end."""

_PART = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
_NAME = re.compile(rf"{_PART}(\.{_PART})?")
_TOKEN = re.compile(r"[0-9a-f]{12}")
_EVENT_ID = re.compile(r"([0-9a-f]{12})-([1-9][0-9]{0,18})")
_COMMENT_PREFIX: Final = "ssecast "
_COLUMNS: Final = frozenset({"id", "seq", "type", "channel", "data", "body"})
# NOTIFY channel names are identifiers: at most 63 bytes, with "ssecast:" before the name.
_MAX_NAME: Final = 55


class Row(NamedTuple):
    """One row of the table, as read: its event wants only its id."""

    id: int
    seq: int
    draft: Draft


class Page(NamedTuple):
    """What one read of the table found: which table it is, and rows in id order."""

    oid: int
    """The table's oid: it changes when the table is dropped and created again."""
    token: str | None
    """The token in its comment; `None` when it has none (someone removed it)."""
    rows: list[Row]


class Newest(NamedTuple):
    """The newest row of a table when it was looked at: where reading after it begins."""

    oid: int
    token: str | None
    """The table's token; `None` when it has none (someone removed it)."""
    id: int
    """Its id; 0 for an empty table."""
    seq: int
    """Its number; 0 for an empty table."""


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
        self.channel: Final = "ssecast:" + name
        """The NOTIFY channel: each publish sends its id there, never its payload."""
        self._maxlen = maxlen
        # Trimming runs on every step-th publish and deletes a range of old ids by the
        # primary key: about maxlen rows stay (up to step - 1 more), with no full scan.
        self._step = max(1, min(100, maxlen // 10))
        parts = name.split(".")
        self._regclass = ".".join(f'"{part}"' for part in parts)
        # The publishers' lock is keyed on the schema-qualified name, resolved on first
        # use: backends that spell the table differently (`x`, `public.x`) share it.
        self._lock_key: int | None = None
        table = sql.Identifier(*parts)
        self._create = sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " seq bigint NOT NULL, type text NOT NULL, channel text NOT NULL,"
            " data bytea NOT NULL, body bytea NOT NULL)"
        ).format(table)
        self._ident = table
        # The newest row's seq, read after the lock is taken (a statement of its own, so
        # its snapshot sees every earlier publish), plus one.
        self._insert = sql.SQL(
            "WITH last AS (SELECT seq FROM {table} ORDER BY id DESC LIMIT 1),"
            " new AS (INSERT INTO {table} (seq, type, channel, data, body)"
            "  SELECT coalesce((SELECT seq FROM last), 0) + 1, %s, %s, %s, %s"
            "  RETURNING id, seq),"
            " trimmed AS (DELETE FROM {table}"
            "  WHERE id <= (SELECT id FROM new) - %s AND (SELECT seq FROM new) %% %s = 0)"
            " SELECT new.id, obj_description(%s::regclass, 'pg_class'),"
            "  pg_notify(%s, new.id::text)::text"
            " FROM new"
        ).format(table=table)
        self._read = sql.SQL(
            "WITH meta AS (SELECT %s::regclass::oid AS oid,"
            "  obj_description(%s::regclass, 'pg_class') AS comment)"
            " SELECT meta.oid, meta.comment, e.id, e.seq, e.type, e.channel, e.data, e.body"
            " FROM meta LEFT JOIN LATERAL (SELECT * FROM {} WHERE id >= %s AND id <= %s"
            "  ORDER BY id LIMIT %s) e ON true ORDER BY e.id"
        ).format(table)
        self._newest = sql.SQL(
            "SELECT %s::regclass::oid, obj_description(%s::regclass, 'pg_class'),"
            " (SELECT id FROM {table} ORDER BY id DESC LIMIT 1),"
            " (SELECT seq FROM {table} ORDER BY id DESC LIMIT 1)"
        ).format(table=table)
        self._listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))

    # -- statements --------------------------------------------------------------------

    def ensure(self, conn: Connection[TupleRow]) -> str:
        """Create the table if it is missing, give it a token if it has none; return it.

        Run under the publishers' lock, so that processes starting at once agree.

        :raises BackendUnavailableError: the table exists without a token and lacks a
            column of ssecast's: it is not ssecast's, and is left as it is.
        :raises psycopg.Error: the database refused or could not be reached.
        """
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._key(conn),))
            # CREATE TABLE IF NOT EXISTS would need CREATE on the schema even when the
            # table exists, which a user who may only write it lacks.
            if self._value(conn, "SELECT to_regclass(%s)") is None:
                conn.execute(self._create)
            found = self._token(
                self._value(conn, "SELECT obj_description(%s::regclass, 'pg_class')")
            )
            if found is not None:
                return found
            # Another's table, which a comment must not overwrite: leave it as it is.
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
            token = secrets.token_hex(6)
            comment = sql.Literal(_COMMENT_PREFIX + token)
            conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(self._ident, comment))
            return token

    def insert(self, conn: Connection[TupleRow], draft: Draft) -> Event:
        """Append `draft` in one transaction and notify its id; return its event.

        The lock, the row, the trimming and the notification are sent at once (a
        pipeline), so a publish costs one round trip and the commit.

        :raises NoTokenError: the table has no token; nothing was written.
        :raises psycopg.Error: the database refused (a missing table is `UndefinedTable`).
        """
        key = self._key(conn)
        with conn.pipeline(), conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            cursor = conn.execute(
                self._insert,
                (
                    draft.type,
                    draft.channel,
                    draft.data.encode(),
                    draft.body,
                    self._maxlen,
                    self._step,
                    self._regclass,
                    self.channel,
                ),
            )
            row = cursor.fetchone()
            assert row is not None  # an INSERT ... RETURNING of one row
            token = self._token(row[1])
            if token is None:
                # Rolled back: the caller gives the table a token and tries again.
                raise NoTokenError
        return draft.stamp(format_id(token, row[0]))

    def read(self, conn: Connection[TupleRow], first: int, last: int, limit: int) -> Page:
        """Return the rows with ids from `first` to `last`, at most `limit` of them.

        :raises psycopg.Error: the database refused (a missing table is `UndefinedTable`).
        """
        cursor = conn.execute(self._read, (self._regclass, self._regclass, first, last, limit))
        found = cursor.fetchall()
        oid, comment = found[0][0], found[0][1]
        rows = [
            Row(row[2], row[3], Draft(row[4], row[5], bytes(row[6]).decode(), bytes(row[7])))
            for row in found
            if row[2] is not None  # the table holds none of those ids
        ]
        return Page(oid, self._token(comment), rows)

    def newest(self, conn: Connection[TupleRow]) -> Newest:
        """Return the newest row now.

        :raises psycopg.Error: the database refused (a missing table is `UndefinedTable`).
        """
        cursor = conn.execute(self._newest, (self._regclass, self._regclass))
        found = cursor.fetchone()
        assert found is not None  # a SELECT without FROM gives one row
        return Newest(found[0], self._token(found[1]), found[2] or 0, found[3] or 0)

    def listen(self, conn: Connection[TupleRow]) -> None:
        """Have `conn` receive the notifications of publishes (it must be in autocommit)."""
        conn.execute(self._listen)

    # -- helpers -------------------------------------------------------------------------

    def _key(self, conn: Connection[TupleRow]) -> int:
        """Return the publishers' lock key: a hash of the table's schema-qualified name.

        The name is the table's if it exists, else the one `CREATE TABLE` would give it.
        """
        if self._lock_key is None:
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
            self._lock_key = int.from_bytes(
                hashlib.blake2b(f"ssecast {found[0]}".encode(), digest_size=8).digest(),
                "big",
                signed=True,
            )
        return self._lock_key

    def _value(self, conn: Connection[TupleRow], query: LiteralString) -> object:
        """Return the one value `query` gives for this table's name."""
        cursor = conn.execute(query, (self._regclass,))
        found = cursor.fetchone()
        assert found is not None  # a SELECT without FROM gives one row
        return found[0]

    @staticmethod
    def _token(comment: object) -> str | None:
        if not isinstance(comment, str) or not comment.startswith(_COMMENT_PREFIX):
            return None
        token = comment.removeprefix(_COMMENT_PREFIX)
        return token if _TOKEN.fullmatch(token) else None


class NoTokenError(Exception):
    """The table has lost its token (its comment): what was written was rolled back."""


def format_id(token: str, number: int) -> str:
    """Return the event id of row `number` in the table whose token is `token`."""
    return f"{token}-{number}"


def parse_id(event_id: str) -> tuple[str, int] | None:
    """Return the token and row id of an event id; `None` if it is not one."""
    match = _EVENT_ID.fullmatch(event_id)
    if match is None:
        return None
    number = int(match[2])
    return (match[1], number) if number <= LAST_ID else None
