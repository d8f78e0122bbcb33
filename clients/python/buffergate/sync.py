"""A blocking facade over `Producer` for scripts that do not run an event loop.

The producer runs on an event loop in a background thread; each call hands its work to that
loop and blocks until it is done. `send` blocks while the buffer is full (the same
back-pressure) and returns a `concurrent.futures.Future` of the event's result.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from .producer import Producer
from .results import BatchResult, EventResult, Progress

__all__ = ["SyncProducer"]

T = TypeVar("T")


def _bridge(source: asyncio.Future[T]) -> concurrent.futures.Future[T]:
    target: concurrent.futures.Future[T] = concurrent.futures.Future()

    def copy(done: asyncio.Future[T]) -> None:
        if done.cancelled():
            target.cancel()
        elif (error := done.exception()) is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
    return target


class SyncProducer:
    """`with SyncProducer(url, api_key=...) as p: p.send(event)`; takes `Producer`'s arguments."""

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="buffergate-producer", daemon=True)
        self._thread.start()
        try:
            self._producer: Producer = self._call(self._make(url, options))
        except BaseException:
            self._stop_loop()
            raise
        self._closed = False

    @staticmethod
    async def _make(url: str, options: dict[str, Any]) -> Producer:
        return Producer(url, **options)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> SyncProducer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def producer(self) -> Producer:
        """The underlying asyncio producer (use it only from its own loop)."""
        return self._producer

    def send(self, event: Any) -> concurrent.futures.Future[EventResult]:
        async def send() -> concurrent.futures.Future[EventResult]:
            return _bridge(await self._producer.send(event))

        return self._call(send())

    def send_batch(
        self, events: Iterable[Any], *, partition: int | None = None, offset: int | None = None
    ) -> concurrent.futures.Future[BatchResult]:
        materialized = list(events)

        async def send_batch() -> concurrent.futures.Future[BatchResult]:
            return _bridge(await self._producer.send_batch(materialized, partition=partition, offset=offset))

        return self._call(send_batch())

    def flush(self) -> None:
        self._call(self._producer.flush())

    def committed_offset(self, partition: int = 0, *, timeout: float = 60.0) -> int | None:
        return self._call(self._producer.committed_offset(partition, timeout=timeout))

    def committed_offsets(self, *, timeout: float = 60.0) -> dict[int, int]:
        return self._call(self._producer.committed_offsets(timeout=timeout))

    @property
    def stats(self) -> Progress:
        async def stats() -> Progress:
            return self._producer.stats

        return self._call(stats())

    def close(self, timeout: float | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._producer.close(timeout))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
