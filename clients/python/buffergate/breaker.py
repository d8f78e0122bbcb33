"""A circuit breaker, so a producer stops hammering a gateway that keeps failing.

Each batch retries with its own backoff; the breaker is what the batches share. After
`failure_threshold` failed attempts in a row (connection errors, 5xx) it *opens*: no request
goes out until `open_for` has passed, then one probe is let through (*half-open*). The probe's
success closes the breaker; its failure opens it again for twice as long, up to
`max_open_for`. Requests are held back while it is open, never failed: nothing is dropped.

A pure state machine over a caller-supplied clock, so it is tested without sleeping.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class CircuitBreaker:
    """Consecutive-failure breaker; see the module docstring. Times are in seconds."""

    failure_threshold: int = 5
    open_for: float = 1.0
    max_open_for: float = 30.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if not 0 < self.open_for <= self.max_open_for:
            raise ValueError("need 0 < open_for <= max_open_for")
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._current_open_for = self.open_for
        self._probe_out = False
        self.times_opened = 0

    @property
    def state(self) -> BreakerState:
        return self._state

    def retry_at(self) -> float | None:
        """When an open breaker lets its probe through; `None` unless open."""
        if self._state is BreakerState.OPEN:
            return self._opened_at + self._current_open_for
        return None

    def try_acquire(self, now: float) -> bool:
        """Whether a request may go out now. `True` in the half-open state makes the caller
        the probe: it must report the outcome (`record_*`) or `release()` it."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            if now < self._opened_at + self._current_open_for:
                return False
            self._state = BreakerState.HALF_OPEN
            self._probe_out = False
        if self._probe_out:
            return False
        self._probe_out = True
        return True

    def release(self) -> None:
        """A granted request that never reached the gateway (cancelled): a half-open breaker
        lets the next one probe instead."""
        if self._state is BreakerState.HALF_OPEN:
            self._probe_out = False

    def record_success(self) -> None:
        """The gateway answered with something other than a 5xx."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_out = False
        self._current_open_for = self.open_for

    def record_failure(self, now: float) -> bool:
        """A connection error or a 5xx; returns whether this failure opened the breaker."""
        if self._state is BreakerState.HALF_OPEN:
            # The probe failed: back off harder.
            self._current_open_for = min(self.max_open_for, self._current_open_for * 2)
            self._open(now)
            return True
        if self._state is BreakerState.OPEN:
            # A request sent before the breaker opened; it is open already.
            return False
        self._failures += 1
        if self._failures >= self.failure_threshold:
            self._open(now)
            return True
        return False

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probe_out = False
        self._failures = 0
        self.times_opened += 1
