"""The pure parts, without a server: backoff, Retry-After, the breaker, ids, batching and the
reading of the gateway's answers."""

from __future__ import annotations

import gzip
import json
import os
import random
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from buffergate import BreakerState, CircuitBreaker, RetryPolicy, Status
from buffergate.backoff import parse_retry_after
from buffergate.batching import Accumulator, compress, decompress, encode_event, join_body
from buffergate.ids import _Generator, uuid7_str
from buffergate.producer import retryable_status
from buffergate.results import batch_result_from_answer, failed_batch_result

# -- backoff ---------------------------------------------------------------------------------


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=2.0, rng=random.Random(7))
    assert [policy.ceiling(a) for a in range(1, 8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    for attempt in range(1, 12):
        delays = [policy.delay(attempt) for _ in range(500)]
        assert all(0 <= d <= policy.ceiling(attempt) for d in delays)
        # Full jitter: spread over the whole interval, not bunched near its end.
        assert min(delays) < policy.ceiling(attempt) * 0.1
        assert max(delays) > policy.ceiling(attempt) * 0.9


def test_the_ceiling_never_overflows() -> None:
    policy = RetryPolicy(initial_backoff=0.5, max_backoff=30.0, multiplier=1e10)
    assert policy.ceiling(10_000) == 30.0


def test_retry_after_is_a_floor_with_bounded_jitter() -> None:
    policy = RetryPolicy(retry_after_jitter=0.2, rng=random.Random(1))
    delays = [policy.delay(1, retry_after=3.0) for _ in range(500)]
    assert all(3.0 <= d <= 3.6 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100, "jittered, not all the same"
    assert policy.delay(40, retry_after=5000.0) <= policy.max_retry_after * 1.2


def test_giving_up_by_attempts_or_delivery_timeout() -> None:
    unlimited = RetryPolicy()
    assert not unlimited.gives_up(attempts=10_000, elapsed=1e9, next_delay=10.0)
    by_attempts = RetryPolicy(max_attempts=3)
    assert not by_attempts.gives_up(2, 0.0, 1.0)
    assert by_attempts.gives_up(3, 0.0, 1.0)
    by_time = RetryPolicy(delivery_timeout=10.0)
    assert not by_time.gives_up(5, 8.0, 1.5)
    assert by_time.gives_up(5, 8.0, 2.5), "a retry that would start past the timeout is not made"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_backoff": 0.0}, "initial_backoff"),
        ({"initial_backoff": 5.0, "max_backoff": 1.0}, "initial_backoff"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"max_attempts": 0}, "max_attempts"),
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_which_error_answers_are_retried() -> None:
    assert [s for s in (400, 401, 403, 404, 408, 409, 413, 415, 422, 429) if retryable_status(s)] == [408, 409, 429]
    assert all(retryable_status(s) for s in (500, 502, 503, 504))


def test_retry_after_header_forms() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 30 ") == 30.0
    assert parse_retry_after("Wed, 01 May 2024 12:00:05 GMT", now) == 5.0
    assert parse_retry_after("Wed, 01 May 2024 11:00:00 GMT", now) == 0.0, "a date in the past: now"
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-3") is None


# -- breaker ---------------------------------------------------------------------------------


def state(breaker: CircuitBreaker) -> BreakerState:
    # A call, so the type checker does not carry one comparison's narrowing to the next.
    return breaker.state


def test_breaker_opens_after_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failure_threshold=3, open_for=1.0)
    for now in (0.0, 0.1):
        assert breaker.try_acquire(now)
        assert not breaker.record_failure(now)
    breaker.record_success()  # a success resets the count
    for now in (0.2, 0.3):
        assert not breaker.record_failure(now)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.record_failure(0.4), "the third failure in a row opens it"
    assert state(breaker) is BreakerState.OPEN
    assert breaker.retry_at() == pytest.approx(1.4)
    assert not breaker.try_acquire(1.0)


def test_breaker_lets_one_probe_through_and_closes_on_its_success() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for=1.0)
    breaker.record_failure(0.0)
    assert not breaker.try_acquire(0.5)
    assert breaker.try_acquire(1.0), "the probe"
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.try_acquire(1.0), "only one probe at a time"
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert all(breaker.try_acquire(1.1) for _ in range(10))


def test_a_failed_probe_reopens_for_twice_as_long_up_to_the_maximum() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for=1.0, max_open_for=3.0)
    breaker.record_failure(0.0)
    now, open_times = 0.0, []
    for _ in range(4):
        retry_at = breaker.retry_at()
        assert retry_at is not None
        open_times.append(retry_at - now)
        now = retry_at
        assert breaker.try_acquire(now)
        assert breaker.record_failure(now)
    assert open_times == [1.0, 2.0, 3.0, 3.0]
    # A success after all that starts again from open_for.
    assert breaker.try_acquire(now + 3.0)
    breaker.record_success()
    breaker.record_failure(10.0)
    assert breaker.retry_at() == pytest.approx(11.0)


def test_an_abandoned_probe_lets_another_request_probe() -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for=1.0)
    breaker.record_failure(0.0)
    assert breaker.try_acquire(2.0)
    breaker.release()
    assert breaker.try_acquire(2.0)


def test_failures_of_requests_sent_before_it_opened_do_not_extend_it() -> None:
    breaker = CircuitBreaker(failure_threshold=2, open_for=1.0)
    breaker.record_failure(0.0)
    assert breaker.record_failure(0.0)
    assert not breaker.record_failure(0.5)
    assert breaker.retry_at() == pytest.approx(1.0)


# -- ids -------------------------------------------------------------------------------------


def test_uuid7_layout_and_order() -> None:
    clock = iter([1_700_000_000_000_000_000 + i * 1_000 for i in range(10_000)])  # 1 µs apart
    generate = _Generator(clock=lambda: next(clock))
    ids = [generate() for _ in range(5000)]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert ids == sorted(ids, key=lambda u: u.bytes), "time-ordered, also within a millisecond"
    assert len(set(ids)) == len(ids)
    assert ids[0].int >> 80 == 1_700_000_000_000


def test_uuid7_stays_ordered_when_the_clock_steps_back() -> None:
    times = iter([5_000_000_000, 5_000_000_000, 4_000_000_000, 4_000_000_000])
    generate = _Generator(clock=lambda: next(times))
    ids = [generate() for _ in range(4)]
    assert ids == sorted(ids, key=lambda u: u.bytes)


def test_uuid7_counter_overflow_borrows_the_next_millisecond() -> None:
    generate = _Generator(clock=lambda: 1_000_000_000_000)
    ids = [generate() for _ in range(10_000)]
    assert ids == sorted(ids, key=lambda u: u.bytes)
    assert ids[-1].int >> 80 > ids[0].int >> 80


def test_uuid7_text_is_the_canonical_form() -> None:
    text = uuid7_str()
    parsed = uuid.UUID(text)
    assert str(parsed) == text
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    reader, writer = os.pipe()
    uuid7_str()  # the generator's state exists before the fork
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave without running pytest's teardown
        os.write(writer, "\n".join(uuid7_str() for _ in range(100)).encode())
        os._exit(0)
    os.close(writer)
    ours = {uuid7_str() for _ in range(100)}
    with os.fdopen(reader) as pipe:
        theirs = set(pipe.read().split())
    os.waitpid(pid, 0)
    assert len(theirs) == 100
    assert not ours & theirs
    assert {t[19:] for t in theirs}.isdisjoint({o[19:] for o in ours}), "the random parts differ too"


# -- batching --------------------------------------------------------------------------------


def test_events_get_an_id_unless_they_have_one() -> None:
    event = {"user_id": 1}
    data, event_id = encode_event(event, "event_id")
    assert event == {"user_id": 1}, "the caller's event is not modified"
    assert event_id is not None
    assert uuid.UUID(event_id).version == 7
    assert json.loads(data) == {"user_id": 1, "event_id": event_id}
    given = "018f2b6e-1d2c-7a3b-9c4d-5e6f708192a3"
    assert encode_event({"event_id": given}, "event_id")[1] == given
    assert encode_event({"event_id": None}, "event_id")[1] != given, "null is missing"
    assert encode_event({"user_id": 1}, None) == (b'{"user_id":1}', None)
    assert encode_event([1, 2], "event_id") == (b"[1,2]", None), "not an object: sent as is, for the gateway to reject"


def test_encoding_is_compact_utf8_and_knows_common_types() -> None:
    data, _ = encode_event(
        {
            "s": "é\u2028",
            "ts": datetime(2024, 5, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
            "d": Decimal("12.50"),
            "u": uuid.UUID(int=1),
            "tags": ("a", "b"),
        },
        None,
    )
    assert (
        data
        == (
            '{"s":"é\u2028","ts":"2024-05-01T12:00:00+02:00","d":"12.50",'
            '"u":"00000000-0000-0000-0000-000000000001","tags":["a","b"]}'
        ).encode()
    )


@pytest.mark.parametrize("bad", [{"x": float("nan")}, {"x": float("inf")}, {"x": object()}, {"x": "\ud800"}])
def test_what_is_not_json_is_refused_alone(bad: dict[str, object]) -> None:
    with pytest.raises((TypeError, ValueError)):
        encode_event(bad, None)


def test_accumulator_seals_by_count_and_by_bytes() -> None:
    by_count = Accumulator(max_events=3, max_bytes=1000)
    assert [by_count.add(b"{}") for _ in range(3)] == [False, False, True]
    assert join_body(by_count.take()) == b"[{},{},{}]"
    assert len(by_count) == 0
    by_bytes = Accumulator(max_events=100, max_bytes=20)
    assert not by_bytes.add(b'{"a":1}')  # [x] = 9 bytes
    assert not by_bytes.would_overflow(len(b'{"a":2}')), "[x,y] = 17 bytes"
    assert not by_bytes.add(b'{"a":2}')
    assert by_bytes.would_overflow(len(b'{"a":3}')), "25 bytes would be over"
    items = by_bytes.take()
    assert len(join_body(items)) == 17
    assert not Accumulator(1, 20).would_overflow(10_000), "an empty batch takes any event"


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_compression_round_trips_and_is_deterministic(compression: str) -> None:
    raw = join_body([encode_event({"user_id": i, "event_id": str(i)}, None)[0] for i in range(1000)])
    body = compress(raw, compression)  # type: ignore[arg-type]
    assert body == compress(raw, compression), "the same batch is the same bytes"  # type: ignore[arg-type]
    assert decompress(body, compression) == raw  # type: ignore[arg-type]
    if compression != "none":
        assert len(body) < len(raw) / 3
    if compression == "gzip":
        assert gzip.decompress(body) == raw


# -- answers ---------------------------------------------------------------------------------


def test_answer_with_rejections_maps_to_each_event() -> None:
    answer = {"accepted": 2, "duplicates": 0, "rejected": [{"index": 1, "field": "user_id", "error": "out of range"}]}
    result = batch_result_from_answer(answer, ["a", "b", "c"], http_status=200, attempts=1, idempotency_key="k")
    assert [e.status for e in result.events] == [Status.ACCEPTED, Status.REJECTED, Status.ACCEPTED]
    assert result.events[1].field == "user_id"
    assert result.events[1].reason == "out of range"
    assert not result.ok
    assert result.rejected == (result.events[1],)


def test_duplicates_and_mixed_answers() -> None:
    def statuses(answer: dict[str, object]) -> list[Status]:
        result = batch_result_from_answer(answer, ["a", "b"], http_status=200, attempts=2, idempotency_key="k")
        assert result.ok
        return [e.status for e in result.events]

    assert statuses({"accepted": 0, "duplicates": 2, "rejected": []}) == [Status.DUPLICATE] * 2
    # The gateway counts both kinds without saying which event is which.
    assert statuses({"accepted": 1, "duplicates": 1, "rejected": []}) == [Status.STORED] * 2


def test_final_refusal_marks_every_event() -> None:
    result = failed_batch_result(
        ["a", None],
        Status.REJECTED,
        reason="too big",
        code="body_too_large",
        http_status=413,
        idempotency_key="k",
    )
    assert [(e.status, e.code, e.index) for e in result.events] == [
        (Status.REJECTED, "body_too_large", 0),
        (Status.REJECTED, "body_too_large", 1),
    ]
    assert not Status.REJECTED.stored
    assert Status.STORED.stored
