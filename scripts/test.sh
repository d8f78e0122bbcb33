#!/usr/bin/env bash
# The whole test suite. Installs what the tests need (ClickHouse 18.16, Redis, promtool, chdb)
# if absent, then runs every unit and integration test. Tests start their own servers on free
# ports and stop them by pid; nothing here touches a server someone else started.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo test --locked --all-targets "$@"
