"""Event ids: UUIDv7 (RFC 9562), time-ordered, from the standard library where it has one.

The gateway deduplicates by event id, so every event the producer sends carries one. A
time-ordered id keeps the ids of one batch close together in Redis's slot hashes and in
ClickHouse's sorting key, and says roughly when the event was made.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable

__all__ = ["uuid7", "uuid7_str"]

_COUNTER_MAX = 0xFFF


class _Generator:
    """RFC 9562 method 1: the 12 `rand_a` bits count ids within one millisecond.

    The counter starts at a random value below half its range, so ids made in the same
    millisecond sort in the order they were made, and a burst of thousands of ids in one
    millisecond borrows the next millisecond rather than losing order. `rand_b` is 62 random
    bits from a generator seeded by `os.urandom` and reseeded in every forked child, so worker
    processes never repeat each other's ids; it is not a secret, only unique.

    Ids are formatted as text directly: the producer needs text for the JSON body, and making a
    `uuid.UUID` first costs more than the rest of the id.
    """

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._rng = random.Random(os.urandom(32))
        self._last_ms = -1
        self._counter = 0
        self._prefix = ""
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._rng.seed(os.urandom(32))
        self._lock = threading.Lock()

    def _set_ms(self, ms: int) -> None:
        self._last_ms = ms
        self._prefix = f"{(ms >> 16) & 0xFFFFFFFF:08x}-{ms & 0xFFFF:04x}-"

    def text(self) -> str:
        with self._lock:
            ms = self._clock() // 1_000_000
            if ms > self._last_ms:
                self._set_ms(ms)
                self._counter = self._rng.getrandbits(11)
            else:
                # Same millisecond, or the clock stepped back: stay after the last id.
                self._counter += 1
                if self._counter > _COUNTER_MAX:
                    self._set_ms(self._last_ms + 1)
                    self._counter = 0
            prefix, counter = self._prefix, self._counter
            rand_b = self._rng.getrandbits(62)
        # version 7 in the top nibble of the third group, variant 0b10 atop the fourth
        return f"{prefix}{0x7000 | counter:04x}-{0x8000 | (rand_b >> 48):04x}-{rand_b & 0xFFFFFFFFFFFF:012x}"

    def __call__(self) -> uuid.UUID:
        return uuid.UUID(self.text())


_stdlib_uuid7: Callable[[], uuid.UUID] | None = getattr(uuid, "uuid7", None)
_generator = _Generator()


def uuid7() -> uuid.UUID:
    """A new UUIDv7: the standard library's (Python 3.14+) when present, else this module's."""
    if _stdlib_uuid7 is not None:
        return _stdlib_uuid7()
    return _generator()


def uuid7_str() -> str:
    """`str(uuid7())`, made without the `uuid.UUID` object where the standard library has none."""
    if _stdlib_uuid7 is not None:
        return str(_stdlib_uuid7())
    return _generator.text()
