"""The producer against a real gateway, ClickHouse and Redis: every event stored exactly once
through volume, load shedding, gateway restarts and lost answers; bad events refused alone."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from buffergate import CircuitBreaker, Producer, RetryPolicy, Status, SyncProducer
from conftest import MakeGateway
from harness import ClickHouse, Gateway
from proxy import ResettingProxy, StallingProxy

RETRY = RetryPolicy(initial_backoff=0.05, max_backoff=1.0)


def stored(gateway: Gateway, where: str = "1") -> tuple[int, int]:
    """(rows, distinct event ids) in the destination, after draining the Buffer."""
    gateway.drain()
    rows, ids = gateway.clickhouse.scalars(f"SELECT count(), uniqExact(event_id) FROM {gateway.table()} WHERE {where}")
    return rows, ids


async def send_all(
    producer: Producer, events: Iterator[dict[str, object]], *, per_second: float | None = None
) -> list[str | None]:
    """Sends every event (at most `per_second` of them a second) and returns their ids once
    each is stored; fails on any other result."""
    futures = []
    started = time.monotonic()
    for n, event in enumerate(events):
        futures.append(await producer.send(event))
        if per_second is not None and (ahead := n / per_second - (time.monotonic() - started)) > 0:
            await asyncio.sleep(ahead)
    results = await asyncio.gather(*futures)
    bad = [r for r in results if not r.ok]
    assert not bad, bad[:3]
    return [r.event_id for r in results]


def events(count: int, start: int = 0, payload: str = "") -> Iterator[dict[str, object]]:
    for i in range(start, start + count):
        yield {"user_id": i, "event_type": "click", "payload": {"n": i, "pad": payload}}


async def test_fifty_thousand_events_are_stored_exactly_once(make_gateway: MakeGateway) -> None:
    gateway = make_gateway()
    started = time.monotonic()
    async with Producer(gateway.url, max_batch_events=2000, max_in_flight=4, retry=RETRY) as producer:
        ids = await send_all(producer, events(50_000))
    elapsed = time.monotonic() - started
    assert stored(gateway) == (50_000, 50_000)
    rows = gateway.clickhouse.query(f"SELECT toString(event_id) FROM {gateway.table()} FORMAT TabSeparated").split()
    assert set(rows) == set(ids), "the very ids the producer gave the events"
    stats = producer.stats
    assert stats.events_accepted == 50_000
    assert stats.batches_sent == 25
    print(f"50,000 events in {elapsed:.1f} s ({50_000 / elapsed:,.0f}/s) over {stats.requests} requests")


@dataclass
class Attempt:
    sent: float
    answered: float
    key: str
    status: int
    retry_after: float | None


class Recording(httpx.AsyncBaseTransport):
    """Forwards to the network and records every attempt's timing and answer."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.attempts: list[Attempt] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        sent = time.monotonic()
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TransportError:
            self.attempts.append(Attempt(sent, time.monotonic(), request.headers.get("idempotency-key", ""), 0, None))
            raise
        header = response.headers.get("retry-after")
        self.attempts.append(
            Attempt(
                sent,
                time.monotonic(),
                request.headers.get("idempotency-key", ""),
                response.status_code,
                float(header) if header else None,
            )
        )
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_saturated_buffer_slows_the_producer_down_and_loses_nothing(make_gateway: MakeGateway) -> None:
    # 18.16 reports Buffer bytes server-wide: the saturated Buffer gets a server of its own.
    clickhouse = ClickHouse("clickhouse-shed")
    try:
        gateway = make_gateway(
            {
                # One layer that never flushes by itself (hour-long times, 1 MB max_bytes), as in
                # tests/shedding.rs; shedding at 80% of it, polled every 100 ms.
                "buffer_num_layers": 1,
                "buffer_min_time": 3600,
                "buffer_max_time": 3600,
                "buffer_min_rows": 10_000_000,
                "buffer_max_rows": 100_000_000,
                "buffer_min_bytes": 500_000,
                "buffer_max_bytes": 1_000_000,
                "flush_max_bytes": 200_000,
                "shed_poll_interval_ms": 100,
                "shed_retry_after_max_s": 2,
            },
            on=clickhouse,
        )
        recording = Recording()
        total = 3000  # ~3 MB of rows: three times what the Buffer holds
        async with Producer(
            gateway.url, max_batch_events=50, max_in_flight=2, retry=RETRY, transport=recording
        ) as producer:
            # At ~1 MB/s the 100 ms poller sees the fill pass 80% (800 kB) before it reaches the
            # layer's 1 MB max_bytes, at which ClickHouse would flush the Buffer by itself.
            sender = asyncio.create_task(send_all(producer, events(total, payload="x" * 900), per_second=1000))
            # The operator's side: once the gateway sheds, drain the Buffer now and then.
            while not producer.stats.retries_by_reason.get("buffer_saturated"):
                assert not sender.done(), "the Buffer never saturated"
                await asyncio.sleep(0.05)
            while not sender.done():
                await asyncio.sleep(1.0)
                await clickhouse.aquery(f"OPTIMIZE TABLE {gateway.table('events_buffer')}")
            ids = await sender
        assert len(set(ids)) == total
        assert stored(gateway) == (total, total), "nothing lost, nothing twice"

        shed = [a for a in recording.attempts if a.status == 503]
        assert shed, "the gateway shed"
        assert all(a.retry_after is not None and 1 <= a.retry_after <= 2 for a in shed)
        for answer in shed:
            assert answer.retry_after is not None
            # The batch told to wait is resent no sooner than Retry-After...
            retry = next(a for a in recording.attempts if a.key == answer.key and a.sent > answer.answered)
            assert retry.sent >= answer.answered + answer.retry_after - 0.01
            # ...and, the Buffer being full for everyone, no other batch starts in between.
            early = [
                a
                for a in recording.attempts
                if answer.answered + 0.05 < a.sent < answer.answered + answer.retry_after - 0.01
            ]
            assert not early, (answer, early)
        assert producer.stats.retry_after_waited >= sum(a.retry_after or 0 for a in shed) * 0.5
        print(f"{len(shed)} answers 503 over {len(recording.attempts)} attempts; {producer.stats}")
    finally:
        clickhouse.stop()


async def test_a_gateway_restarted_mid_stream_stores_every_event_once(make_gateway: MakeGateway) -> None:
    gateway = make_gateway({"dedup_lease_ms": 3000, "dedup_pending_wait_ms": 1000})
    total = 30_000
    breaker = CircuitBreaker(failure_threshold=3, open_for=0.2, max_open_for=1.0)
    async with Producer(gateway.url, max_batch_events=250, max_in_flight=4, retry=RETRY, breaker=breaker) as producer:
        sender = asyncio.create_task(send_all(producer, events(total)))
        for threshold in (total // 4, total // 2):
            while producer.stats.events_accepted < threshold:
                assert not sender.done()
                await asyncio.sleep(0.01)
            # SIGTERM: the gateway drains what it has accepted and exits; connections are
            # refused until the new process listens.
            assert producer.stats.in_flight > 0
            await asyncio.to_thread(gateway.restart)
        ids = await sender
    assert len(set(ids)) == total
    assert stored(gateway) == (total, total)
    stats = producer.stats
    assert stats.retries > 0, "the restarts were felt"
    print(stats)
    assert gateway.starts == 3


async def test_a_gateway_killed_mid_stream_loses_nothing(make_gateway: MakeGateway) -> None:
    gateway = make_gateway({"dedup_lease_ms": 2000, "dedup_pending_wait_ms": 1000})
    total, batch = 20_000, 250
    breaker = CircuitBreaker(failure_threshold=3, open_for=0.2, max_open_for=1.0)
    async with Producer(gateway.url, max_batch_events=batch, max_in_flight=4, retry=RETRY, breaker=breaker) as producer:
        sender = asyncio.create_task(send_all(producer, events(total)))
        while producer.stats.events_accepted < total // 3:
            await asyncio.sleep(0.01)
        in_flight = producer.stats.in_flight
        await asyncio.to_thread(gateway.kill)
        await asyncio.to_thread(gateway.start)
        ids = await sender
    assert len(set(ids)) == total
    rows, distinct = stored(gateway)
    assert distinct == total, "nothing lost"
    # A crash between an INSERT and its commit leaves rows whose ids the retry, after the
    # lease, writes again (docs/delivery-guarantees.md, "What remains possible"): at most the
    # batches that were in flight.
    assert rows - distinct <= in_flight * batch
    print(f"{rows - distinct} rows written twice; {producer.stats}")


async def test_answers_lost_to_connection_resets_are_settled_by_idempotency_keys(make_gateway: MakeGateway) -> None:
    gateway = make_gateway()
    proxy = ResettingProxy(gateway.port, every=4)
    url = await proxy.start()
    total = 10_000
    try:
        async with Producer(url, max_batch_events=200, max_in_flight=3, retry=RETRY) as producer:
            ids = await send_all(producer, events(total))
    finally:
        await proxy.close()
    assert len(set(ids)) == total
    assert stored(gateway) == (total, total)
    assert proxy.reset_after_answer >= 3
    assert proxy.reset_before_answer >= 3
    stats = producer.stats
    print(f"{proxy.reset_after_answer} + {proxy.reset_before_answer} resets; {stats}")
    # A reset after the answer: the retry gets that stored answer back, flagged as a replay.
    assert stats.replayed >= 1, stats
    assert stats.events_accepted == total, "a replayed answer reports the events accepted, as first answered"
    resets = sum(n for reason, n in stats.retries_by_reason.items() if reason in ("ReadError", "RemoteProtocolError"))
    assert resets == proxy.resets, stats.retries_by_reason


async def test_bad_events_are_rejected_alone_and_the_rest_stored(make_gateway: MakeGateway) -> None:
    gateway = make_gateway()
    async with Producer(
        gateway.url, retry=RETRY, max_request_bytes=32 << 20, max_batch_bytes=32 << 20, linger=0.05
    ) as producer:
        mixed = [
            {"user_id": 1, "event_type": "good"},
            {"user_id": -5, "event_type": "bad"},
            {"user_id": 2, "event_type": "bad", "no_such_column": True},
            "not an object",
            {"user_id": 3, "event_type": "good", "event_ts": "2024-05-01T12:00:00.250Z"},
            {"user_id": "many", "event_type": "bad"},
        ]
        batch = await (await producer.send_batch(mixed))
        singles = [await producer.send(event) for event in mixed]
        # The whole request refused: every event of it reported, none stored.
        too_big = await (await producer.send_batch([{"user_id": 9, "payload": "x" * (11 << 20)}, {"user_id": 10}]))
    for results in (list(batch.events), [f.result() for f in singles]):
        assert [r.status for r in results] == [
            Status.ACCEPTED,
            Status.REJECTED,
            Status.REJECTED,
            Status.REJECTED,
            Status.ACCEPTED,
            Status.REJECTED,
        ]
        assert results[1].field == "user_id"
        assert "out of range" in (results[1].reason or "")
        assert results[2].field == "no_such_column"
        assert results[3].field is None
        assert results[5].field == "user_id"
    assert [(r.status, r.code) for r in too_big.events] == [(Status.REJECTED, "decompressed_body_too_large")] * 2
    assert too_big.http_status == 413
    assert stored(gateway) == (4, 4)
    types = gateway.clickhouse.query(f"SELECT DISTINCT event_type FROM {gateway.table()} FORMAT TabSeparated").split()
    assert types == ["good"]


async def test_offsets_checkpoint_and_an_old_offset_writes_nothing(make_gateway: MakeGateway) -> None:
    gateway = make_gateway()
    async with Producer(gateway.url, producer_id="orders", retry=RETRY) as producer:
        assert await producer.committed_offset(0) is None
        for page in range(5):
            offset = (page + 1) * 100
            result = await (await producer.send_batch(list(events(100, page * 100)), partition=3, offset=offset))
            assert result.accepted == 100
        assert await producer.committed_offsets() == {3: 500}
    # A restarted reader that resends an old page (new ids, new key): answered as written before.
    async with Producer(gateway.url, producer_id="orders", retry=RETRY) as again:
        result = await (await again.send_batch(list(events(100, 300)), partition=3, offset=400))
        assert [e.status for e in result.events] == [Status.DUPLICATE] * 100
        empty = await (await again.send_batch([], partition=3, offset=600))
        assert empty.ok
        assert await again.committed_offset(3) == 600, "an empty batch moves the offset"
    assert stored(gateway) == (500, 500)


async def test_two_streams_each_in_its_own_table(make_gateway: MakeGateway) -> None:
    gateway = make_gateway(
        config_file=lambda db: (
            f'[streams.clicks]\ndatabase = "{db}"\nbuffer_table = "clicks_buffer"\n'
            'destination_table = "clicks"\npartition_key = "page"\n'
        ),
        before_migrate=lambda db: [
            f"CREATE DATABASE IF NOT EXISTS `{db}`",
            f"CREATE TABLE `{db}`.clicks (event_id UUID, event_ts DateTime, page String, n UInt32) "
            "ENGINE = MergeTree ORDER BY (event_ts, event_id)",
        ],
    )
    clicks = ({"page": f"/p{i % 7}", "n": i} for i in range(1000))
    async with Producer(gateway.url, stream="clicks", producer_id="clicks-etl", retry=RETRY) as producer:
        result = await (await producer.send_batch(list(clicks), offset=1000))
        assert result.accepted == 1000
        assert await producer.committed_offsets() == {0: 1000}
    async with Producer(gateway.url, producer_id="clicks-etl", retry=RETRY) as default:
        assert await default.committed_offsets() == {}, "offsets are the stream's own"
        await send_all(default, events(300))
    assert stored(gateway) == (300, 300)
    gateway.clickhouse.query(f"OPTIMIZE TABLE {gateway.table('clicks_buffer')}")
    rows, ids = gateway.clickhouse.scalars(f"SELECT count(), uniqExact(event_id) FROM {gateway.table('clicks')}")
    assert (rows, ids) == (1000, 1000)
    with pytest.raises(ValueError, match="stream"):
        Producer(gateway.url, stream="Not A Stream")


def test_the_sync_facade_against_the_gateway(make_gateway: MakeGateway) -> None:
    gateway = make_gateway()
    with SyncProducer(gateway.url, compression="zstd", retry=RETRY) as producer:
        futures = [producer.send(event) for event in events(1000)]
        producer.flush()
        assert all(f.result().status is Status.ACCEPTED for f in futures)
    assert stored(gateway) == (1000, 1000)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
async def test_every_compression_is_read_by_the_gateway(make_gateway: MakeGateway, compression: str) -> None:
    gateway = make_gateway()
    async with Producer(gateway.url, compression=compression, retry=RETRY) as producer:  # type: ignore[arg-type]
        await send_all(producer, events(500))
    assert stored(gateway) == (500, 500)


async def test_a_408_is_retried_with_the_same_idempotency_key(make_gateway: MakeGateway) -> None:
    gateway = make_gateway({"body_timeout_ms": 300})
    proxy = StallingProxy(gateway.port, stall=1)
    url = await proxy.start()
    try:
        async with Producer(url, max_batch_events=50, retry=RETRY) as producer:
            ids = await send_all(producer, events(50))
    finally:
        await proxy.close()
    assert proxy.statuses[:2] == [408, 200], proxy.statuses
    assert len(proxy.keys) == 2, proxy.keys
    assert proxy.keys[0] is not None, "every attempt carries an Idempotency-Key"
    assert proxy.keys[0] == proxy.keys[1], "the retry carries the same one"
    assert producer.stats.retries_by_reason.get("body_timeout") == 1, producer.stats.retries_by_reason
    assert len(set(ids)) == 50
    assert stored(gateway) == (50, 50)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'[{"user_id": 1, "payload": "' + b"x" * (16 << 20) + b'"}]'),
        (
            "application/x-ndjson",
            (b'{"user_id": 7, "event_type": "big", "payload": "' + b"y" * 1000 + b'"}\n') * 12_000,
        ),
    ],
    ids=["16 MiB array", "12 MiB of events"],
)
def test_urllib_reads_the_413_of_a_body_over_the_limit(
    make_gateway: MakeGateway, content_type: str, body: bytes
) -> None:
    """urllib writes the whole body before it reads: the gateway must read it too, or the
    client gets a reset instead of the answer."""
    gateway = make_gateway()
    request = urllib.request.Request(
        f"{gateway.url}/v1/events", data=body, headers={"content-type": content_type}, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413
    assert json.loads(refused.value.read())["error"] == "body_too_large"
