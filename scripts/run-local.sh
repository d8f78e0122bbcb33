#!/usr/bin/env bash
# From a fresh machine to a running gateway on a local ClickHouse:
#   1. installs ClickHouse (and the other test dependencies) if absent;
#   2. unless a server already answers at BUFFERGATE_CLICKHOUSE_URL (default
#      http://127.0.0.1:8123), starts a private one with its data under .local/clickhouse;
#   3. builds buffergate, runs `buffergate migrate`, then `buffergate serve` in the foreground.
# Every BUFFERGATE_* variable is passed through (see docs/configuration.md).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
# Each step names itself; the first that fails stops the script and says which it was.
step=""
trap 'echo "run-local.sh: stopped: $step failed (exit $?)" >&2' ERR
begin() { step=$1; echo "run-local.sh: $step" >&2; }

begin "installing dependencies (scripts/install-deps.sh)"
./scripts/install-deps.sh

begin "starting ClickHouse"
url=${BUFFERGATE_CLICKHOUSE_URL:-http://127.0.0.1:8123}
if ! curl -fsS "$url/ping" >/dev/null 2>&1; then
  hostport=${url#*://}; hostport=${hostport%%/*}
  http_port=${hostport##*:}
  [ "$http_port" = "$hostport" ] && http_port=8123
  tcp_port=${CLICKHOUSE_TCP_PORT:-9000}
  mkdir -p .local
  echo "starting a private ClickHouse on port $http_port (data in .local/clickhouse, log in .local/clickhouse.log)"
  nohup ./scripts/clickhouse-server.sh .local/clickhouse "$http_port" "$tcp_port" > .local/clickhouse.log 2>&1 &
  echo $! > .local/clickhouse.pid
  for _ in $(seq 1 100); do
    curl -fsS "$url/ping" >/dev/null 2>&1 && break
    sleep 0.2
  done
  curl -fsS "$url/ping" >/dev/null || { echo "ClickHouse did not start; see .local/clickhouse.log" >&2; false; }
fi

begin "building buffergate (cargo build --release --locked)"
cargo build --release --locked
# The journal of this local gateway, beside the private ClickHouse's data.
export BUFFERGATE_DATA_DIR=${BUFFERGATE_DATA_DIR:-.local/gateway-data}
begin "creating the tables (buffergate migrate)"
./target/release/buffergate migrate
begin "serving (buffergate serve)"
exec ./target/release/buffergate serve
