"""The PostgreSQL ETL example, SIGKILLed twice mid-table and restarted: the destination holds
every source row exactly once, with no gap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg

from conftest import MakeGateway
from harness import Postgres

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE.parent / "examples" / "pg_to_buffergate.py"
ROWS = 40_000


def committed(gateway_url: str, producer_id: str) -> int:
    response = httpx.get(f"{gateway_url}/v1/offsets/{producer_id}", timeout=5)
    response.raise_for_status()
    return int(response.json()["partitions"].get("0", 0))


def test_an_etl_worker_killed_twice_copies_every_row_once(
    make_gateway: MakeGateway, postgres: Postgres, tmp_path: Path
) -> None:
    gateway = make_gateway({"dedup_lease_ms": 3000, "dedup_pending_wait_ms": 1000})
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS orders")
        conn.execute(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, user_id bigint NOT NULL, event_type text NOT NULL,"
            " payload jsonb, created_at timestamptz NOT NULL)"
        )
        conn.execute(
            "INSERT INTO orders (user_id, event_type, payload, created_at)"
            " SELECT i %% 997, 'order', jsonb_build_object('n', i, 'amount', (i %% 1000) / 100.0),"
            " now() - (i || ' seconds')::interval FROM generate_series(1, %s) AS i",
            (ROWS,),
        )
    producer_id = "orders-etl"
    argv = [
        sys.executable,
        str(EXAMPLE),
        "--dsn",
        postgres.dsn,
        "--gateway",
        gateway.url,
        "--producer-id",
        producer_id,
        "--table",
        "orders",
        "--page-size",
        "200",
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    logs = []

    def start(run: int) -> subprocess.Popen[bytes]:
        log = tmp_path / f"etl-{run}.log"
        logs.append(log)
        with open(log, "wb") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    kills = []
    for run, kill_at in enumerate((ROWS // 5, ROWS // 2)):
        worker = start(run)
        deadline = time.monotonic() + 60
        while committed(gateway.url, producer_id) < kill_at:
            assert worker.poll() is None, logs[-1].read_text()
            assert time.monotonic() < deadline, "the worker makes progress"
            time.sleep(0.01)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        kills.append(committed(gateway.url, producer_id))
    worker = start(2)
    assert worker.wait(120) == 0, logs[-1].read_text()

    # Each run resumed from the offset the gateway had committed, not from the start.
    resumed = [next(line for line in log.read_text().splitlines() if "resuming after offset" in line) for log in logs]
    assert "resuming after offset 0 " in resumed[0]
    for line, offset in zip(resumed[1:], kills, strict=True):
        after = int(line.split("resuming after offset ")[1].split()[0])
        assert after >= offset, (line, offset)
        assert after > 0
    assert committed(gateway.url, producer_id) == ROWS
    print("killed at offsets", kills, "; resumed:", [line.split(": ", 1)[1] for line in resumed])
    print(logs[-1].read_text().splitlines()[-1])

    gateway.drain()
    rows, ids, source_ids, low, high = gateway.clickhouse.scalars(
        "SELECT count(), uniqExact(event_id), uniqExact(visitParamExtractUInt(payload, 'n')),"
        f" min(visitParamExtractUInt(payload, 'n')), max(visitParamExtractUInt(payload, 'n')) FROM {gateway.table()}"
    )
    assert (rows, ids, source_ids, low, high) == (ROWS, ROWS, ROWS, 1, ROWS), "every row once, no gap"
