"""The error hierarchy (ssecast._exceptions): one root, builtin bases, helpful messages."""

from __future__ import annotations

import pytest

import ssecast
from ssecast import (
    BackendUnavailableError,
    BroadcasterClosedError,
    ConfigurationError,
    InvalidFieldError,
    NotSerializableError,
    PayloadTooLargeError,
    PublishError,
    SsecastError,
    TooManySubscribersError,
    UnknownEventTypeError,
)


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (PublishError, (SsecastError, ValueError)),
        (UnknownEventTypeError, (PublishError, ValueError)),
        (PayloadTooLargeError, (PublishError, ValueError)),
        (NotSerializableError, (PublishError, ValueError, TypeError)),
        (InvalidFieldError, (PublishError, ValueError)),
        (ConfigurationError, (SsecastError, ValueError)),
        (BroadcasterClosedError, (SsecastError, RuntimeError)),
        (TooManySubscribersError, (SsecastError, RuntimeError)),
        (BackendUnavailableError, (SsecastError, ConnectionError)),
    ],
)
def test_each_error_derives_from_the_root_and_the_builtin_it_means(
    error: type[Exception], bases: tuple[type[Exception], ...]
) -> None:
    """``except ValueError`` (or TypeError, ...) catches ssecast errors that mean it."""
    assert issubclass(error, SsecastError)
    for base in bases:
        assert issubclass(error, base)
    assert error.__name__.endswith("Error")


def test_every_exported_exception_is_in_the_tree() -> None:
    """Every exception ssecast exports derives from SsecastError."""
    exported = [getattr(ssecast, name) for name in ssecast.__all__]
    errors = [obj for obj in exported if isinstance(obj, type) and issubclass(obj, BaseException)]
    assert len(errors) == 10
    assert all(issubclass(error, SsecastError) for error in errors)


def test_unknown_event_type_names_the_type_the_allowlist_and_the_fix() -> None:
    """The message says which type, what is allowed, and to extend ``event_types``."""
    error = UnknownEventTypeError("oops", frozenset({"b", "a"}))
    assert (error.event_type, error.allowed) == ("oops", frozenset({"a", "b"}))
    message = str(error)
    assert "'oops'" in message
    assert "'a', 'b'" in message
    assert "event_types" in message


def test_unknown_event_type_with_an_empty_allowlist_says_none_is_allowed() -> None:
    """An empty allowlist reads as "none", not as an empty list."""
    assert "allowed: none" in str(UnknownEventTypeError("x", frozenset()))


def test_payload_too_large_names_the_size_the_limit_and_the_fix() -> None:
    """The message gives the size and the limit in bytes and the setting to raise."""
    error = PayloadTooLargeError(70000, 65536)
    assert (error.size, error.limit) == (70000, 65536)
    message = str(error)
    assert "70000 bytes" in message
    assert "65536" in message
    assert "max_payload_bytes" in message


def test_invalid_field_names_the_field_the_value_and_the_reason() -> None:
    """The message quotes the refused value so the caller can find it."""
    error = InvalidFieldError("channel", "a\nb", "no line breaks")
    assert (error.field, error.value) == ("channel", "a\nb")
    assert str(error) == "invalid channel 'a\\nb': no line breaks"


def test_too_many_subscribers_names_the_limit_and_the_fix() -> None:
    """The message gives the limit and the two ways out."""
    error = TooManySubscribersError(3)
    assert error.limit == 3
    assert "already 3 subscribers" in str(error)
    assert "max_subscribers" in str(error)


def test_root_error_catches_everything_ssecast_raises_on_purpose() -> None:
    """One ``except SsecastError`` is enough for a caller that wants to catch them all."""
    with pytest.raises(SsecastError):
        raise NotSerializableError("x")
