#!/usr/bin/env bash
# The whole test suite. Installs what the tests need (ClickHouse 18.16, Redis, promtool, chdb,
# PostgreSQL, the Python client's packages) if absent, then runs every unit and integration test:
# the gateway's (`cargo test`, which also builds the binary the Python tests run), then the
# Python client's type check, lints and tests against that binary. Tests start their own servers
# on free ports and stop them by pid; nothing here touches a server someone else started.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo test --locked --all-targets "$@"
(
  cd clients/python
  python3 -m mypy --strict
  python3 -m ruff check .
  python3 -m ruff format --check .
  python3 -m pytest -q
)
