// Drives @clickhouse/client, unmodified, against a URL: runs the actions given as JSON in
// argv[2] and prints one JSON outcome per action, so the Rust test asserts on what the
// client saw and on what ClickHouse stored.
//   usage: node run.mjs '{"url": ..., "password": ..., "actions": [{"op": "ping"}, {"op": "insert", ...}]}'
import { createClient } from '@clickhouse/client'

const plan = JSON.parse(process.argv[2])
const client = createClient({
  url: plan.url,
  username: plan.username ?? 'default',
  password: plan.password ?? '',
  database: plan.database,
  log: { level: 127 }, // off: outcomes are printed below
})
const outcomes = []
for (const action of plan.actions) {
  try {
    if (action.op === 'ping') {
      const result = await client.ping()
      outcomes.push({ ok: result.success })
    } else if (action.op === 'insert') {
      const result = await client.insert({
        table: action.table,
        values: action.values,
        format: action.format,
        columns: action.columns,
        clickhouse_settings: action.settings,
      })
      outcomes.push({ ok: true, written: Number(result.summary?.written_rows ?? -1) })
    } else {
      outcomes.push({ ok: false, error: `unknown op ${action.op}` })
    }
  } catch (e) {
    outcomes.push({ ok: false, code: e.code ?? null, type: e.type ?? null, message: String(e.message).slice(0, 300) })
  }
}
await client.close()
console.log(JSON.stringify(outcomes))
