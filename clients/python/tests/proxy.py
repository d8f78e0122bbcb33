"""A TCP proxy in front of the gateway that answers some requests with a connection reset,
*after* forwarding them: the gateway writes the events, the producer never hears so.

It reads HTTP/1.1 just far enough to find where each request and answer ends (both carry
`Content-Length`), so keep-alive connections carry many requests as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked bodies are not expected here")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """The next request's head and body; `None` once the client has closed."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return head, await reader.readexactly(_content_length(head))


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with RST rather than FIN: SO_LINGER on, zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Proxy:
    """Listens on a free port and serves each connection with `_serve`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class ResettingProxy(_Proxy):
    """Every `every`-th `POST` is reset: odd ones once the gateway has answered (the answer is
    dropped), even ones as soon as the request is forwarded (the gateway is still writing when
    the producer retries)."""

    def __init__(self, upstream_port: int, every: int = 4) -> None:
        super().__init__(upstream_port)
        self.every = every
        self.posts = 0
        self.reset_after_answer = 0
        self.reset_before_answer = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def resets(self) -> int:
        return self.reset_after_answer + self.reset_before_answer

    async def close(self) -> None:
        await super().close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        handed_off = False
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                head, body = request
                upstream_writer.write(head + body)
                await upstream_writer.drain()
                reset = None
                if head.startswith(b"POST "):
                    self.posts += 1
                    if self.posts % self.every == 0:
                        reset = "after" if (self.posts // self.every) % 2 else "before"
                if reset == "before":
                    self.reset_before_answer += 1
                    _reset(writer)
                    # Let the gateway finish and answer into the void.
                    task = asyncio.ensure_future(self._drain_answer(upstream_reader, upstream_writer))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                    handed_off = True
                    return
                answer_head = await upstream_reader.readuntil(b"\r\n\r\n")
                answer = answer_head + await upstream_reader.readexactly(_content_length(answer_head))
                if reset == "after":
                    self.reset_after_answer += 1
                    _reset(writer)
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            _reset(writer)
        finally:
            if not handed_off:
                upstream_writer.close()
            with contextlib.suppress(Exception):
                writer.close()

    @staticmethod
    async def _drain_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(_content_length(head))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _header(head: bytes, wanted: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == wanted:
            return value.strip()
    return None


class StallingProxy(_Proxy):
    """The first `stall` `POST`s reach the gateway with only half their body: the gateway's
    body timeout runs out and its `408` goes back to the producer. Later requests pass whole.
    Records each `POST`'s `Idempotency-Key`."""

    def __init__(self, upstream_port: int, stall: int = 1) -> None:
        super().__init__(upstream_port)
        self.stall = stall
        self.keys: list[bytes | None] = []
        self.statuses: list[int] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                head, body = request
                stalled = head.startswith(b"POST ") and len(self.keys) < self.stall
                if head.startswith(b"POST "):
                    self.keys.append(_header(head, b"idempotency-key"))
                upstream_writer.write(head + (body[: len(body) // 2] if stalled else body))
                await upstream_writer.drain()
                answer_head = await upstream_reader.readuntil(b"\r\n\r\n")
                answer = answer_head + await upstream_reader.readexactly(_content_length(answer_head))
                self.statuses.append(int(answer_head.split(b" ")[1]))
                writer.write(answer)
                await writer.drain()
                if stalled:
                    # The gateway closes the connection it timed out; so does the proxy.
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            _reset(writer)
        finally:
            upstream_writer.close()
            with contextlib.suppress(Exception):
                writer.close()
