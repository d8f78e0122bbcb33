"""What became of each event and batch, read from the gateway's answers.

`POST /v1/events` answers `200 {"accepted": n, "duplicates": n, "rejected": [{"index", "field",
"error"}]}` (docs/ingestion.md). A request-level error is `{"error": code, "message": text}`.
This module turns either into one `EventResult` per event sent, without any I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BatchResult",
    "EventResult",
    "Progress",
    "Status",
    "batch_result_from_answer",
    "failed_batch_result",
]


class Status(enum.Enum):
    #: Written into ClickHouse by this batch.
    ACCEPTED = "accepted"
    #: Written before (an earlier attempt or request with the same id, or a batch at or below
    #: the committed producer offset); not written again.
    DUPLICATE = "duplicate"
    #: Accepted or duplicate: stored exactly once either way. The gateway's answer counts
    #: accepted events and duplicates but does not say which event is which, so when one batch
    #: has both, its events are reported as this.
    STORED = "stored"
    #: The gateway refused it for good: the event does not fit the schema (`field`, `reason`),
    #: or the whole request was refused with a final 4xx (`code`). Not stored.
    REJECTED = "rejected"
    #: Not delivered: retries ran out (`delivery_timeout`, `max_attempts`), the producer was
    #: closed first, or an earlier offset batch of the same partition failed. If any attempt
    #: reached the gateway the events may be stored; re-sending them with the same ids is safe.
    FAILED = "failed"

    @property
    def stored(self) -> bool:
        """Whether the event is in ClickHouse (exactly once)."""
        return self in (Status.ACCEPTED, Status.DUPLICATE, Status.STORED)


@dataclass(frozen=True)
class EventResult:
    status: Status
    #: The event's id (the one it carried, or the UUIDv7 the producer gave it).
    event_id: str | None
    #: Position of the event in its request.
    index: int
    #: The field that did not fit its column (`None`: the event as a whole, or not per field).
    field: str | None = None
    #: The gateway's reason, or why delivery failed.
    reason: str | None = None
    #: The gateway's error code for a request-level refusal (`body_too_large`, ...).
    code: str | None = None

    @property
    def ok(self) -> bool:
        return self.status.stored


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one request (a batch), with every event's result in request order."""

    events: tuple[EventResult, ...]
    accepted: int
    duplicates: int
    #: HTTP status of the final answer (0 when none came).
    http_status: int
    #: Requests sent for this batch, retries included.
    attempts: int
    #: The batch's `Idempotency-Key`, the same on every attempt.
    idempotency_key: str
    #: The answer was the stored answer of an earlier attempt (`Idempotent-Replayed: true`).
    replayed: bool = False
    partition: int | None = None
    offset: int | None = None
    #: Why the request as a whole was refused (a final 4xx) or not delivered; `None` when the
    #: gateway took it (its events may still be rejected one by one).
    error: str | None = None

    @property
    def rejected(self) -> tuple[EventResult, ...]:
        return tuple(e for e in self.events if e.status is Status.REJECTED)

    @property
    def failed(self) -> bool:
        """Whether the batch was not delivered (retries ran out, producer closed), as opposed
        to refused by the gateway."""
        return self.error is not None and not 400 <= self.http_status < 500

    @property
    def ok(self) -> bool:
        """Every event stored (an empty batch: its offset moved)."""
        return self.error is None and all(e.ok for e in self.events)


@dataclass
class Progress:
    """Counters of one producer, handed to the progress callback after each batch."""

    events_queued: int = 0
    events_accepted: int = 0
    events_duplicate: int = 0
    events_rejected: int = 0
    events_failed: int = 0
    batches_sent: int = 0
    requests: int = 0
    retries: int = 0
    #: Retries by reason: the gateway's error code (`buffer_saturated`, `request_in_flight`...),
    #: `http_<status>` without one, or the transport error's class name.
    retries_by_reason: dict[str, int] = field(default_factory=dict)
    #: Answers replayed from the gateway's idempotency store.
    replayed: int = 0
    #: Seconds spent waiting because the gateway said `Retry-After`.
    retry_after_waited: float = 0.0
    breaker_opened: int = 0
    in_flight: int = 0
    buffered_bytes: int = 0

    @property
    def events_done(self) -> int:
        return self.events_accepted + self.events_duplicate + self.events_rejected + self.events_failed

    def snapshot(self) -> Progress:
        copy = Progress(**{k: v for k, v in vars(self).items() if k != "retries_by_reason"})
        copy.retries_by_reason = dict(self.retries_by_reason)
        return copy


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def batch_result_from_answer(
    answer: Mapping[str, Any],
    event_ids: Sequence[str | None],
    *,
    http_status: int,
    attempts: int,
    idempotency_key: str,
    replayed: bool = False,
    partition: int | None = None,
    offset: int | None = None,
) -> BatchResult:
    """Per-event results from a success answer (`200 {"accepted", "duplicates", "rejected"}`)."""
    count = len(event_ids)
    accepted, duplicates = _int(answer.get("accepted")), _int(answer.get("duplicates"))
    rejected: dict[int, tuple[str | None, str]] = {}
    raw_rejected = answer.get("rejected")
    if isinstance(raw_rejected, list):
        for item in raw_rejected:
            if not isinstance(item, Mapping):
                continue
            index = item.get("index")
            if isinstance(index, int) and 0 <= index < count:
                field_name = item.get("field")
                rejected[index] = (
                    field_name if isinstance(field_name, str) else None,
                    str(item.get("error", "")),
                )
    if duplicates == 0:
        stored = Status.ACCEPTED
    elif accepted == 0:
        stored = Status.DUPLICATE
    else:
        stored = Status.STORED
    events = []
    for index, event_id in enumerate(event_ids):
        if index in rejected:
            field_name, reason = rejected[index]
            events.append(EventResult(Status.REJECTED, event_id, index, field_name, reason))
        else:
            events.append(EventResult(stored, event_id, index))
    return BatchResult(
        events=tuple(events),
        accepted=accepted,
        duplicates=duplicates,
        http_status=http_status,
        attempts=attempts,
        idempotency_key=idempotency_key,
        replayed=replayed,
        partition=partition,
        offset=offset,
    )


def failed_batch_result(
    event_ids: Sequence[str | None],
    status: Status,
    *,
    reason: str,
    code: str | None = None,
    http_status: int = 0,
    attempts: int = 0,
    idempotency_key: str,
    partition: int | None = None,
    offset: int | None = None,
) -> BatchResult:
    """Every event of a batch refused (`REJECTED`, final 4xx) or not delivered (`FAILED`)."""
    events = tuple(EventResult(status, event_id, index, None, reason, code) for index, event_id in enumerate(event_ids))
    return BatchResult(
        events=events,
        accepted=0,
        duplicates=0,
        http_status=http_status,
        attempts=attempts,
        idempotency_key=idempotency_key,
        partition=partition,
        offset=offset,
        error=reason,
    )
