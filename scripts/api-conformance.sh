#!/usr/bin/env bash
# Runs schemathesis against a live gateway on a private ClickHouse: every response must match
# openapi.yaml (status codes, headers, content types, bodies) and no request may produce a
# server error other than the documented 503s.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --quiet --bin buffergate
dir=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ch_http=$(port); ch_tcp=$(port); gw_port=$(port)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

./scripts/clickhouse-server.sh "$dir/clickhouse" "$ch_http" "$ch_tcp" > "$dir/clickhouse.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 150); do curl -fsS "http://127.0.0.1:$ch_http/ping" >/dev/null 2>&1 && break; sleep 0.2; done

export BUFFERGATE_CLICKHOUSE_URL="http://127.0.0.1:$ch_http" BUFFERGATE_DATABASE=api_conformance
export BUFFERGATE_LISTEN="127.0.0.1:$gw_port" BUFFERGATE_ADMIN_TOKEN=conformance-admin RUST_LOG=warn
export BUFFERGATE_DATA_DIR="$dir/gateway-data"
# A short-lived Buffer: `wait=visible` answers once rows reach the destination, which takes the
# Buffer's max_time plus the confirmation grace, and must stay well inside --request-timeout.
export BUFFERGATE_BUFFER_MIN_TIME=1 BUFFERGATE_BUFFER_MAX_TIME=3 BUFFERGATE_CONFIRM_GRACE_MS=1000
./target/debug/buffergate migrate
./target/debug/buffergate serve > "$dir/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 150); do curl -fsS "http://127.0.0.1:$gw_port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

st run openapi.yaml --url "http://127.0.0.1:$gw_port" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --header "Authorization: Bearer conformance-admin" \
  --max-examples 40 --seed 1 --request-timeout 30 \
  || { echo "--- gateway log"; tail -50 "$dir/gateway.log"; exit 1; }
