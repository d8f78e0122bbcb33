"""The producer against a scripted gateway (httpx.MockTransport): batching, retries of the
same bytes under the same key, concurrency and memory bounds, offsets, the breaker, closing.
No server; each test runs in well under a second unless it waits out a Retry-After."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from buffergate import CircuitBreaker, Producer, ProducerClosedError, RetryPolicy, Status, SyncProducer

FAST = RetryPolicy(initial_backoff=0.001, max_backoff=0.01)
URL = "http://gateway.test"


@dataclass
class Seen:
    """One request as the scripted gateway received it."""

    at: float
    key: str
    body: bytes
    events: list[object]
    headers: httpx.Headers


@dataclass
class Gateway:
    """Answers each request with `script(seen, n)`, where n counts the requests of its key."""

    script: Callable[[Seen, int], Awaitable[httpx.Response]] | None = None
    seen: list[Seen] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"producer_id": "p", "partitions": {"0": 41, "3": 7}})
        body = request.content
        raw = gzip.decompress(body) if request.headers.get("content-encoding") == "gzip" else body
        seen = Seen(time.monotonic(), request.headers["idempotency-key"], body, json.loads(raw), request.headers)
        self.seen.append(seen)
        attempt = sum(1 for s in self.seen if s.key == seen.key)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.script is not None:
                return await self.script(seen, attempt)
            return accept(seen)
        finally:
            self.in_flight -= 1

    def producer(self, **options: object) -> Producer:
        options.setdefault("retry", FAST)
        return Producer(URL, transport=httpx.MockTransport(self.handle), **options)  # type: ignore[arg-type]


def accept(seen: Seen) -> httpx.Response:
    return httpx.Response(200, json={"accepted": len(seen.events), "duplicates": 0, "rejected": []})


def unavailable(code: str, retry_after: int | None = None) -> httpx.Response:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
    return httpx.Response(503, json={"error": code, "message": code}, headers=headers)


async def test_events_are_batched_by_count_with_ids_in_order() -> None:
    gateway = Gateway()
    async with gateway.producer(max_batch_events=1000, linger=0.05) as producer:
        futures = [await producer.send({"user_id": i}) for i in range(2500)]
    assert [len(s.events) for s in gateway.seen] == [1000, 1000, 500]
    sent = [e for s in gateway.seen for e in s.events]
    assert [e["user_id"] for e in sent] == list(range(2500))  # type: ignore[index]
    results = [f.result() for f in futures]
    assert all(r.status is Status.ACCEPTED for r in results)
    assert [r.event_id for r in results] == [e["event_id"] for e in sent]  # type: ignore[index]
    assert len({r.event_id for r in results}) == 2500
    assert len({s.key for s in gateway.seen}) == 3, "one Idempotency-Key per batch"


async def test_batches_are_cut_by_bytes_and_linger() -> None:
    gateway = Gateway()
    async with gateway.producer(max_batch_bytes=10_000, linger=0.05) as producer:
        for i in range(30):
            await producer.send({"user_id": i, "payload": "x" * 900})
        await producer.flush()
        assert all(len(s.body) < 10_000 for s in gateway.seen)
        assert sum(len(s.events) for s in gateway.seen) == 30
        before = len(gateway.seen)
        started = time.monotonic()
        future = await producer.send({"user_id": 99})
        await future
        assert time.monotonic() - started >= 0.04, "a lone event waits for the linger"
        assert len(gateway.seen) == before + 1


async def test_a_retry_sends_the_same_bytes_under_the_same_key() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        if attempt == 1:
            return unavailable("flush_failed", retry_after=0)
        if attempt == 2:
            # The request went out and the connection was reset before any answer.
            raise httpx.ReadError("connection reset by peer")
        if attempt == 3:
            return httpx.Response(502, text="<html>bad gateway</html>")
        return accept(seen)

    gateway = Gateway(script)
    async with gateway.producer() as producer:
        futures = [await producer.send({"user_id": i}) for i in range(10)]
    assert len(gateway.seen) == 4
    assert len({s.key for s in gateway.seen}) == 1
    assert len({s.body for s in gateway.seen}) == 1, "byte-identical, never re-batched"
    assert all(f.result().status is Status.ACCEPTED for f in futures)
    stats = producer.stats
    assert stats.retries == 3
    assert stats.retries_by_reason == {"flush_failed": 1, "ReadError": 1, "http_502": 1}


async def test_request_in_flight_is_asked_again_and_the_replay_counts() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        if attempt <= 2:
            return httpx.Response(409, json={"error": "request_in_flight", "message": "wait"})
        response = accept(seen)
        response.headers["idempotent-replayed"] = "true"
        return response

    gateway = Gateway(script)
    async with gateway.producer() as producer:
        batch = await producer.send_batch([{"user_id": 1}, {"user_id": 2}])
        result = await batch
    assert result.replayed
    assert result.attempts == 3
    assert [e.status for e in result.events] == [Status.ACCEPTED, Status.ACCEPTED]
    assert producer.stats.replayed == 1


async def test_final_4xx_is_reported_per_event_and_not_retried() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        return httpx.Response(413, json={"error": "too_many_events", "message": "over 2 events"})

    gateway = Gateway(script)
    async with gateway.producer() as producer:
        result = await (await producer.send_batch([{"a": 1}, {"a": 2}, {"a": 3}]))
    assert len(gateway.seen) == 1
    assert [(e.status, e.code) for e in result.events] == [(Status.REJECTED, "too_many_events")] * 3
    assert result.events[0].reason == "over 2 events"
    assert producer.stats.events_rejected == 3


async def test_a_200_that_is_not_the_gateways_answer_is_not_taken_for_stored() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        return httpx.Response(200, text="<html>welcome</html>")

    gateway = Gateway(script)
    async with gateway.producer() as producer:
        result = await (await producer.send_batch([{"a": 1}, {"a": 2}]))
    assert [e.status for e in result.events] == [Status.FAILED, Status.FAILED]
    assert "unexpected 200 answer" in (result.events[0].reason or "")
    assert producer.stats.events_failed == 2
    assert producer.stats.events_accepted == 0


async def test_at_most_max_in_flight_requests() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        await asyncio.sleep(0.02)
        return accept(seen)

    gateway = Gateway(script)
    async with gateway.producer(max_in_flight=3, max_batch_events=10, linger=0) as producer:
        for i in range(400):
            await producer.send({"i": i})
    assert gateway.max_in_flight == 3
    assert sum(len(s.events) for s in gateway.seen) == 400


async def test_a_busy_producer_fills_its_batches_instead_of_sending_small_ones() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        await asyncio.sleep(0.05)
        return accept(seen)

    gateway = Gateway(script)
    async with gateway.producer(max_in_flight=1, max_batch_events=500, linger=0.001) as producer:
        for i in range(2000):
            await producer.send({"i": i})
            if i % 50 == 0:
                await asyncio.sleep(0.002)
    sizes = [len(s.events) for s in gateway.seen]
    assert sum(sizes) == 2000
    assert len(sizes) < 20, f"batches grow while the request slot is busy: {sizes}"


async def test_a_full_buffer_makes_send_wait_and_drops_nothing() -> None:
    release = asyncio.Event()

    async def script(seen: Seen, attempt: int) -> httpx.Response:
        await release.wait()
        return accept(seen)

    gateway = Gateway(script)
    event = {"payload": "x" * 1000}
    async with gateway.producer(max_buffer_bytes=20_000, max_batch_events=5, linger=0) as producer:
        sent = 0

        async def sender() -> None:
            nonlocal sent
            for _ in range(100):
                await producer.send(event)
                sent += 1

        task = asyncio.create_task(sender())
        await asyncio.sleep(0.2)
        assert 15 <= sent <= 20, f"send waits once ~20 KB are buffered: {sent}"
        assert producer.stats.buffered_bytes <= 20_000
        release.set()
        await asyncio.wait_for(task, 5)
    assert sent == 100
    assert sum(len(s.events) for s in gateway.seen) == 100
    assert producer.stats.events_accepted == 100


async def test_offset_batches_of_a_partition_go_one_at_a_time_in_order() -> None:
    active: dict[str, int] = {}
    overlap: list[str] = []

    async def script(seen: Seen, attempt: int) -> httpx.Response:
        partition = seen.headers["x-producer-partition"]
        active[partition] = active.get(partition, 0) + 1
        if active[partition] > 1:
            overlap.append(partition)
        try:
            await asyncio.sleep(0.01)
            if attempt == 1 and seen.headers["x-producer-offset"] == "20":
                return unavailable("flush_failed", retry_after=0)
            return accept(seen)
        finally:
            active[partition] -= 1

    gateway = Gateway(script)
    async with gateway.producer(producer_id="etl", max_in_flight=4) as producer:
        futures = []
        for offset in range(10, 60, 10):
            for partition in (0, 1):
                events = [{"n": n} for n in range(offset - 9, offset + 1)]
                futures.append(await producer.send_batch(events, partition=partition, offset=offset))
        results = [await f for f in futures]
    assert not overlap, "never two batches of one partition at once"
    assert gateway.max_in_flight == 2, "partitions go side by side"
    for label in ("0", "1"):
        offsets = [s.headers["x-producer-offset"] for s in gateway.seen if s.headers["x-producer-partition"] == label]
        assert offsets == ["10", "20", "20", "30", "40", "50"], "the retry of 20 goes before 30"
    assert all(s.headers["x-producer-id"] == "etl" for s in gateway.seen)
    assert all(r.ok for r in results)


async def test_a_failed_offset_batch_stops_its_partition_so_no_offset_skips_it() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        if seen.headers["x-producer-partition"] == "0" and seen.headers["x-producer-offset"] == "1":
            return httpx.Response(413, json={"error": "body_too_large", "message": "too big"})
        return accept(seen)

    gateway = Gateway(script)
    async with gateway.producer(producer_id="etl") as producer:
        first = await producer.send_batch([{"n": 1}], partition=0, offset=1)
        second = await producer.send_batch([{"n": 2}], partition=0, offset=2)
        other = await producer.send_batch([{"n": 1}], partition=1, offset=1)
        results = [await first, await second, await other]
    assert results[0].events[0].status is Status.REJECTED
    assert results[1].events[0].status is Status.FAILED
    assert "partition 0 (offset 1) failed" in (results[1].events[0].reason or "")
    assert results[2].ok
    assert [s.headers["x-producer-offset"] for s in gateway.seen if s.headers["x-producer-partition"] == "0"] == ["1"]


async def test_send_batch_checks_what_the_gateway_would_refuse_or_ignore() -> None:
    gateway = Gateway()
    async with gateway.producer(producer_id="etl", max_request_events=5, max_batch_events=5) as producer:
        await producer.send_batch([{"n": 1}], offset=10)
        with pytest.raises(ValueError, match="not above 10"):
            await producer.send_batch([{"n": 1}], offset=10)
        with pytest.raises(ValueError, match="max_request_events"):
            await producer.send_batch([{"n": i} for i in range(6)], partition=1, offset=1)
        with pytest.raises(ValueError, match="only meaningful with an offset"):
            await producer.send_batch([{"n": 1}], partition=1)
        with pytest.raises(ValueError, match="empty batch"):
            await producer.send_batch([])
        with pytest.raises(ValueError, match="not valid JSON"):
            await producer.send({"x": float("nan")})
    async with gateway.producer() as anonymous:
        with pytest.raises(ValueError, match="producer_id"):
            await anonymous.send_batch([{"n": 1}], offset=1)
        with pytest.raises(ValueError, match="producer_id"):
            await anonymous.committed_offset()


async def test_committed_offsets_are_read_by_partition() -> None:
    gateway = Gateway()
    async with gateway.producer(producer_id="etl/1") as producer:
        assert await producer.committed_offsets() == {0: 41, 3: 7}
        assert await producer.committed_offset(0) == 41
        assert await producer.committed_offset(1) is None


async def test_the_breaker_holds_requests_back_while_the_gateway_is_down() -> None:
    down_until = time.monotonic() + 0.6

    async def script(seen: Seen, attempt: int) -> httpx.Response:
        if time.monotonic() < down_until:
            raise httpx.ConnectError("connection refused")
        return accept(seen)

    gateway = Gateway(script)
    breaker = CircuitBreaker(failure_threshold=3, open_for=0.2, max_open_for=0.4)
    async with gateway.producer(breaker=breaker, max_in_flight=8, max_batch_events=1, linger=0) as producer:
        futures = [await producer.send({"i": i}) for i in range(8)]
        results = [await f for f in futures]
    assert all(r.ok for r in results)
    failed = [s for s in gateway.seen if s.at < down_until]
    # Without the breaker, 8 batches retrying every ≤10 ms would make hundreds of attempts.
    assert len(failed) < 20, len(failed)
    assert producer.stats.breaker_opened >= 1


async def test_a_fleet_wide_retry_after_holds_back_every_batch() -> None:
    told_at: list[float] = []

    async def script(seen: Seen, attempt: int) -> httpx.Response:
        if not told_at:
            told_at.append(time.monotonic())
            return unavailable("buffer_saturated", retry_after=1)
        return accept(seen)

    gateway = Gateway(script)
    async with gateway.producer(max_batch_events=1, linger=0, max_in_flight=4) as producer:
        first = await producer.send({"i": 0})
        await asyncio.sleep(0.05)
        later = [await producer.send({"i": i}) for i in range(1, 4)]
        await asyncio.gather(first, *later)
    assert all(s.at >= told_at[0] + 1.0 for s in gateway.seen[1:]), "nobody comes back before Retry-After"
    assert producer.stats.retry_after_waited >= 1.0


async def test_delivery_timeout_reports_failed() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        return unavailable("flush_failed")

    gateway = Gateway(script)
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, delivery_timeout=0.2)
    breaker = CircuitBreaker(failure_threshold=1000)
    async with gateway.producer(retry=policy, breaker=breaker) as producer:
        result = await (await producer.send({"i": 1}))
    assert result.status is Status.FAILED
    assert "flush_failed" in (result.reason or "")
    assert producer.stats.events_failed == 1


async def test_an_undelivered_empty_offset_batch_also_stops_its_partition() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        return unavailable("idempotency_unavailable")

    gateway = Gateway(script)
    policy = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, max_attempts=2)
    async with gateway.producer(producer_id="etl", retry=policy) as producer:
        empty = await (await producer.send_batch([], offset=5))
        after = await (await producer.send_batch([{"n": 6}], offset=6))
    assert empty.failed
    assert not empty.ok
    assert "idempotency_unavailable" in (empty.error or "")
    assert after.events[0].status is Status.FAILED
    assert len(gateway.seen) == 2, "the later batch was not sent"


async def test_close_with_a_timeout_reports_what_was_not_delivered() -> None:
    async def script(seen: Seen, attempt: int) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    gateway = Gateway(script)
    producer = gateway.producer()
    future = await producer.send({"i": 1})
    started = time.monotonic()
    await producer.close(timeout=0.3)
    assert time.monotonic() - started < 1.0
    assert future.result().status is Status.FAILED
    with pytest.raises(ProducerClosedError):
        await producer.send({"i": 2})


async def test_the_progress_callback_sees_every_batch() -> None:
    seen: list[int] = []
    gateway = Gateway()
    async with gateway.producer(max_batch_events=10, on_progress=lambda p: seen.append(p.events_done)) as producer:
        for i in range(35):
            await producer.send({"i": i})
    assert seen[-1] == 35
    assert seen == sorted(seen)


def test_the_sync_facade() -> None:
    gateway = Gateway()
    with SyncProducer(URL, transport=httpx.MockTransport(gateway.handle), producer_id="script") as producer:
        futures = [producer.send({"i": i}) for i in range(20)]
        batch = producer.send_batch([{"i": 100}], offset=5)
        producer.flush()
        assert all(f.result(timeout=1).status is Status.ACCEPTED for f in futures)
        assert batch.result(timeout=1).ok
        assert producer.committed_offset(3) == 7
        assert producer.stats.events_accepted == 21
    assert sum(len(s.events) for s in gateway.seen) == 21


async def test_zstd_bodies() -> None:
    import zstandard

    bodies: list[bytes] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-encoding"] == "zstd"
        events = json.loads(zstandard.ZstdDecompressor().decompress(request.content))
        bodies.append(request.content)
        return httpx.Response(200, json={"accepted": len(events), "duplicates": 0, "rejected": []})

    async with Producer(URL, compression="zstd", transport=httpx.MockTransport(handle)) as producer:
        result = await (await producer.send_batch([{"i": i} for i in range(100)]))
    assert result.accepted == 100
    assert len(bodies) == 1
