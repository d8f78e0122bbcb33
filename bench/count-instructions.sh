#!/usr/bin/env bash
# Counts the instructions a gateway build spends per small request: the A/B that the noisy
# side-by-side runs cannot settle (see docs/performance.md, "Comparing two builds by
# instructions"). Starts a private ClickHouse, runs BINARY under callgrind with instrumentation
# off, warms it up, counts REQUESTS POSTs of 10 seed-shaped events over CONNECTIONS keep-alive
# connections (idempotency off, one partition), and prints the total and the count per request.
# One connection makes every request its own INSERT and journal append; many (32, say) let
# requests share them, as under load, so the count is mostly per-request work. Needs valgrind
# (`apt-get install valgrind`), curl and python3. Run two builds in turn, twice each.
# PROTOCOL=1 sends the same events as ClickHouse's HTTP interface would get them (NDJSON to
# `/?query=INSERT INTO analytics.events_buffer FORMAT JSONEachRow`) instead of to /v1/events.
#   usage: [PROTOCOL=1] bench/count-instructions.sh BINARY [REQUESTS [CONNECTIONS]]
set -euo pipefail
bin=$(realpath "$1"); requests=${2:-400}; connections=${3:-1}
repo=$(cd "$(dirname "$0")/.." && pwd)
command -v callgrind_control >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
work=$(mktemp -d /tmp/buffergate-count.XXXXXX)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ch_http=$(free_port); ch_tcp=$(free_port); gw=$(free_port)
ch_pid=""; gw_pid=""
cleanup() {
    [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null && wait "$gw_pid" 2>/dev/null
    [ -n "$ch_pid" ] && kill "$ch_pid" 2>/dev/null && wait "$ch_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

"$repo/scripts/clickhouse-server.sh" "$work/clickhouse" "$ch_http" "$ch_tcp" >"$work/clickhouse.log" 2>&1 &
ch_pid=$!
for _ in $(seq 1 150); do curl -fsS "http://127.0.0.1:$ch_http/ping" >/dev/null 2>&1 && break; sleep 0.2; done
# Builds older than the confirmer's first look at start-up looked their first blocks up when
# they wrote within about two seconds of their ClickHouse's start (docs/performance-history.md):
# that work is not what is being counted.
sleep 5

# The default log filter: what a deployment runs, and what changes the count when it changes.
unset RUST_LOG
export BUFFERGATE_CLICKHOUSE_URL="http://127.0.0.1:$ch_http" BUFFERGATE_DATA_DIR="$work/gateway" \
    BUFFERGATE_LISTEN="127.0.0.1:$gw" BUFFERGATE_DEDUP=off BUFFERGATE_PARTITIONS=1
"$bin" migrate >"$work/migrate.log" 2>&1
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.%p" "$bin" serve >"$work/gateway.log" 2>&1 &
gw_pid=$!
for _ in $(seq 1 300); do curl -fsS "http://127.0.0.1:$gw/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

post() {
    python3 - "$gw" "$1" "$2" "$connections" "${PROTOCOL:-}" <<'PY'
import http.client, json, sys, threading
port, count, first, connections = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
protocol = sys.argv[5] == "1"
path = "/?query=INSERT%20INTO%20analytics.events_buffer%20FORMAT%20JSONEachRow" if protocol else "/v1/events"
kinds = ["page_view", "click", "signup", "purchase", "search", "add_to_cart", "logout", "share"]
def event(n):
    return {"event_id": f"00000000-0000-4000-8000-{n:012x}", "event_ts": "2024-05-01 10:00:00", "user_id": n,
            "event_type": kinds[n % 8], "payload": json.dumps({"page": f"/p/{n % 997}", "ref": f"campaign-{n % 31}", "ms": n % 5000}),
            "metadata": json.dumps({"source": "web", "ip": f"10.{n % 256}.1.2"})}
def body(events):
    if protocol:
        return "".join(json.dumps(e) + "\n" for e in events).encode()
    return json.dumps(events).encode()
bodies = [body([event(first + r * 10 + k) for k in range(10)]) for r in range(count)]
failed = []
def send(mine):
    connection = http.client.HTTPConnection("127.0.0.1", port)
    for body in mine:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            failed.append(answer.status)
            return
senders = [threading.Thread(target=send, args=(bodies[c::connections],)) for c in range(connections)]
for sender in senders:
    sender.start()
for sender in senders:
    sender.join()
if failed:
    sys.exit(f"requests were answered {failed}")
PY
}
post 50 0
callgrind_control -i on "$gw_pid" >/dev/null
post "$requests" 1000000
callgrind_control -i off "$gw_pid" >/dev/null
callgrind_control -d "$gw_pid" >/dev/null
sleep 1
[ -n "${KEEP:-}" ] && cat "$work"/callgrind.*.1 > "$KEEP" && cp "$work/gateway.log" "$KEEP.log"
# The dump's `totals:` line (its `summary:` line is written before the counts are known).
total=$(cat "$work"/callgrind.* | awk '/^totals:/ { s += $2 } END { print s }')
echo "$(basename "$bin"): $total instructions for $requests requests, $((total / requests)) per request"
