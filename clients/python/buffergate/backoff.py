"""When to retry a request, and how long to wait first: exponential backoff with full jitter,
`Retry-After` honoured.

Pure functions of the attempt number, the server's hint and a random source, so the policy is
tested without a server or a clock.
"""

from __future__ import annotations

import email.utils
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone

__all__ = ["RetryPolicy", "parse_retry_after"]


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed request is retried.

    `delay(attempt)` is *full jitter*: uniform in `[0, min(max_backoff, initial_backoff *
    multiplier ** (attempt - 1))]`. Spreading retries over the whole interval, rather than around
    its end, is what stops many producers that failed together from coming back together.

    When the gateway sent `Retry-After`, the wait is at least that long (the gateway computed
    it from how fast its Buffer drains), plus up to `retry_after_jitter` of it so producers
    told the same number do not all return in the same instant.
    """

    initial_backoff: float = 0.1
    max_backoff: float = 10.0
    multiplier: float = 2.0
    retry_after_jitter: float = 0.2
    #: Upper bound on an honoured `Retry-After`, against a misconfigured proxy's hours.
    max_retry_after: float = 120.0
    #: Attempts per request, the first included; `None`: until `delivery_timeout` or close.
    max_attempts: int | None = None
    #: Seconds a batch may spend being retried before it is reported failed; `None`: no limit.
    delivery_timeout: float | None = None
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError("need 0 < initial_backoff <= max_backoff")
        if self.multiplier < 1:
            raise ValueError("multiplier must be at least 1")
        if self.retry_after_jitter < 0 or self.max_retry_after <= 0:
            raise ValueError("retry_after_jitter must be >= 0 and max_retry_after > 0")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.delivery_timeout is not None and self.delivery_timeout <= 0:
            raise ValueError("delivery_timeout must be positive")

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the jittered wait after failed attempt number `attempt` (1-based)."""
        if attempt < 1:
            raise ValueError("attempt is 1-based")
        try:
            grown = self.initial_backoff * self.multiplier ** (attempt - 1)
        except OverflowError:
            return self.max_backoff
        return min(self.max_backoff, grown)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based) before the next one."""
        if retry_after is not None:
            hint = min(max(retry_after, 0.0), self.max_retry_after)
            return hint + self.rng.uniform(0.0, hint * self.retry_after_jitter)
        return self.rng.uniform(0.0, self.ceiling(attempt))

    def gives_up(self, attempts: int, elapsed: float, next_delay: float) -> bool:
        """Whether a batch that failed `attempts` times over `elapsed` seconds is given up,
        rather than retried after `next_delay`."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return True
        return self.delivery_timeout is not None and elapsed + next_delay > self.delivery_timeout


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a `Retry-After` header: delta-seconds, or an HTTP-date (RFC 9110 §10.2.3).

    `None` when absent or unreadable, so the caller falls back to its own backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    now = now if now is not None else datetime.now(timezone.utc)
    return max(0.0, (when - now).total_seconds())
