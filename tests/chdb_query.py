"""Runs statements on chdb (ClickHouse 26.x embedded in Python) for the conformance tests.

usage: chdb_query.py SESSION_DIR < [{"sql": "...", "format": "JSONEachRow"}, ...]
prints a JSON array with each statement's output text, or exits 1 with the error.
"""
import json
import sys

from chdb import session

statements = json.load(sys.stdin)
s = session.Session(sys.argv[1])
outputs = []
for statement in statements:
    try:
        result = s.query(statement["sql"], statement.get("format", "CSV"))
    except Exception as e:  # chdb raises its own error types
        print(f"{statement['sql']}\n-> {e}", file=sys.stderr)
        sys.exit(1)
    outputs.append(result.bytes().decode() if result is not None else "")
print(json.dumps(outputs))
