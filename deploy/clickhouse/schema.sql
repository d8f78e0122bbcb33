-- The seed schema for a modern ClickHouse (20.x+ for DateTime64, 21.x+ for Map), as
-- `buffergate migrate` creates it with its default configuration. On 18.x, migrate uses
-- DateTime for event_ts and String (JSON text) for metadata, and turns on
-- allow_experimental_low_cardinality_type.
--
-- Buffer thresholds apply per layer: this Buffer holds at most 16 × 128 MiB = 2 GiB.
-- Attach materialized views to events_raw, never to events_buffer: a view that reads FROM the
-- Buffer fires on every insert into it, one that reads FROM the destination fires per flush.

CREATE DATABASE IF NOT EXISTS analytics;

CREATE TABLE IF NOT EXISTS analytics.events_raw
(
    `event_id` UUID,
    `event_ts` DateTime64(3),
    `user_id` UInt64,
    `event_type` LowCardinality(String),
    `payload` String,
    `metadata` Map(String, String)
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(event_ts)
ORDER BY (event_type, event_ts, user_id);

-- Same columns as the destination, always: a column that differs is cast or fails at flush.
CREATE TABLE IF NOT EXISTS analytics.events_buffer AS analytics.events_raw
ENGINE = Buffer('analytics', 'events_raw', 16, 10, 60, 100000, 1000000, 10485760, 134217728);

-- Example rollup: the view reads FROM the destination, so it runs once per Buffer flush on
-- large blocks, never on each small insert into the Buffer.
CREATE TABLE IF NOT EXISTS analytics.events_per_type_hourly
(
    `hour` DateTime,
    `event_type` LowCardinality(String),
    `events` UInt64
)
ENGINE = SummingMergeTree()
ORDER BY (event_type, hour);

CREATE MATERIALIZED VIEW IF NOT EXISTS analytics.events_per_type_hourly_mv
TO analytics.events_per_type_hourly
AS SELECT toStartOfHour(event_ts) AS hour, event_type, count() AS events
FROM analytics.events_raw
GROUP BY hour, event_type;
