"""Inserts JSONEachRow rows into chdb (ClickHouse 26.x embedded in Python) one INSERT each, as
a ClickHouse server would take them over HTTP, and reads back what it stored: the reference
side of the ClickHouse-protocol differential test.

usage: chdb_each_row.py SESSION_DIR < {"ddl": ..., "table": ..., "settings": "k=v, ...",
                                       "rows": ["{...}", ...], "select": "SELECT ... FORMAT JSONEachRow"}
prints {"inserts": [{"ok": true} | {"ok": false, "code": N}, ...], "stored": "<select output>"}
"""
import json
import re
import sys

from chdb import session

plan = json.load(sys.stdin)
s = session.Session(sys.argv[1])
s.query(plan["ddl"])
settings = f" SETTINGS {plan['settings']}" if plan.get("settings") else ""
inserts = []
for row in plan["rows"]:
    try:
        s.query(f"INSERT INTO {plan['table']}{settings} FORMAT JSONEachRow {row}")
        inserts.append({"ok": True})
    except Exception as e:  # chdb raises its own error types
        found = re.search(r"Code: (\d+)", str(e))
        inserts.append({"ok": False, "code": int(found.group(1)) if found else None, "message": str(e)[:200]})
stored = s.query(plan["select"], "JSONEachRow").bytes().decode()
print(json.dumps({"inserts": inserts, "stored": stored}))
