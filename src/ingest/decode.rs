//! Decoding a body on the right thread: decompressed (its output counted against the
//! in-flight budget), encoded against the table's schema, its blocks made when its rows are
//! final, hashed when a request-level key compares bodies.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Body, IngestError, Pipeline};
use crate::clickhouse::writer::Writer;
use crate::config::DedupMode;
use crate::config::StreamName;
use crate::decode::{self, BatchShape, EncodedBatch, Encoding, Format};
use crate::schema::{EncodeContext, TableSchema, TimeWindow, Timestamp};
use crate::shed::budget::Budget;

/// Bodies larger than this are decoded on the blocking pool, off the async workers.
const INLINE_DECODE_BYTES: usize = 64 * 1024;

impl Pipeline {
    /// Decompresses and encodes a body, off the async workers when it is large or compressed.
    pub(super) async fn decode(&self, schema: &Arc<TableSchema>, body: Body) -> Result<EncodedBatch, IngestError> {
        let inline = body.raw.len() <= INLINE_DECODE_BYTES && body.encoding == Encoding::Identity;
        let work = {
            let (schema, budget, writer) = (Arc::clone(schema), Arc::clone(&self.budget), Arc::clone(&self.writer));
            let shape = BatchShape {
                partitions: self.coalescer.per_shard(),
                placing: self.placing()?,
                max_events: self.config.http.max_events_per_request,
                // Ids are what events are deduplicated and looked up by.
                keep_ids: self.idempotency.mode == DedupMode::Event || body.replayed,
                ids: body.ids,
                keep_raw: self.parks(&body.reading).then_some(self.config.table.quarantine_max_raw_bytes),
            };
            let now = body.received.unwrap_or_else(Timestamp::now);
            let listed = match &body.reading.columns {
                Some(columns) => Some(listed(&schema, columns)?),
                None => None,
            };
            // Every listed column exists (checked just above), so each name has its index.
            let order = (body.format == Format::JsonCompactEachRow).then(|| match &body.reading.columns {
                Some(columns) => columns.iter().filter_map(|c| schema.column_index(c)).collect(),
                None => Arc::clone(schema.insertable()),
            });
            let ctx = EncodeContext {
                now,
                unknown_fields: body.reading.unknown_fields.unwrap_or(self.config.table.unknown_fields),
                window: TimeWindow::of(&self.config.table),
                dialect: body.reading.dialect,
                listed,
                order,
            };
            let max_decompressed = self.config.http.max_decompressed_bytes;
            let stream = self.config.stream.clone();
            move || decode_body(body, &schema, &ctx, &shape, max_decompressed, (&budget, &stream), &writer)
        };
        if inline { work() } else { tokio::task::spawn_blocking(work).await.map_err(IngestError::internal)? }
    }
}

/// The columns an INSERT lists, as a mask over the table's columns.
fn listed(schema: &TableSchema, columns: &[String]) -> Result<Arc<[bool]>, IngestError> {
    let mut mask = vec![false; schema.columns().len()];
    for name in columns {
        let i = schema.column_index(name).ok_or_else(|| IngestError::NoSuchColumn(name.clone()))?;
        if std::mem::replace(&mut mask[i], true) {
            return Err(IngestError::DuplicateColumn(name.clone()));
        }
    }
    Ok(mask.into())
}

/// The decoding itself, on whichever thread: decompress (its output counts against the
/// budget), encode, make the blocks when the rows are final, hash when asked.
fn decode_body(
    body: Body,
    schema: &TableSchema,
    ctx: &EncodeContext,
    shape: &BatchShape,
    max_decompressed: usize,
    (budget, stream): (&Arc<Budget>, &StreamName),
    writer: &Writer,
) -> Result<EncodedBatch, IngestError> {
    let text = decode::decompress(body.raw, body.encoding, max_decompressed)?;
    let _text_lease = match body.encoding {
        Encoding::Identity => None,
        _ => Some(budget.try_take(text.len()).ok_or_else(|| IngestError::overloaded(stream, "in-flight bytes"))?),
    };
    let mut batch = decode::encode_batch(&text, body.format, schema, ctx, shape)?;
    if !shape.keep_ids {
        // The rows are final (nothing to deduplicate): their blocks can be made now.
        writer.make_blocks(schema, &mut batch.partitions);
    }
    if body.hash {
        batch.body_hash = hex::encode(Sha256::digest(&text));
    }
    Ok(batch)
}
