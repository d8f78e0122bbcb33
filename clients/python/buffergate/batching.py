"""Events to request bodies: JSON encoding, id assignment, batching by count and bytes,
compression.

Pure and synchronous: the producer decides *when* a batch is sealed (linger, flush); this
module decides what goes into it and what its bytes are. A batch's body is made once, when it
is sealed, and every retry sends those same bytes.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import enum
import gzip
import json
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from .ids import uuid7_str

__all__ = [
    "Accumulator",
    "Compression",
    "compress",
    "content_encoding",
    "decompress",
    "encode_event",
    "join_body",
]

Compression = Literal["gzip", "zstd", "none"]


def _json_default(value: object) -> object:
    """Types a producer commonly has that JSON lacks, in forms the gateway reads for the
    matching column types (docs/ingestion.md)."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, _dt.datetime):
        # RFC 3339 with its offset; a naive datetime is read as UTC by the gateway.
        return value.isoformat()
    if isinstance(value, _dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        # As a string: a float would round it before the Decimal column sees it.
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_encoder = json.JSONEncoder(
    separators=(",", ":"),
    ensure_ascii=False,
    # NaN and Infinity are not JSON (RFC 8259); the gateway reads strictly and would refuse the
    # whole request as malformed, so such an event is refused here, alone.
    allow_nan=False,
    default=_json_default,
)


def encode_event(event: Any, id_field: str | None) -> tuple[bytes, str | None]:
    """The event's JSON text (UTF-8) and its id.

    An object without a value for `id_field` gets a UUIDv7 (the caller's mapping is not
    modified). Raises `TypeError`/`ValueError` for what cannot be sent as JSON, so one bad
    event never spoils the batch it would have joined.
    """
    event_id: str | None = None
    if id_field is not None and isinstance(event, Mapping):
        current = event.get(id_field)
        if current is None:
            event_id = uuid7_str()
            event = {**event, id_field: event_id}
        else:
            event_id = str(current)
    try:
        text = _encoder.encode(event)
    except ValueError as error:
        raise ValueError(f"event is not valid JSON: {error}") from None
    # `surrogatepass` would produce bytes that are not UTF-8; a lone surrogate is an error.
    return text.encode("utf-8"), event_id


def join_body(events: list[bytes]) -> bytes:
    """A JSON array of already-encoded events."""
    return b"[" + b",".join(events) + b"]"


class Accumulator:
    """The open batch: encoded events until `max_events` or `max_bytes` (of the JSON array,
    before compression, which is what the gateway's `max_decompressed_bytes` limits)."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        if max_events < 1 or max_bytes < 2:
            raise ValueError("max_events must be >= 1 and max_bytes >= 2")
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.items: list[bytes] = []
        self.body_bytes = 2  # "[" and "]"

    def __len__(self) -> int:
        return len(self.items)

    def would_overflow(self, size: int) -> bool:
        """Adding an event of `size` bytes would take a non-empty batch past `max_bytes`."""
        return bool(self.items) and self.body_bytes + 1 + size > self.max_bytes

    def add(self, data: bytes) -> bool:
        """Adds an event; returns whether the batch is now full and should be sealed."""
        self.body_bytes += len(data) + (1 if self.items else 0)
        self.items.append(data)
        return len(self.items) >= self.max_events or self.body_bytes >= self.max_bytes

    def take(self) -> list[bytes]:
        items, self.items, self.body_bytes = self.items, [], 2
        return items


def content_encoding(compression: Compression) -> str | None:
    return None if compression == "none" else compression


def compress(raw: bytes, compression: Compression, level: int | None = None) -> bytes:
    """The body as sent. gzip defaults to level 1 and zstd to 3: JSON events compress 4 to 8 times at
    those levels, and higher ones cost the producer far more CPU than they save on a LAN."""
    if compression == "none":
        return raw
    if compression == "gzip":
        # mtime=0: the same batch always compresses to the same bytes.
        return gzip.compress(raw, compresslevel=1 if level is None else level, mtime=0)
    if compression == "zstd":
        try:
            import zstandard
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise RuntimeError(
                "zstd compression needs the zstandard package: pip install 'buffergate-client[zstd]'"
            ) from error
        compressor = zstandard.ZstdCompressor(level=3 if level is None else level, write_content_size=True)
        return compressor.compress(raw)
    raise ValueError(f"unknown compression {compression!r}")


def decompress(body: bytes, compression: Compression) -> bytes:
    """The inverse of `compress` (for tests and tools)."""
    if compression == "none":
        return body
    if compression == "gzip":
        return gzip.decompress(body)
    import zstandard

    return zstandard.ZstdDecompressor().decompress(body)
