"""Keep ssecast's locks and per-process state sound across `os.fork()`.

A lock that another thread holds when the process forks stays held for good in the
child, where that thread does not exist. So before a fork the forking thread takes every
lock registered here, in the order they were registered, and releases them on both sides
afterwards; then, in the child only, each owner's `in_child` function runs (a new id
prefix, no subscriptions or reader thread of the parent's).

Registration order is the lock order: a backend is made (and registered) before the
broadcaster that uses it, and a backend's lock is the one taken first. Every lock
registered here is held only by ssecast's own code, which never blocks while holding it,
so the forking thread waits at most for a fan-out to finish.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["guard"]

_Owner = TypeVar("_Owner")

# owner -> (its lock, what the child does with it). Insertion order is the lock order.
_guarded: weakref.WeakKeyDictionary[Any, tuple[threading.Lock, Callable[[Any], None]]] = (
    weakref.WeakKeyDictionary()
)
# Taken first, before any registered lock; guards _guarded and _held.
_registry_lock = threading.Lock()
_held: list[tuple[Any, threading.Lock, Callable[[Any], None]]] = []
_hooked = False


def guard(owner: _Owner, lock: threading.Lock, in_child: Callable[[_Owner], None]) -> None:
    """Hold `lock` across every fork while `owner` lives; then run `in_child(owner)`.

    :param owner: the object the lock belongs to; it is held weakly.
    :param lock: a lock taken only by ssecast's code, never across a blocking call.
    :param in_child: resets `owner` for the child process, after the locks are released.
    """
    global _hooked
    with _registry_lock:
        _guarded[owner] = (lock, in_child)
        if not _hooked:
            # Registered on first use, not at import: importing ssecast changes nothing.
            os.register_at_fork(
                before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
            )
            _hooked = True


def _before() -> None:
    _registry_lock.acquire()
    # Strong references for the duration of the fork, so that no owner vanishes mid-way.
    _held[:] = [(owner, lock, in_child) for owner, (lock, in_child) in _guarded.items()]
    for _owner, lock, _in_child in _held:
        lock.acquire()


def _release() -> list[tuple[Any, threading.Lock, Callable[[Any], None]]]:
    held = _held.copy()
    _held.clear()
    for _owner, lock, _in_child in reversed(held):
        lock.release()
    _registry_lock.release()
    return held


def _after_in_parent() -> None:
    _release()


def _after_in_child() -> None:
    for owner, _lock, in_child in _release():
        in_child(owner)
