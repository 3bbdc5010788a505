"""Turn what `publish()` gets into a [`Draft`][ssecast.Draft]: validate, serialize once, encode."""

from __future__ import annotations

import json
import json.encoder
from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

from ssecast import _wire
from ssecast._event import RESERVED_PREFIX, Draft, check_channel, check_field
from ssecast._exceptions import (
    ConfigurationError,
    InvalidFieldError,
    NotSerializableError,
    PayloadTooLargeError,
    UnknownEventTypeError,
)

__all__ = ["GAP_EVENT_TYPE", "UNAVAILABLE_EVENT_TYPE", "Encoder", "Payload", "Serializer"]

Payload: TypeAlias = Any
"""What `publish` takes as data: JSON values by default, anything the serializer takes."""

Serializer = Callable[[Payload], str | bytes]
"""Turns published data into text: `str`, or `bytes` holding UTF-8."""

GAP_EVENT_TYPE = "ssecast.gap"
"""Begins a resumed stream whose missed events are no longer known."""

UNAVAILABLE_EVENT_TYPE = "ssecast.unavailable"
"""The one event of a stream refused for a while; its data names the reason.

Its data is `{"reason": "closed"}`, `"backend_unavailable"` or `"too_many_subscribers"`,
and the stream's `retry:` field tells the `EventSource` when to come back."""

# Caches of validated event types and channels stop growing here, so that a publisher
# inventing names cannot grow memory; names beyond it are simply checked every time.
_CACHE_LIMIT = 1024


class Encoder:
    """The validation and encoding half of `publish`; safe to share between threads.

    :param event_types: the allowlist, or `None` for any valid type.
    :param max_payload_bytes: the largest serialized data, in UTF-8 bytes.
    :param serializer: turns data into text; `None` is compact JSON.
    :raises ConfigurationError: `event_types` is a bare `str` or holds an invalid type.
    """

    def __init__(
        self,
        event_types: Iterable[str] | None,
        max_payload_bytes: int,
        serializer: Serializer | None,
    ) -> None:
        self._max_payload_bytes = max_payload_bytes
        self._serialize: Serializer = _compact_json if serializer is None else serializer
        self._allowed: frozenset[str] | None = None
        # Validated names; dict and set operations are atomic, so threads share them.
        self._prefixes: dict[str, bytes] = {}
        self._channels: set[str] = set()
        if event_types is not None:
            if isinstance(event_types, str):
                raise ConfigurationError(
                    f"event_types must be a collection of types, got the str {event_types!r}; "
                    f"write event_types=[{event_types!r}]"
                )
            self._allowed = frozenset(event_types)
            for event_type in self._allowed:
                try:
                    self._prefixes[event_type] = _wire.event_prefix(_checked_type(event_type))
                except InvalidFieldError as error:
                    raise ConfigurationError(f"event_types: {error}") from error

    def draft(self, event_type: str, data: Payload, channel: str, raw: bool) -> Draft:
        """Return the encoded, id-less event.

        :raises PublishError: a subclass that says what is wrong; nothing was encoded.
        """
        prefix = self._prefixes.get(event_type) if isinstance(event_type, str) else None
        if prefix is None:
            prefix = self._admit_type(event_type)
        if not (isinstance(channel, str) and channel in self._channels):
            self._admit_channel(channel)
        text = self._text(data, raw)
        try:
            encoded = text.encode()
        except UnicodeEncodeError as error:
            raise NotSerializableError(
                f"data is not valid Unicode text ({error.reason}); remove lone surrogates"
            ) from error
        if len(encoded) > self._max_payload_bytes:
            raise PayloadTooLargeError(len(encoded), self._max_payload_bytes)
        return Draft(event_type, channel, text, _wire.encode_body(prefix, encoded))

    def _text(self, data: Payload, raw: bool) -> str:
        if raw:
            if not isinstance(data, str):
                raise NotSerializableError(
                    f"raw=True sends a str as it is, got {type(data).__name__}; "
                    "pass a str, or drop raw=True to serialize the value"
                )
            return data
        try:
            text = self._serialize(data)
        except RecursionError as error:
            raise NotSerializableError(
                "the serializer refused the data: Circular reference, or nesting deeper than "
                "the recursion limit; publish a tree of plain values"
            ) from error
        except (TypeError, ValueError, OverflowError) as error:
            raise NotSerializableError(
                f"the serializer refused the data: {error}; publish JSON-compatible values "
                "or pass Broadcaster(serializer=...)"
            ) from error
        if isinstance(text, bytes):
            try:
                return text.decode()
            except UnicodeDecodeError as error:
                raise NotSerializableError(
                    f"the serializer returned bytes that are not UTF-8: {error}"
                ) from error
        if not isinstance(text, str):
            raise NotSerializableError(
                f"the serializer must return str or bytes, not {type(text).__name__}"
            )
        return text

    def _admit_type(self, event_type: object) -> bytes:
        name = _checked_type(event_type)
        if self._allowed is not None:
            raise UnknownEventTypeError(name, self._allowed)
        prefix = _wire.event_prefix(name)
        if len(self._prefixes) < _CACHE_LIMIT:
            self._prefixes[name] = prefix
        return prefix

    def _admit_channel(self, channel: object) -> None:
        name = check_channel(channel)
        if len(self._channels) < _CACHE_LIMIT:
            self._channels.add(name)


def _checked_type(event_type: object) -> str:
    """Return `event_type` if it is a valid type of the user's; raise otherwise."""
    name = check_field("event type", event_type)
    if name.startswith(RESERVED_PREFIX):
        raise InvalidFieldError(
            "event type", name, f"the prefix {RESERVED_PREFIX!r} is reserved for ssecast's own"
        )
    return name


def _refuse(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_compact_json() -> Serializer:
    """Return compact `json.dumps` that refuses NaN and infinities; C-accelerated if it can."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover  (only Pythons without the _json module)
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
    # json.dumps builds this encoder on every call; building it once halves the cost.
    # No circular-reference markers: they would be shared between threads, and a cycle
    # still ends in RecursionError, which publish reports as NotSerializableError.
    encode_chunks = c_make_encoder(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )

    def compact_json(value: object) -> str:
        return "".join(encode_chunks(value, 0))

    return compact_json


_compact_json = _make_compact_json()
