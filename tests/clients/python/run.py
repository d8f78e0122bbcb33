"""Drives clickhouse-connect, unmodified, against a gateway: connects (get_client), runs the
actions given as JSON in argv[1] and prints a JSON list with one outcome per action, so the
Rust test asserts on what the client saw and on what ClickHouse stored.

usage: python3 run.py '{"host": ..., "port": ..., "password": ..., "actions": [{"op": "raw_insert", ...}]}'
"""

import json
import sys

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

plan = json.loads(sys.argv[1])
outcomes: list[dict[str, object]] = []
try:
    client = clickhouse_connect.get_client(
        host=plan["host"],
        port=plan["port"],
        username=plan.get("username", "default"),
        password=plan.get("password", ""),
    )
    outcomes.append({"ok": True, "version": client.server_version})
except ClickHouseError as e:
    print(json.dumps([{"ok": False, "connect": str(e)[:300]}]))
    sys.exit(0)
for action in plan["actions"]:
    try:
        if action["op"] == "raw_insert":
            summary = client.raw_insert(
                action["table"],
                action.get("columns"),
                action["body"].encode(),
                settings=action.get("settings"),
                fmt=action.get("format", "JSONEachRow"),
            )
            outcomes.append({"ok": True, "written": int(summary.summary.get("written_rows", -1))})
        elif action["op"] == "query":
            outcomes.append({"ok": True, "rows": [list(r) for r in client.query(action["sql"]).result_rows]})
        else:
            outcomes.append({"ok": False, "error": "unknown op " + action["op"]})
    except ClickHouseError as e:
        text = str(e)
        code = text.split("code: ", 1)[1].split(",", 1)[0] if "code: " in text else None
        outcomes.append({"ok": False, "code": code, "message": text[:300]})
print(json.dumps(outcomes))
