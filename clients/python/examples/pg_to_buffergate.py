"""ETL worker: copies a PostgreSQL table into ClickHouse through buffergate, in pages read by
the table's sequence id, and resumes after a crash exactly where the gateway says it stopped.

    python pg_to_buffergate.py --dsn "host=db dbname=shop" --gateway http://buffergate:8080 \\
        --producer-id orders-etl --table orders

Each page is one `send_batch` with `offset` = the page's last id, so the gateway commits the
offset only once every row of the page is in ClickHouse. At start the worker asks for the
committed offset (`GET /v1/offsets/{producer_id}`) and reads from the next id: a worker killed
at any point neither skips nor repeats a page. Event ids are derived from the source row, so
if the killed worker's last request was still being written when its successor re-sent that
page, the gateway sees the same ids and writes them once.

Reading by id is exact for a table whose rows become visible in id order (one writer, or rows
appended by a single sequence-ordered process). With many concurrent writers a row with a lower
id can commit after a higher one has been read; read such tables only up to a safe horizon
(for example ids older than a few seconds).

The source table is expected to look like

    CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL,
                         event_type text NOT NULL, payload jsonb, created_at timestamptz NOT NULL)

Exits 0 once caught up (or on SIGTERM/SIGINT, after the pages read so far are delivered), 1
when a page could not be delivered; `--follow` keeps polling for new rows instead.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import logging
import signal
import sys
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from buffergate import BatchResult, Producer

log = logging.getLogger("pg_to_buffergate")

#: Namespace of the event ids derived from source rows (uuid5 of producer, table and id).
ID_NAMESPACE = uuid.UUID("6f1c1f4e-8a43-4f64-9c43-5a0c7c3b2d10")


def event_id(producer_id: str, table: str, row_id: int) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{producer_id}/{table}/{row_id}"))


def to_event(row: dict[str, Any], producer_id: str, table: str) -> dict[str, Any]:
    return {
        "event_id": event_id(producer_id, table, row["id"]),
        "event_ts": row["created_at"],
        "user_id": row["user_id"],
        "event_type": row["event_type"],
        "payload": row["payload"] if row["payload"] is not None else {},
        "metadata": {"source": "postgres", "table": table, "source_id": str(row["id"])},
    }


def check(result: BatchResult) -> None:
    """Raises on a page that was not delivered; logs rows the gateway refused (they are not
    retried: the offset moved past them, as it should for data that can never fit)."""
    if result.error is not None:
        raise RuntimeError(f"page ending at offset {result.offset} was not delivered: {result.error}")
    for rejected in result.rejected:
        log.warning(
            "row at position %d of page %s rejected: %s: %s",
            rejected.index,
            result.offset,
            rejected.field,
            rejected.reason,
        )


async def run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    async with Producer(
        args.gateway,
        api_key=args.api_key,
        producer_id=args.producer_id,
        max_request_events=max(args.page_size, 10_000),
    ) as producer:
        committed = await producer.committed_offset(args.partition)
        last = committed if committed is not None else args.start_after
        log.info("resuming after offset %d (committed: %s)", last, committed)
        query = sql.SQL(
            "SELECT id, user_id, event_type, payload, created_at FROM {} WHERE id > %s ORDER BY id LIMIT %s"
        ).format(sql.Identifier(args.table))
        pending: collections.deque[asyncio.Future[BatchResult]] = collections.deque()
        sent_rows = 0
        async with await psycopg.AsyncConnection.connect(args.dsn, autocommit=True, row_factory=dict_row) as conn:
            while not stop.is_set():
                rows = await (await conn.execute(query, (last, args.page_size))).fetchall()
                if not rows:
                    if not args.follow:
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stop.wait(), args.poll_interval)
                    continue
                events = [to_event(row, args.producer_id, args.table) for row in rows]
                last = rows[-1]["id"]
                # Reading the next page overlaps the delivery of this one; the producer sends the
                # pages of a partition one at a time, in order.
                pending.append(await producer.send_batch(events, partition=args.partition, offset=last))
                sent_rows += len(rows)
                while pending and (pending[0].done() or len(pending) > args.read_ahead):
                    check(await pending.popleft())
            while pending:
                check(await pending.popleft())
        stats = producer.stats
        log.info(
            "done: %d rows sent up to offset %d; %d accepted, %d duplicates, %d rejected",
            sent_rows,
            last,
            stats.events_accepted,
            stats.events_duplicate,
            stats.events_rejected,
        )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dsn", required=True, help="libpq connection string of the source database")
    parser.add_argument("--gateway", required=True, help="buffergate URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--producer-id", required=True, help="names this source's offsets at the gateway")
    parser.add_argument("--table", default="orders")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--read-ahead", type=int, default=4, help="pages read before the oldest is delivered")
    parser.add_argument("--start-after", type=int, default=0, help="first run only: copy ids above this")
    parser.add_argument("--follow", action="store_true", help="keep polling for new rows")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except RuntimeError as error:
        log.error("%s", error)
        return 1
    except (OSError, psycopg.Error) as error:
        log.error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
