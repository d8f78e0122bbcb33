"""Fixtures: one private ClickHouse and Redis for the whole run, a fresh database and gateway per
test, PostgreSQL for the ETL test. Servers start only when a test asks for them, so the unit
tests run without any."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from harness import ClickHouse, Gateway, Postgres, Redis, gateway_binary

_databases = itertools.count()


@pytest.fixture(scope="session")
def gateway_bin() -> Path:
    try:
        return gateway_binary()
    except FileNotFoundError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def clickhouse() -> Iterator[ClickHouse]:
    server = ClickHouse()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis() -> Iterator[Redis]:
    server = Redis()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    yield server
    server.stop()


MakeGateway = Callable[..., Gateway]


@pytest.fixture
def make_gateway(
    request: pytest.FixtureRequest, gateway_bin: Path, clickhouse: ClickHouse, redis: Redis
) -> Iterator[MakeGateway]:
    """Starts gateways on a database of their own (on `clickhouse` unless another is given),
    with Redis for idempotency keys and offsets."""
    started: list[Gateway] = []

    def make(
        settings: Mapping[str, object] | None = None,
        *,
        on: ClickHouse | None = None,
        config_file: Callable[[str], str] | None = None,
        before_migrate: Callable[[str], Sequence[str]] | None = None,
    ) -> Gateway:
        name = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
        database = f"py_{name}_{next(_databases)}"
        gateway = Gateway(
            gateway_bin,
            on or clickhouse,
            database,
            redis=redis,
            settings=settings,
            config_file=config_file(database) if config_file else None,
            before_migrate=before_migrate(database) if before_migrate else (),
        )
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.close()
