"""Producer library for buffergate, the HTTP ingestion gateway for ClickHouse.

`Producer` (asyncio) and `SyncProducer` (blocking) batch events, send them to
`POST /v1/events` and retry without losing or doubling any; see the package README.
"""

from ._version import __version__
from .backoff import RetryPolicy
from .breaker import BreakerState, CircuitBreaker
from .ids import uuid7
from .producer import Producer, ProducerClosedError
from .results import BatchResult, EventResult, Progress, Status
from .sync import SyncProducer

__all__ = [
    "BatchResult",
    "BreakerState",
    "CircuitBreaker",
    "EventResult",
    "Producer",
    "ProducerClosedError",
    "Progress",
    "RetryPolicy",
    "Status",
    "SyncProducer",
    "__version__",
    "uuid7",
]
