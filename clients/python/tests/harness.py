"""Private servers for the integration tests and the benchmark: ClickHouse (through
`scripts/clickhouse-server.sh`, as the Rust tests start it), Redis, PostgreSQL and the gateway
binary, each on free ports with a temporary data directory, stopped by pid.

Every child gets `PR_SET_PDEATHSIG`, so a test run that dies leaves no server behind; nothing
here touches a server it did not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[3]


def _postgres_bin() -> Path:
    """Debian's newest installed PostgreSQL (`/usr/lib/postgresql/<major>/bin`)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _postgres_bin()

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec (after any change of user, which would clear it).
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_next_port = itertools.count(os.getpid() * 97)


def free_port() -> int:
    """A port nothing listens on, below the kernel's ephemeral range: a port from that range can
    be taken by an outgoing connection's source port before the server binds it."""
    high = _ephemeral_low()
    low = high // 2
    for _ in range(high - low):
        port = low + next(_next_port) % (high - low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{high}")


def scratch(prefix: str) -> Path:
    """A temporary directory named after this process, so a later run can sweep it if this one
    dies before removing it."""
    sweep_stale_scratch()
    return Path(tempfile.mkdtemp(prefix=f"buffergate-{prefix}-{os.getpid()}-"))


def sweep_stale_scratch() -> None:
    """Removes the scratch directories of runs whose process is gone."""
    for path in Path(tempfile.gettempdir()).glob("buffergate-*-*-*"):
        pid = path.name.rsplit("-", 2)[-2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass


def gateway_binary() -> Path:
    """`BUFFERGATE_BIN`, else the debug build at the repository root."""
    path = Path(os.environ.get("BUFFERGATE_BIN") or REPO / "target" / "debug" / "buffergate")
    if not path.is_file():
        raise FileNotFoundError(f"no gateway binary at {path}: run `cargo build` or set BUFFERGATE_BIN")
    return path


class Process:
    """A child process with its output in a log file."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        *,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = argv
        self.log = log
        with open(log, "ab") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait until it is gone."""
        self.signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit within `timeout`; returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.popen.wait()

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def wait_until(check: Any, timeout: float, what: str, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RuntimeError(f"{what}: the process exited\n{process.tail()}")
        with contextlib.suppress(OSError, httpx.HTTPError):
            if check():
                return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}" + (f"\n{process.tail()}" if process else ""))


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


class ClickHouse:
    """A private clickhouse-server (scripts/clickhouse-server.sh DATA_DIR HTTP_PORT TCP_PORT)."""

    def __init__(self, name: str = "clickhouse") -> None:
        self.dir = scratch(name)
        for _attempt in range(3):
            self.http_port, self.tcp_port = free_port(), free_port()
            self.process = Process(
                [
                    str(REPO / "scripts" / "clickhouse-server.sh"),
                    str(self.dir),
                    str(self.http_port),
                    str(self.tcp_port),
                ],
                self.dir / "stdout.log",
            )
            self.url = f"http://127.0.0.1:{self.http_port}"
            try:
                wait_until(lambda: http_ok(f"{self.url}/ping"), 60, "clickhouse-server", self.process)
                return
            except (RuntimeError, TimeoutError):
                self.process.kill()
        raise RuntimeError(f"clickhouse-server did not start; see {self.dir}")

    def query(self, sql: str) -> str:
        response = httpx.post(self.url, content=sql.encode(), timeout=120)
        if response.status_code != 200:
            raise RuntimeError(f"{sql}\n-> {response.status_code}: {response.text}")
        return response.text

    async def aquery(self, sql: str) -> str:
        async with httpx.AsyncClient(timeout=120) as client:
            response = await client.post(self.url, content=sql.encode())
        if response.status_code != 200:
            raise RuntimeError(f"{sql}\n-> {response.status_code}: {response.text}")
        return response.text

    def scalars(self, sql: str) -> list[int]:
        """The first row of a query, as integers."""
        return [int(v) for v in self.query(f"{sql} FORMAT TabSeparated").split("\n")[0].split("\t")]

    def stop(self) -> None:
        self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Redis:
    """A private redis-server without persistence."""

    def __init__(self) -> None:
        self.dir = scratch("redis")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = Process(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            self.dir / "redis.log",
        )

        def answers() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        wait_until(answers, 20, "redis-server", self.process)

    def stop(self) -> None:
        self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Gateway:
    """`buffergate migrate`, then `buffergate serve` on a free port, configured through
    `BUFFERGATE_*` variables like the Rust tests' `common::config`: quick schema refreshes and
    short INSERT retries. The port stays the same across `restart`."""

    def __init__(
        self,
        binary: Path,
        clickhouse: ClickHouse,
        database: str,
        *,
        redis: Redis | None = None,
        settings: Mapping[str, object] | None = None,
        config_file: str | None = None,
        before_migrate: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.clickhouse = clickhouse
        self.database = database
        self.dir = scratch(f"gateway-{database}")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config: dict[str, object] = {
            "listen": f"127.0.0.1:{self.port}",
            "clickhouse_url": clickhouse.url,
            "database": database,
            "partitions": 2,
            "schema_refresh_interval_ms": 300,
            "retry_initial_backoff_ms": 50,
            "retry_max_backoff_ms": 200,
            "dedup_key_prefix": f"{database}:",
            # Its own journal, kept across restarts of this gateway.
            "data_dir": str(self.dir / "data"),
        }
        if redis is not None:
            config["redis_url"] = redis.url
        config.update(settings or {})
        # Only what is set here: a BUFFERGATE_* variable of the caller's shell must not leak in.
        self.env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": os.environ.get("RUST_LOG", "info")}
        self.env.update(
            {f"BUFFERGATE_{k.upper()}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in config.items()}
        )
        if config_file is not None:
            # Streams are tables of the configuration file.
            (self.dir / "gateway.toml").write_text(config_file)
            self.env["BUFFERGATE_CONFIG"] = str(self.dir / "gateway.toml")
        for statement in before_migrate:
            clickhouse.query(statement)
        self.process: Process | None = None
        self.starts = 0
        self.migrate()
        self.start()

    def migrate(self) -> None:
        done = subprocess.run(
            [str(self.binary), "migrate"], env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"buffergate migrate failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        self.starts += 1
        self.process = Process([str(self.binary), "serve"], self.dir / f"serve-{self.starts}.log", env=self.env)
        wait_until(lambda: http_ok(f"{self.url}/readyz"), 60, "the gateway to be ready", self.process)

    def stop(self) -> int:
        """SIGTERM: the gateway drains and exits."""
        assert self.process is not None
        return self.process.stop()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def table(self, name: str = "events_raw") -> str:
        return f"`{self.database}`.`{name}`"

    def drain(self) -> None:
        """Flushes the Buffer into the destination so its rows can be counted there."""
        self.clickhouse.query(f"OPTIMIZE TABLE {self.table('events_buffer')}")

    def close(self) -> None:
        if self.process is not None and self.process.alive():
            self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Postgres:
    """A private PostgreSQL 15 cluster, run as the `postgres` user (the server refuses root)."""

    def __init__(self) -> None:
        self.dir = scratch("postgres")
        user = "postgres" if os.geteuid() == 0 else None
        if user is not None:
            shutil.chown(self.dir, user, user)
        self.port = free_port()
        data = self.dir / "data"
        init = subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}\n{init.stderr}")
        self.process = Process(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(self.dir),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            self.dir / "postgres.log",
            user=user,
        )
        self.dsn = f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

        def accepts() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return (self.dir / f".s.PGSQL.{self.port}").exists()

        wait_until(accepts, 60, "postgres", self.process)

    def stop(self) -> None:
        self.process.stop(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def stack(binary: Path, database: str, settings: Mapping[str, object] | None = None) -> Iterator[Gateway]:
    """ClickHouse, Redis and one gateway, for the benchmark."""
    clickhouse = ClickHouse()
    redis = Redis()
    gateway = None
    try:
        gateway = Gateway(binary, clickhouse, database, redis=redis, settings=settings)
        yield gateway
    finally:
        if gateway is not None:
            gateway.close()
        redis.stop()
        clickhouse.stop()
