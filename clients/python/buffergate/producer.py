"""The asyncio producer: batches events, sends them to `POST /v1/events` with bounded
concurrency and memory, retries each batch byte for byte under one `Idempotency-Key`, and
reports what became of every event.

How each guarantee rests on the gateway (docs/delivery-guarantees.md):

- *Nothing lost*: an event's result is only `accepted`/`duplicate` after a `200`, which the
  gateway sends once the rows are in ClickHouse. Everything else is retried (503, 429, 408, 409,
  5xx, connection errors, an answer that never came) or reported (`rejected`, `failed`).
- *Nothing twice*: every event carries an id the gateway deduplicates on, and every attempt of
  a batch carries the same body and `Idempotency-Key`, so an attempt whose answer was lost is
  either still running (`409 request_in_flight`, retried later), replayed from the store
  (`Idempotent-Replayed: true`), or, if it failed, runs again with its written events seen as
  duplicates.
- *No gap with offsets*: a batch with `X-Producer-Offset` holds exactly one source batch, and
  the batches of one partition go one at a time, in order: the gateway answers a batch at or
  below the committed offset as all duplicates without writing it, so a later batch committed
  first would make an earlier one's retry a silent no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._version import __version__
from .backoff import RetryPolicy, parse_retry_after
from .batching import Accumulator, Compression, compress, content_encoding, encode_event, join_body
from .breaker import CircuitBreaker
from .ids import uuid7_str
from .results import (
    BatchResult,
    EventResult,
    Progress,
    Status,
    batch_result_from_answer,
    failed_batch_result,
)

__all__ = ["Producer", "ProducerClosedError"]

log = logging.getLogger("buffergate")

#: 503 codes that describe the whole fleet (docs/load-shedding.md): every batch of this
#: producer waits out the `Retry-After`, not only the one that was told. `shard_saturated`
#: is not among them: on a ClickHouse cluster only batches with events of that shard wait.
_FLEET_WIDE = frozenset({"buffer_saturated", "buffer_unknown", "circuit_open"})


def retryable_status(status: int) -> bool:
    """Whether an error answer is worth the same request again: 408 (the body did not arrive in
    time; nothing was written), 409 (an earlier attempt of this very batch is still being
    written; its outcome decides), 429 and 5xx. Any other 4xx says the request itself is wrong
    and is final."""
    return status in (408, 409, 429) or status >= 500


#: What every 200/202 answer of `POST /v1/events` holds (openapi.yaml, IngestResponse).
_ANSWER_FIELDS = frozenset({"accepted", "duplicates", "rejected"})

#: Bodies larger than this are compressed on a worker thread, off the event loop.
_THREAD_COMPRESS_BYTES = 256 * 1024

_MAX_OFFSET = (1 << 64) - 1
_MAX_PARTITION = (1 << 32) - 1


#: A stream's name, as the gateway's configuration spells it.
_STREAM_NAME = re.compile(r"[a-z0-9_-]{1,64}")


class ProducerClosedError(RuntimeError):
    """`send` on a producer that is closing or closed."""


@dataclass(eq=False)
class _Batch:
    items: list[bytes]
    event_ids: list[str | None]
    key: str
    budget: int
    done: asyncio.Future[None]
    futures: list[asyncio.Future[EventResult]] = field(default_factory=list)
    batch_future: asyncio.Future[BatchResult] | None = None
    partition: int | None = None
    offset: int | None = None
    body: bytes | None = None
    #: A batch of `send` counted in `Producer._queued` until it gets a request slot.
    queued: bool = False


class _Final(Exception):
    """A delivery that ends without a success answer."""

    def __init__(self, result: BatchResult) -> None:
        super().__init__(result)
        self.result = result


class Producer:
    """Sends events to a buffergate gateway.

    ```python
    async with Producer("http://gateway:8080", api_key="...") as producer:
        result = await producer.send({"user_id": 1, "event_type": "click"})  # queued
        ...
    # leaving the block flushes: every event sent has its result
    ```

    `send` returns once the event is queued, with a future of its `EventResult`; it waits
    while `max_buffer_bytes` of events are queued or in flight (back-pressure), and never
    drops one. See the package README for every parameter and the guarantees.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        stream: str | None = None,
        producer_id: str | None = None,
        max_batch_events: int = 1000,
        max_batch_bytes: int = 1 << 20,
        linger: float = 0.02,
        compression: Compression = "gzip",
        compression_level: int | None = None,
        max_in_flight: int = 4,
        max_buffer_bytes: int = 32 << 20,
        max_request_events: int = 10_000,
        max_request_bytes: int = 10 << 20,
        retry: RetryPolicy | None = None,
        breaker: CircuitBreaker | None = None,
        request_timeout: float = 75.0,
        connect_timeout: float = 5.0,
        id_field: str | None = "event_id",
        on_progress: Callable[[Progress], None] | None = None,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        close_timeout: float | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not 1 <= max_batch_events <= max_request_events:
            raise ValueError("need 1 <= max_batch_events <= max_request_events")
        if not 2 < max_batch_bytes <= max_request_bytes:
            raise ValueError("need 2 < max_batch_bytes <= max_request_bytes")
        if linger < 0:
            raise ValueError("linger must be >= 0")
        if compression not in ("gzip", "zstd", "none"):
            raise ValueError("compression must be gzip, zstd or none")
        if compression == "zstd":
            compress(b"[]", "zstd")  # fails now, not at the first batch, without zstandard
        if producer_id is not None and not 1 <= len(producer_id) <= 200:
            raise ValueError("producer_id must be 1 to 200 characters")
        if stream is not None and not _STREAM_NAME.fullmatch(stream):
            raise ValueError("stream must match [a-z0-9_-]{1,64}")
        self.url = url.rstrip("/")
        self.stream = stream
        # The gateway's routes for the stream: `None` is the default stream's.
        self._events_path = "/v1/events" if stream is None else f"/v1/streams/{stream}/events"
        self._offsets_path = "/v1/offsets/" if stream is None else f"/v1/streams/{stream}/offsets/"
        self.producer_id = producer_id
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.linger = linger
        self.compression: Compression = compression
        self.compression_level = compression_level
        self.max_in_flight = max_in_flight
        self.max_buffer_bytes = max_buffer_bytes
        self.max_request_events = max_request_events
        self.max_request_bytes = max_request_bytes
        self.retry = retry if retry is not None else RetryPolicy()
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.id_field = id_field
        self.close_timeout = close_timeout
        self._on_progress = on_progress

        base_headers = {"user-agent": f"buffergate-python/{__version__}", "content-type": "application/json"}
        if api_key:
            base_headers["authorization"] = f"Bearer {api_key}"
        base_headers.update(headers or {})
        # One connection per request slot plus one for offset reads; kept alive between
        # batches, so a steady producer opens max_in_flight connections once.
        self._client = httpx.AsyncClient(
            base_url=self.url,
            headers=base_headers,
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_in_flight + 1,
                max_keepalive_connections=max_in_flight + 1,
                keepalive_expiry=30.0,
            ),
            transport=transport,
        )
        self._stats = Progress()
        self._open = Accumulator(max_batch_events, max_batch_bytes)
        self._open_ids: list[str | None] = []
        self._open_futures: list[asyncio.Future[EventResult]] = []
        self._open_budget = 0
        self._linger_handle: asyncio.TimerHandle | None = None
        self._linger_due = False
        self._generation = 0
        self._queued = 0  # sealed batches of `send` waiting for a request slot
        self._slots: asyncio.Semaphore | None = None
        self._buffered = 0
        self._room_waiters: list[asyncio.Future[None]] = []
        self._outstanding: set[_Batch] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._tails: dict[int, asyncio.Future[None]] = {}
        self._last_offset: dict[int, int] = {}
        self._failed_partitions: dict[int, str] = {}
        self._partition_locks: dict[int, asyncio.Lock] = {}
        self._not_before = 0.0
        self._closing = False
        self._closed = False

    # -- public API ---------------------------------------------------------------------------

    async def __aenter__(self) -> Producer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def stats(self) -> Progress:
        """A snapshot of the producer's counters."""
        self._stats.buffered_bytes = self._buffered
        return self._stats.snapshot()

    async def send(self, event: Any) -> asyncio.Future[EventResult]:
        """Queues one event; returns a future of its result.

        Waits while the producer's buffer is full. Raises `TypeError`/`ValueError` for an event
        that cannot be sent as JSON or is larger than `max_request_bytes`, and
        `ProducerClosedError` once `close` has begun.
        """
        self._check_open()
        data, event_id = encode_event(event, self.id_field)
        if len(data) + 2 > self.max_request_bytes:
            raise ValueError(f"event of {len(data)} bytes is larger than max_request_bytes")
        if self._open.would_overflow(len(data)):
            self._seal_open()
        await self._reserve(len(data))
        if self._closing:
            self._release(len(data))
            self._check_open()
        # The wait may have let another send fill or seal the open batch.
        if self._open.would_overflow(len(data)):
            self._seal_open()
        future: asyncio.Future[EventResult] = asyncio.get_running_loop().create_future()
        full = self._open.add(data)
        self._open_ids.append(event_id)
        self._open_futures.append(future)
        self._open_budget += len(data)
        self._stats.events_queued += 1
        if full:
            self._seal_open()
            # A caller sending in a tight loop never suspends otherwise: let the batch's
            # delivery start now rather than once the whole buffer is full.
            await asyncio.sleep(0)
        elif self._linger_handle is None:
            loop = asyncio.get_running_loop()
            self._linger_handle = loop.call_later(self.linger, self._on_linger, self._generation)
        return future

    async def send_batch(
        self,
        events: Iterable[Any],
        *,
        partition: int | None = None,
        offset: int | None = None,
    ) -> asyncio.Future[BatchResult]:
        """Queues `events` as exactly one request of their own; returns a future of its result.

        With `offset` (the source position of the batch's *last* event; needs `producer_id`),
        the gateway advances the committed offset of (`producer_id`, `partition`) once every
        event is written; the batches of one partition are sent one at a time, in the order
        queued, and offsets must increase. An empty batch with an offset only moves the offset.
        """
        self._check_open()
        if offset is None:
            if partition is not None:
                raise ValueError("partition is only meaningful with an offset")
            return await self._queue_batch(events, None, None)
        if self.producer_id is None:
            raise ValueError("offsets need the producer's producer_id")
        partition = 0 if partition is None else partition
        if not 0 <= partition <= _MAX_PARTITION:
            raise ValueError("partition must be from 0 to 2^32-1")
        if not 0 <= offset <= _MAX_OFFSET:
            raise ValueError("offset must be from 0 to 2^64-1")
        # From the offset check to the batch's place in the partition's chain, one caller at a
        # time: a batch that started after one with a later offset would be answered as
        # already written, and never be written.
        async with self._partition_locks.setdefault(partition, asyncio.Lock()):
            return await self._queue_batch(events, partition, offset)

    async def _queue_batch(
        self, events: Iterable[Any], partition: int | None, offset: int | None
    ) -> asyncio.Future[BatchResult]:
        if partition is not None and offset is not None:
            last = self._last_offset.get(partition)
            if last is not None and offset <= last:
                # The gateway would answer it as already written, and write nothing.
                raise ValueError(f"offset {offset} of partition {partition} is not above {last}, sent before")
        items: list[bytes] = []
        ids: list[str | None] = []
        size = 2
        for event in events:
            data, event_id = encode_event(event, self.id_field)
            items.append(data)
            ids.append(event_id)
            size += len(data) + (1 if len(items) > 1 else 0)
        if not items and offset is None:
            raise ValueError("an empty batch needs an offset")
        if len(items) > self.max_request_events:
            raise ValueError(f"{len(items)} events is more than max_request_events ({self.max_request_events})")
        if size > self.max_request_bytes:
            raise ValueError(f"a body of {size} bytes is larger than max_request_bytes ({self.max_request_bytes})")
        await self._reserve(size)
        if self._closing:
            self._release(size)
            self._check_open()
        if partition is not None and offset is not None:
            self._last_offset[partition] = offset
        loop = asyncio.get_running_loop()
        batch = _Batch(
            items=items,
            event_ids=ids,
            key=uuid7_str(),
            budget=size,
            done=loop.create_future(),
            batch_future=loop.create_future(),
            partition=partition,
            offset=offset,
        )
        self._stats.events_queued += len(items)
        self._start(batch)
        assert batch.batch_future is not None
        return batch.batch_future

    async def flush(self) -> None:
        """Sends what is queued now and waits until every event sent so far has its result."""
        self._seal_open()
        pending = [b.done for b in self._outstanding]
        if pending:
            await asyncio.gather(*(asyncio.shield(f) for f in pending))

    async def close(self, timeout: float | None = None) -> None:
        """Flushes, then closes the connections. Batches still undelivered after `timeout`
        (default `close_timeout`; `None`: no limit) are reported `failed`."""
        if self._closed:
            return
        self._closing = True
        timeout = self.close_timeout if timeout is None else timeout
        try:
            try:
                await asyncio.wait_for(self.flush(), timeout)
            except asyncio.TimeoutError:
                log.error("closing with %d batches undelivered after %.1f s", len(self._outstanding), timeout)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._closed = True
            if self._linger_handle is not None:
                self._linger_handle.cancel()
                self._linger_handle = None
            for waiter in self._room_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            await self._client.aclose()

    async def committed_offsets(self, *, timeout: float = 60.0) -> dict[int, int]:
        """The gateway's committed offset of each partition of `producer_id`
        (`GET /v1/offsets/{producer_id}`). Resume each partition from its offset + 1."""
        if self.producer_id is None:
            raise ValueError("offsets need the producer's producer_id")
        path = self._offsets_path + urllib.parse.quote(self.producer_id, safe="")
        loop = asyncio.get_running_loop()
        start = loop.time()
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                response = await self._client.get(path)
            except httpx.TransportError as error:
                reason = f"{type(error).__name__}: {error}"
            else:
                if response.status_code == 200:
                    partitions = response.json().get("partitions", {})
                    return {int(k): int(v) for k, v in partitions.items()}
                if response.status_code != 429 and response.status_code < 500:
                    raise RuntimeError(f"GET {path}: {response.status_code} {response.text}")
                reason = f"{response.status_code} {response.text}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
            delay = self.retry.delay(attempt, retry_after)
            if loop.time() - start + delay > timeout:
                raise TimeoutError(f"GET {path} failed for {timeout:.0f} s; last: {reason}")
            log.info("reading offsets failed (%s); retrying in %.2f s", reason, delay)
            await asyncio.sleep(delay)

    async def committed_offset(self, partition: int = 0, *, timeout: float = 60.0) -> int | None:
        """The committed offset of one partition, `None` if it has none yet."""
        return (await self.committed_offsets(timeout=timeout)).get(partition)

    # -- batching -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closing:
            raise ProducerClosedError("the producer is closing")

    async def _reserve(self, size: int) -> None:
        """Takes `size` bytes of the buffer, waiting for room (an event larger than the whole
        buffer goes alone, or it could never be sent)."""
        while self._buffered > 0 and self._buffered + size > self.max_buffer_bytes:
            if self._closed:
                raise ProducerClosedError("the producer is closed")
            # What holds the room must be able to leave: send the open batch now.
            self._seal_open()
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._room_waiters.append(waiter)
            await waiter
        self._buffered += size

    def _release(self, size: int) -> None:
        self._buffered -= size
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _on_linger(self, generation: int) -> None:
        self._linger_handle = None
        if generation != self._generation or not self._open:
            return
        if self._queued:
            # Every request slot is taken and sealed batches are waiting for one: keep filling
            # this batch until a slot frees up, so a busy producer sends fuller batches.
            self._linger_due = True
        else:
            self._seal_open()

    def _seal_open(self) -> None:
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        self._linger_due = False
        if not self._open:
            return
        self._generation += 1
        batch = _Batch(
            items=self._open.take(),
            event_ids=self._open_ids,
            key=uuid7_str(),
            budget=self._open_budget,
            done=asyncio.get_running_loop().create_future(),
            futures=self._open_futures,
            queued=True,
        )
        self._open_ids, self._open_futures, self._open_budget = [], [], 0
        self._queued += 1
        self._start(batch)

    def _start(self, batch: _Batch) -> None:
        previous = None
        if batch.partition is not None:
            previous = self._tails.get(batch.partition)
            self._tails[batch.partition] = batch.done
        self._outstanding.add(batch)
        task = asyncio.get_running_loop().create_task(self._run(batch, previous))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- delivery -----------------------------------------------------------------------------

    async def _run(self, batch: _Batch, previous: asyncio.Future[None] | None) -> None:
        result: BatchResult | None = None
        counted_queue = batch.queued
        try:
            if previous is not None:
                await asyncio.shield(previous)
            if batch.partition is not None and batch.partition in self._failed_partitions:
                raise _Final(self._failed(batch, self._failed_partitions[batch.partition], attempts=0))
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.max_in_flight)
            async with self._slots:
                if counted_queue:
                    counted_queue = False
                    self._slot_taken()
                self._stats.in_flight += 1
                try:
                    result = await self._deliver(batch)
                finally:
                    self._stats.in_flight -= 1
        except _Final as final:
            result = final.result
        except asyncio.CancelledError:
            result = self._failed(batch, "the producer was closed before the batch was delivered", attempts=0)
        except Exception as error:  # a bug must not leave callers waiting forever
            log.exception("delivering batch %s failed unexpectedly", batch.key)
            result = self._failed(batch, f"internal error: {error!r}", attempts=0)
        finally:
            if counted_queue:
                self._slot_taken()
            if result is None:
                result = self._failed(batch, "the producer was closed before the batch was delivered", attempts=0)
            self._finish(batch, result)

    def _slot_taken(self) -> None:
        self._queued -= 1
        if self._queued == 0 and self._linger_due and self._open:
            self._seal_open()

    def _failed(self, batch: _Batch, reason: str, *, attempts: int, http_status: int = 0) -> BatchResult:
        return failed_batch_result(
            batch.event_ids,
            Status.FAILED,
            reason=reason,
            http_status=http_status,
            attempts=attempts,
            idempotency_key=batch.key,
            partition=batch.partition,
            offset=batch.offset,
        )

    def _headers(self, batch: _Batch) -> dict[str, str]:
        headers = {"idempotency-key": batch.key}
        encoding = content_encoding(self.compression)
        if encoding is not None:
            headers["content-encoding"] = encoding
        if batch.offset is not None:
            assert self.producer_id is not None
            assert batch.partition is not None
            headers["x-producer-id"] = self.producer_id
            headers["x-producer-partition"] = str(batch.partition)
            headers["x-producer-offset"] = str(batch.offset)
        return headers

    async def _body(self, batch: _Batch) -> bytes:
        if batch.body is None:
            raw = join_body(batch.items)
            if len(raw) > _THREAD_COMPRESS_BYTES and self.compression != "none":
                batch.body = await asyncio.to_thread(compress, raw, self.compression, self.compression_level)
            else:
                batch.body = compress(raw, self.compression, self.compression_level)
            batch.items = []  # only the body is kept for retries
        return batch.body

    async def _wait_turn(self) -> None:
        """Waits out a fleet-wide `Retry-After` and an open breaker; on return the caller
        holds the breaker's permission and must report the attempt's outcome."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now < self._not_before:
                await asyncio.sleep(self._not_before - now)
                continue
            if self.breaker.try_acquire(now):
                return
            retry_at = self.breaker.retry_at()
            await asyncio.sleep(max(0.01, retry_at - now) if retry_at is not None else 0.02)

    def _breaker_failure(self, now: float) -> None:
        if self.breaker.record_failure(now):
            self._stats.breaker_opened += 1
            retry_at = self.breaker.retry_at()
            log.warning(
                "the gateway keeps failing: holding requests back for %.1f s",
                (retry_at - now) if retry_at is not None else 0.0,
            )

    async def _deliver(self, batch: _Batch) -> BatchResult:
        loop = asyncio.get_running_loop()
        body = await self._body(batch)
        headers = self._headers(batch)
        start = loop.time()
        attempts = 0
        while True:
            await self._wait_turn()
            attempts += 1
            self._stats.requests += 1
            retry_after: float | None = None
            try:
                response = await self._client.post(self._events_path, content=body, headers=headers)
                answer = _json_object(response)
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except httpx.UnsupportedProtocol as error:
                self.breaker.release()
                raise _Final(self._failed(batch, f"bad gateway url: {error}", attempts=attempts)) from None
            except httpx.TransportError as error:
                # Includes a reset or a timeout after the request was sent: the attempt may
                # have been written; the retry's Idempotency-Key and event ids settle it.
                self._breaker_failure(loop.time())
                reason = type(error).__name__
                detail = str(error) or reason
            else:
                status = response.status_code
                code = answer.get("error") if isinstance(answer.get("error"), str) else None
                if 200 <= status < 300:
                    self.breaker.record_success()
                    if not answer.keys() >= _ANSWER_FIELDS:
                        # Not the gateway's answer (a proxy's page?): nothing says the events
                        # are stored, and resending them is safe, so say so rather than guess.
                        raise _Final(
                            self._failed(
                                batch,
                                f"unexpected {status} answer: {response.text[:200]!r}",
                                attempts=attempts,
                                http_status=status,
                            )
                        )
                    replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
                    return batch_result_from_answer(
                        answer,
                        batch.event_ids,
                        http_status=status,
                        attempts=attempts,
                        idempotency_key=batch.key,
                        replayed=replayed,
                        partition=batch.partition,
                        offset=batch.offset,
                    )
                message = str(answer.get("message", "")) or response.text[:500]
                if status >= 500:
                    self._breaker_failure(loop.time())
                else:
                    self.breaker.record_success()
                if retryable_status(status):
                    reason = code or f"http_{status}"
                    detail = f"{status} {code or ''} {message}".strip()
                    if status not in (408, 409):
                        retry_after = parse_retry_after(response.headers.get("retry-after"))
                else:
                    raise _Final(
                        failed_batch_result(
                            batch.event_ids,
                            Status.REJECTED,
                            reason=message or f"HTTP {status}",
                            code=code or f"http_{status}",
                            http_status=status,
                            attempts=attempts,
                            idempotency_key=batch.key,
                            partition=batch.partition,
                            offset=batch.offset,
                        )
                    )
            delay = self.retry.delay(attempts, retry_after)
            if self.retry.gives_up(attempts, loop.time() - start, delay):
                raise _Final(
                    self._failed(batch, f"gave up after {attempts} attempts; last: {detail}", attempts=attempts)
                )
            self._stats.retries += 1
            self._stats.retries_by_reason[reason] = self._stats.retries_by_reason.get(reason, 0) + 1
            if retry_after is not None:
                self._stats.retry_after_waited += delay
                if reason in _FLEET_WIDE or reason == "rate_limited":
                    # The whole producer holds back, not only this batch.
                    self._not_before = max(self._not_before, loop.time() + retry_after)
            log.info(
                "batch %s attempt %d: %s; retrying in %.2f s%s",
                batch.key,
                attempts,
                detail,
                delay,
                f" (Retry-After {retry_after:g} s)" if retry_after is not None else "",
            )
            await asyncio.sleep(delay)

    def _finish(self, batch: _Batch, result: BatchResult) -> None:
        self._outstanding.discard(batch)
        self._release(batch.budget)
        stats = self._stats
        stats.batches_sent += 1
        stats.replayed += int(result.replayed)
        if result.error is None:
            # The gateway's own counts: exact even when per-event results can only say STORED.
            stats.events_accepted += result.accepted
            stats.events_duplicate += result.duplicates
            stats.events_rejected += len(result.rejected)
        else:
            for event in result.events:
                if event.status is Status.REJECTED:
                    stats.events_rejected += 1
                else:
                    stats.events_failed += 1
        if result.error is not None:
            if batch.partition is not None:
                # The gateway did not move this partition's offset; a later batch must not move
                # it past these events either, or a resumed reader would skip them.
                self._failed_partitions.setdefault(
                    batch.partition,
                    f"an earlier batch of partition {batch.partition} (offset {batch.offset}) failed: {result.error}",
                )
            log.error("batch %s: %d events not stored: %s", batch.key, len(result.events), result.error)
        # `send` keeps one future per event; `send_batch` one for the batch.
        for future, event_result in zip(batch.futures, result.events if batch.futures else (), strict=True):
            if not future.done():
                future.set_result(event_result)
        if batch.batch_future is not None and not batch.batch_future.done():
            batch.batch_future.set_result(result)
        if not batch.done.done():
            batch.done.set_result(None)
        if self._on_progress is not None:
            stats.buffered_bytes = self._buffered
            try:
                self._on_progress(stats.snapshot())
            except Exception:
                log.exception("the progress callback failed")


def _json_object(response: httpx.Response) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        value = response.json()
        if isinstance(value, dict):
            return value
    return {}
