"""Events per second of one Python producer process against the gateway.

    BUFFERGATE_BIN=target/release/buffergate python clients/python/bench.py --events 300000

Starts its own ClickHouse, Redis and gateway (tests/harness.py) unless `--url` names a running
gateway, sends seed-shaped events (~230 bytes as JSON, ids from the producer) through one
`Producer`, and prints events/s, the producer's CPU per event, and whether every event was
stored exactly once (own stack only). `--dry-run` answers every request in-process instead,
which measures what the producer alone can do.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))

import httpx

from buffergate import Producer

KINDS = ["click", "view", "purchase", "signup", "login", "logout", "search", "share"]


def event(n: int) -> dict[str, Any]:
    return {
        "event_ts": f"2024-05-01 {(n // 3600) % 24:02}:{(n // 60) % 60:02}:{n % 60:02}",
        "user_id": n,
        "event_type": KINDS[n % 8],
        "payload": {"page": f"/p/{n % 997}", "ref": f"campaign-{n % 31}", "ms": n % 5000},
        "metadata": {"source": "web", "ip": f"10.{n % 256}.{(n // 256) % 256}.{(n // 65536) % 256}"},
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def answer_without_reading(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"accepted": 0, "duplicates": 0, "rejected": []})


async def produce(url: str, args: argparse.Namespace) -> tuple[float, float]:
    async with Producer(
        url,
        max_batch_events=args.batch,
        max_in_flight=args.in_flight,
        compression=args.compression,
        linger=0.005,
        transport=httpx.MockTransport(answer_without_reading) if args.dry_run else None,
    ) as producer:
        # Warm up the connections and the gateway's schema before timing.
        await (await producer.send_batch([event(n) for n in range(args.batch)]))
        cpu, started = cpu_seconds(), time.perf_counter()
        for n in range(args.batch, args.batch + args.events):
            await producer.send(event(n))
        await producer.flush()
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        stats = producer.stats
    if not args.dry_run and stats.events_accepted != args.events + args.batch:
        raise SystemExit(f"only {stats.events_accepted} events accepted: {stats}")
    return elapsed, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gateway (default: start a private stack)")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=1000, help="max_batch_events")
    parser.add_argument("--in-flight", type=int, default=4, help="max_in_flight")
    parser.add_argument("--compression", choices=["gzip", "zstd", "none"], default="gzip")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no gateway: every request is answered in-process at once (the producer's own ceiling)",
    )
    args = parser.parse_args()

    def report(elapsed: float, cpu: float) -> None:
        print(
            f"{args.events} events, batches of {args.batch}, {args.in_flight} in flight, {args.compression}: "
            f"{args.events / elapsed:,.0f} events/s; producer CPU {cpu / args.events * 1e6:.1f} µs per event "
            f"({cpu / elapsed:.0%} of a core)"
        )

    if args.url or args.dry_run:
        report(*asyncio.run(produce(args.url or "http://gateway.invalid", args)))
        return 0

    from harness import gateway_binary, stack

    with stack(gateway_binary(), "bench") as gateway:
        elapsed, cpu = asyncio.run(produce(gateway.url, args))
        report(elapsed, cpu)
        gateway.drain()
        rows, ids = gateway.clickhouse.scalars(f"SELECT count(), uniqExact(event_id) FROM {gateway.table()}")
        expected = args.events + args.batch
        print(f"stored: {rows} rows, {ids} distinct ids (expected {expected} of each)")
        return 0 if rows == ids == expected else 1


if __name__ == "__main__":
    sys.exit(main())
