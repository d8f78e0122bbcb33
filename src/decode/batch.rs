//! A request body → its events' rows, split by partition: each event is read from the text,
//! validated and encoded straight into its partition's rows before the next is read.

use serde::Serialize;

use super::DecodeError;
use super::body::Format;
use super::ids::IdSeed;
use super::scan::{EventSchema, Scanner, SyntaxError};
use crate::idempotency::Idempotency;
use crate::rows::PartitionRows;
use crate::schema::sharding::Placement;
use crate::schema::{EncodeContext, Encoded, EventFields, Reason, Rejection, TableSchema};

#[derive(Debug, Serialize)]
pub struct RejectedEvent {
    /// Position of the event in the request (0-based).
    pub index: usize,
    /// The offending field; `null` when the event as a whole is wrong. At most [`ECHO_BYTES`].
    pub field: Option<String>,
    /// Why; a value it quotes is cut to [`ECHO_BYTES`] as a whole.
    pub error: String,
    /// The kind of reason, as a stable code.
    pub reason: Reason,
    /// The event as sent, kept when the stream parks rejected events ([`BatchShape::keep_raw`]).
    #[serde(skip)]
    pub raw: Option<RawEvent>,
    /// The event's own id (its `id_column` field), when it sent one that is a UUID and not
    /// what was refused.
    #[serde(skip)]
    pub id: Option<String>,
}

/// A rejected event's text as sent, cut to a bound.
#[derive(Debug, Clone)]
pub struct RawEvent {
    /// At most the bound, cut on a character boundary.
    pub text: String,
    /// The length of the whole event, in bytes.
    pub bytes: usize,
}

impl RawEvent {
    fn of(text: &str, limit: usize) -> Self {
        Self { text: cut(text, limit).to_string(), bytes: text.len() }
    }
}

/// The longest start of `text` within `limit` bytes that ends on a character boundary.
fn cut(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// The most of a producer's own text a rejection echoes back, per field name and per reason:
/// a 10 MiB request of bad values must not come back as a 10 MiB answer, nor be stored whole
/// as the replayed answer of an `Idempotency-Key`, nor go whole into a dead letter's header.
pub const ECHO_BYTES: usize = 256;

impl RejectedEvent {
    fn new(index: usize, rejection: Rejection) -> Self {
        let Rejection { field, error, reason } = rejection;
        Self { index, field: field.map(echo), error: echo(error), reason, raw: None, id: None }
    }

    /// A rejection of event `index` for `error`, as the decoder makes them (bounded).
    #[cfg(test)]
    pub(crate) fn for_test(index: usize, error: String) -> Self {
        Self::new(index, Rejection::new(Reason::InvalidValue, None, error))
    }
}

/// `text` cut to [`ECHO_BYTES`] on a character boundary, marked as cut with its full length.
fn echo(mut text: String) -> String {
    if text.len() <= ECHO_BYTES {
        return text;
    }
    let full = text.len();
    text.truncate(cut(&text, ECHO_BYTES).len());
    text.push_str(&format!("… ({full} bytes)"));
    text
}

/// Where an accepted event's row went, to filter duplicates out afterwards.
#[derive(Debug)]
pub struct EventRow {
    /// The idempotency key of the event's own id (`id_column`), when it sent one
    /// ([`Idempotency::event_key`]); taken by the reservation.
    pub key: Option<Vec<u8>>,
    pub partition: usize,
    pub chunk: usize,
    pub range: std::ops::Range<usize>,
    /// What its encoding told (column list, id, time), to carry with the row.
    pub encoded: Encoded,
}

/// A request's events, encoded and split by partition.
#[derive(Debug)]
pub struct EncodedBatch {
    pub partitions: Vec<PartitionRows>,
    /// One per accepted event, in order (kept only when events are deduplicated).
    pub events: Vec<EventRow>,
    pub accepted: usize,
    pub rejected: Vec<RejectedEvent>,
    /// SHA-256 of the (decompressed) body, hex: what `Idempotency-Key` compares (empty when the
    /// request has no such key).
    pub body_hash: String,
}

impl EncodedBatch {
    /// Keeps only the accepted events for which `keep` is true.
    pub fn retain(&mut self, keep: &[bool]) {
        let fresh = (0..self.partitions.len()).map(|_| PartitionRows::default()).collect();
        let old = std::mem::replace(&mut self.partitions, fresh);
        let mut events = Vec::new();
        for (event, &kept) in std::mem::take(&mut self.events).into_iter().zip(keep) {
            if !kept {
                continue;
            }
            let chunk = &old[event.partition].chunks[event.chunk];
            let (index, range) = self.partitions[event.partition].push(&event.encoded, &chunk.data[event.range]);
            events.push(EventRow { chunk: index, range, ..event });
        }
        self.accepted = events.len();
        self.events = events;
    }
}

/// Which shard an event's row goes to.
#[derive(Debug, Clone)]
pub enum Placing {
    /// Every event of the request to this shard (one shard, or `rand()`).
    Shard(usize),
    /// Each event to the shard of its sharding-key value, as the Distributed table would.
    ByKey(Placement),
}

/// What `encode_batch` needs to know besides the schema.
#[derive(Debug, Clone)]
pub struct BatchShape {
    /// Partitions per shard.
    pub partitions: usize,
    pub placing: Placing,
    pub max_events: usize,
    /// Remember each event's id and row position, for deduplication.
    pub keep_ids: bool,
    /// Where events without an id get theirs from (a fresh UUIDv7 each when `None`).
    pub ids: Option<IdSeed>,
    /// Keep each rejected event's text, up to this many bytes, and its id (the stream parks
    /// rejected events). Then a line of NDJSON that does not parse is rejected alone, as
    /// `malformed`, instead of refusing the body: it is parked with the others.
    pub keep_raw: Option<usize>,
}

/// Parses the body event by event and encodes each straight into its partition's rows; no
/// event outlives its own encoding, so memory stays proportional to the encoded output.
pub fn encode_batch(
    text: &[u8],
    format: Format,
    schema: &TableSchema,
    ctx: &EncodeContext,
    shape: &BatchShape,
) -> Result<EncodedBatch, DecodeError> {
    match format {
        Format::JsonOrLines => match encode_as(text, Format::JsonArray, schema, ctx, shape) {
            // An array that does not parse is malformed as a whole, not lines of events (each
            // of its lines would be rejected alone where malformed lines are parked).
            Err(DecodeError::MalformedJson { .. }) if several_lines(text) && !starts_array(text) => {
                encode_as(text, Format::Ndjson, schema, ctx, shape)
            }
            other => other,
        },
        Format::JsonEachRow => {
            encode_as(text, if starts_array(text) { Format::JsonArray } else { Format::Ndjson }, schema, ctx, shape)
        }
        format => encode_as(text, format, schema, ctx, shape),
    }
}

/// [`encode_batch`] in one format, `JsonArray` or `Ndjson`.
fn encode_as(
    text: &[u8],
    format: Format,
    schema: &TableSchema,
    ctx: &EncodeContext,
    shape: &BatchShape,
) -> Result<EncodedBatch, DecodeError> {
    let per_shard = shape.partitions.max(1);
    let shards = match &shape.placing {
        Placing::Shard(shard) => shard + 1,
        Placing::ByKey(placement) => placement.shards().max(1),
    };
    let partitions = per_shard * shards;
    let mut batch = EncodedBatch {
        // RowBinary is usually well under half the size of the JSON it came from: an
        // underestimate costs one doubling, an overestimate would hold memory not accounted for.
        partitions: (0..partitions).map(|_| PartitionRows::with_expected_bytes(text.len() / 3 / per_shard)).collect(),
        events: Vec::new(),
        accepted: 0,
        rejected: Vec::new(),
        body_hash: String::new(),
    };
    let mut index = 0usize;
    // Rows placed by key are encoded here first: their shard is known once they are.
    let mut scratch = Vec::new();
    let mut take = |item: Item<'_, '_>| {
        let (fields, raw) = match item {
            Item::Event(fields, raw) => (fields, raw),
            Item::Malformed(raw, rejection) => {
                let mut rejected = RejectedEvent::new(index, rejection);
                rejected.raw = shape.keep_raw.map(|limit| RawEvent::of(raw, limit));
                batch.rejected.push(rejected);
                index += 1;
                return;
            }
        };
        // One partition per shard (the default on small hosts) needs no key hashed.
        let within =
            if per_shard == 1 { 0 } else { (schema.partition_hash(fields, index as u64) % per_shard as u64) as usize };
        let derived = shape.ids.map(|seed| seed.id(index));
        let placed = match &shape.placing {
            Placing::Shard(shard) => {
                let partition = shard * per_shard + within;
                batch.partitions[partition]
                    .encode(|out| schema.encode_fields_with_id(fields, ctx, derived, out))
                    .map(|(chunk, range, encoded)| (partition, chunk, range, encoded))
            }
            Placing::ByKey(placement) => {
                scratch.clear();
                schema.encode_fields_with_id(fields, ctx, derived, &mut scratch).and_then(|encoded| {
                    let key = encoded.shard_key.ok_or_else(|| {
                        Rejection::new(Reason::UnwritableColumn, None, "the event has no sharding-key value")
                    })?;
                    let partition = placement.shard_of(key) * per_shard + within;
                    let (chunk, range) = batch.partitions[partition].push(&encoded, &scratch);
                    Ok((partition, chunk, range, encoded))
                })
            }
        };
        match placed {
            Ok((partition, chunk, range, encoded)) => {
                batch.accepted += 1;
                if shape.keep_ids {
                    // A derived id is a key like a sent one: a message read again is recognised.
                    let key = schema
                        .event_id(fields)
                        .map(|id| Idempotency::event_key(&id))
                        .or_else(|| derived.map(|id| id.as_bytes().to_vec()));
                    batch.events.push(EventRow { key, partition, chunk, range, encoded });
                }
            }
            Err(rejection) => {
                let mut rejected = RejectedEvent::new(index, rejection);
                if let Some(limit) = shape.keep_raw {
                    rejected.raw = Some(RawEvent::of(raw, limit));
                    // Only an id that is one: "undefined" or "" sent by a buggy producer would
                    // give all its rejected events one quarantine id, parked once for all.
                    let about_id = rejected.field.is_some() && rejected.field.as_deref() == schema.id_column();
                    rejected.id = schema
                        .event_id(fields)
                        .filter(|id| !about_id && uuid::Uuid::parse_str(id).is_ok())
                        .map(std::borrow::Cow::into_owned);
                }
                batch.rejected.push(rejected);
            }
        }
        index += 1;
    };
    let reader = Reader {
        schema: EventSchema { schema, unknown: ctx.unknown_fields, order: ctx.order.as_deref() },
        max_events: shape.max_events,
        alone: shape.keep_raw.is_some(),
    };
    match format {
        Format::JsonArray => reader.array(text, &mut take)?,
        Format::Ndjson | Format::JsonOrLines | Format::JsonEachRow | Format::JsonCompactEachRow => {
            reader.ndjson(text, &mut take)?;
        }
    }
    Ok(batch)
}

/// Whether a body's first character (after whitespace) opens an array.
fn starts_array(text: &[u8]) -> bool {
    text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// Whether a body has more than one line that is not blank.
fn several_lines(text: &[u8]) -> bool {
    text.split(|&b| b == b'\n').filter(|l| !l.iter().all(u8::is_ascii_whitespace)).nth(1).is_some()
}

/// One event as read, handed to the encoder with its text as sent.
enum Item<'f, 'a> {
    Event(&'f EventFields<'a>, &'a str),
    /// A line of NDJSON that does not parse, rejected alone.
    Malformed(&'a str, Rejection),
}

/// Reads a body's events one at a time, each straight into its fields (no value tree), and
/// hands each to `take` before reading the next.
struct Reader<'s> {
    schema: EventSchema<'s>,
    max_events: usize,
    /// A line of NDJSON that does not parse is rejected alone (else it refuses the body).
    alone: bool,
}

impl Reader<'_> {
    /// A JSON array of events, or a single event object.
    fn array<'a>(&self, text: &'a [u8], take: &mut dyn FnMut(Item<'_, 'a>)) -> Result<(), DecodeError> {
        let at = |e: SyntaxError| {
            let (line, column) = e.position(text);
            DecodeError::MalformedJson { line, column, reason: e.reason.to_string() }
        };
        let text = utf8(text).map_err(at)?;
        let mut scanner = Scanner::new(text);
        let mut fields = EventFields::default();
        scanner.ws();
        match scanner.peek() {
            Some(b'[') => {
                scanner.bump();
                scanner.ws();
                let mut more = scanner.peek() != Some(b']');
                if !more {
                    scanner.bump();
                }
                let mut count = 0usize;
                while more {
                    count += 1;
                    if count > self.max_events {
                        return Err(DecodeError::TooManyEvents { limit: self.max_events });
                    }
                    let start = scanner.offset();
                    scanner.event(self.schema, &mut fields).map_err(at)?;
                    take(Item::Event(&fields, &text[start..scanner.offset()]));
                    more = scanner.next_element(b']').map_err(at)?;
                }
            }
            Some(b'{') => {
                let start = scanner.offset();
                scanner.event(self.schema, &mut fields).map_err(at)?;
                take(Item::Event(&fields, &text[start..scanner.offset()]));
            }
            None => return Err(at(scanner.error("EOF while parsing a value"))),
            Some(_) => return Err(at(scanner.error("expected an array of event objects"))),
        }
        scanner.ws();
        if scanner.at_end() { Ok(()) } else { Err(at(scanner.error("trailing characters"))) }
    }

    /// One event per line (blank lines skipped), read in one pass over the body: UTF-8 checked
    /// once, each line's end found by the scanner as it finishes the event. Splitting into
    /// lines first cost a fifth more instructions per event than a JSON array (callgrind,
    /// 1,000-event bodies).
    fn ndjson<'a>(&self, text: &'a [u8], take: &mut dyn FnMut(Item<'_, 'a>)) -> Result<(), DecodeError> {
        let at = |e: SyntaxError| {
            let (line, column) = e.position(text);
            DecodeError::MalformedJson { line, column, reason: e.reason.to_string() }
        };
        let whole = utf8(text).map_err(at)?;
        let mut scanner = Scanner::new(whole);
        let mut fields = EventFields::default();
        let mut count = 0usize;
        loop {
            scanner.ws();
            if scanner.at_end() {
                return Ok(());
            }
            count += 1;
            if count > self.max_events {
                return Err(DecodeError::TooManyEvents { limit: self.max_events });
            }
            let start = scanner.offset();
            let read = scanner.event(self.schema, &mut fields).map(|()| scanner.offset());
            match read.and_then(|end| scanner.line_end().map(|()| end)) {
                Ok(end) => take(Item::Event(&fields, &whole[start..end])),
                Err(error) if self.alone => {
                    let end = scanner.skip_line(start);
                    let reason = if error.offset < end {
                        let at = error.offset - start + 1;
                        format!("malformed JSON at byte {at} of the event: {}", error.reason)
                    } else {
                        format!("malformed JSON: the event is not complete at the end of its line ({})", error.reason)
                    };
                    take(Item::Malformed(&whole[start..end], Rejection::new(Reason::Malformed, None, reason)));
                }
                Err(error) => return Err(at(error)),
            }
        }
    }
}

/// The body as text: UTF-8 is checked once, up front, rather than string by string.
fn utf8(text: &[u8]) -> Result<&str, SyntaxError> {
    std::str::from_utf8(text)
        .map_err(|e| SyntaxError { offset: e.valid_up_to(), reason: "invalid UTF-8 (bodies are UTF-8 JSON)" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UnknownFields;
    use crate::schema::{ColumnInfo, SpecialColumns, Timestamp};

    fn schema() -> TableSchema {
        let special =
            SpecialColumns { id: "id".into(), timestamp: "ts".into(), partition_key: "k".into(), sharding: None };
        let info = |n: &str, t: &str| ColumnInfo { name: n.into(), type_text: t.into(), default_kind: String::new() };
        TableSchema::new(1, "d", "t", vec![info("k", "UInt32"), info("s", "String")], &special)
    }

    /// A shape that keeps rejected events' text (up to `keep` bytes), as a parking stream's.
    fn parking(keep: usize) -> BatchShape {
        BatchShape {
            partitions: 1,
            placing: Placing::Shard(0),
            max_events: 10,
            keep_ids: false,
            ids: None,
            keep_raw: Some(keep),
        }
    }

    fn run(text: &str, format: Format, max: usize) -> Result<EncodedBatch, DecodeError> {
        let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
        encode_batch(
            text.as_bytes(),
            format,
            &schema(),
            &ctx,
            &BatchShape {
                partitions: 4,
                placing: Placing::Shard(0),
                max_events: max,
                keep_ids: true,
                ids: None,
                keep_raw: None,
            },
        )
    }

    #[test]
    fn rows_go_to_the_shard_of_their_key_as_a_distributed_table_places_them() {
        use crate::config::KeyFunction;
        use crate::schema::sharding::Placement;
        let special = SpecialColumns {
            id: String::new(),
            timestamp: String::new(),
            partition_key: "k".into(),
            sharding: Some(("k".into(), KeyFunction::Identity)),
        };
        let info = |n: &str, t: &str| ColumnInfo { name: n.into(), type_text: t.into(), default_kind: String::new() };
        let schema = TableSchema::new(1, "d", "t", vec![info("k", "UInt32"), info("s", "String")], &special);
        let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
        // Weights 1 and 2: k % 3 = 0 on shard 0, 1 and 2 on shard 1; two partitions per shard.
        let shape = BatchShape {
            partitions: 2,
            placing: Placing::ByKey(Placement::new(&[1, 2])),
            max_events: 100,
            keep_ids: true,
            ids: None,
            keep_raw: None,
        };
        let text = r#"[{"k": 0}, {"k": 1}, {"k": 2}, {"k": 3}, {"k": 4}, {"k": 6}, {"s": "no key: 0"}]"#;
        let batch = encode_batch(text.as_bytes(), Format::JsonArray, &schema, &ctx, &shape).unwrap();
        assert_eq!(batch.partitions.len(), 4);
        let on_shard = |s: usize| batch.partitions[s * 2..s * 2 + 2].iter().map(PartitionRows::rows).sum::<usize>();
        assert_eq!((on_shard(0), on_shard(1)), (4, 3), "0, 3, 6 and the default 0 on shard 0");
        let shards: Vec<usize> = batch.events.iter().map(|e| e.partition / 2).collect();
        assert_eq!(shards, [0, 1, 1, 0, 1, 0, 0]);
    }

    #[test]
    fn partial_rejection_keeps_the_rest() {
        let batch = run(r#"[{"k": 1, "s": "a"}, {"k": -1}, 7, {"k": 2}]"#, Format::JsonArray, 10).unwrap();
        assert_eq!(batch.accepted, 2);
        let rejected: Vec<_> = batch.rejected.iter().map(|r| (r.index, r.field.clone())).collect();
        assert_eq!(rejected, vec![(1, Some("k".to_string())), (2, None)]);
        assert_eq!(batch.partitions.iter().map(PartitionRows::rows).sum::<usize>(), 2);
    }

    #[test]
    fn same_key_same_partition_and_keys_spread() {
        let used = |batch: &EncodedBatch| batch.partitions.iter().filter(|p| p.rows() > 0).count();
        let batch = run(r#"[{"k": 9}, {"k": 9}, {"k": 9}]"#, Format::JsonArray, 10).unwrap();
        assert_eq!(used(&batch), 1, "one key, one partition");
        let many: Vec<String> = (0..64).map(|k| format!(r#"{{"k": {k}}}"#)).collect();
        let batch = run(&format!("[{}]", many.join(",")), Format::JsonArray, 100).unwrap();
        assert_eq!(used(&batch), 4, "64 keys reach all 4 partitions");
        for (partition, rows) in batch.partitions.iter().enumerate() {
            let again = run(&format!("[{}]", many.join(",")), Format::JsonArray, 100).unwrap();
            assert_eq!(again.partitions[partition].rows(), rows.rows(), "stable across requests");
        }
    }

    #[test]
    fn malformed_json_reports_position() {
        let Err(DecodeError::MalformedJson { line, column, .. }) =
            run("[{\"k\": 1},\n {\"k\": }]", Format::JsonArray, 10)
        else {
            panic!("expected malformed_json")
        };
        assert_eq!((line, column), (2, 8));
        let Err(DecodeError::MalformedJson { line, .. }) = run("{\"k\": 1}\n\n{oops}\n", Format::Ndjson, 10) else {
            panic!("expected malformed_json")
        };
        assert_eq!(line, 3);
    }

    #[test]
    fn a_malformed_line_is_rejected_alone_where_it_can_be_parked() {
        let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
        let shape = |keep_raw: Option<usize>| BatchShape { keep_raw, ..parking(0) };
        let text =
            "{\"k\": 1}\n{\"k\": 2, \"s\": \"é\u{e9}é\n{\"k\": 3} trailing\n[]\n{\"k\": 4, \"x\": 1}\n{\"k\": 5}";
        let batch = encode_batch(text.as_bytes(), Format::Ndjson, &schema(), &ctx, &shape(Some(8))).unwrap();
        assert_eq!(batch.accepted, 2, "the first and the last lines");
        let got: Vec<_> = batch
            .rejected
            .iter()
            .map(|r| (r.index, r.reason, r.raw.as_ref().map(|raw| (raw.text.as_str(), raw.bytes))))
            .collect();
        assert_eq!(
            got,
            [
                (1, Reason::Malformed, Some(("{\"k\": 2,", 21))),
                (2, Reason::Malformed, Some(("{\"k\": 3}", 17))),
                (3, Reason::NotAnEvent, Some(("[]", 2))),
                (4, Reason::UnknownField, Some(("{\"k\": 4,", 16))),
            ],
            "cut at 8 bytes on a character boundary, with the full length"
        );
        assert!(
            batch.rejected[1].error.starts_with("malformed JSON at byte 10 of the event"),
            "{}",
            batch.rejected[1].error
        );
        // An event left open: cut at the end of its own line, the next lines read on their own.
        for (open, expected) in [("{\"k\": 1\n{\"k\": 2}\n", 1), ("{\"k\":\n{\"k\": 2}\n{\"k\": 3}", 2)] {
            let batch = encode_batch(open.as_bytes(), Format::Ndjson, &schema(), &ctx, &shape(Some(64))).unwrap();
            assert_eq!((batch.accepted, batch.rejected.len()), (expected, 1), "{open:?}");
            let cut = batch.rejected[0].raw.as_ref().map(|r| r.text.as_str());
            assert!(cut.is_some_and(|raw| !raw.contains('\n')), "{cut:?}");
            assert!(
                batch.rejected[0].error.contains("not complete at the end of its line"),
                "{}",
                batch.rejected[0].error
            );
        }
        let refused = encode_batch(text.as_bytes(), Format::Ndjson, &schema(), &ctx, &shape(None));
        assert!(matches!(refused, Err(DecodeError::MalformedJson { line: 2, .. })), "nowhere to park it: {refused:?}");
        let array = encode_batch(b"[{\"k\": 1}, {oops}]", Format::JsonArray, &schema(), &ctx, &shape(Some(8)));
        assert!(matches!(array, Err(DecodeError::MalformedJson { .. })), "an array cannot be cut into events");
    }

    #[test]
    fn a_rejected_event_keeps_its_own_id_only_when_it_is_one() {
        let special =
            SpecialColumns { id: "id".into(), timestamp: String::new(), partition_key: String::new(), sharding: None };
        let info = |n: &str, t: &str| ColumnInfo { name: n.into(), type_text: t.into(), default_kind: String::new() };
        let schema = TableSchema::new(1, "d", "t", vec![info("id", "UUID"), info("k", "UInt8")], &special);
        let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
        let shape = parking(64);
        let uuid = "0190a3c4-0000-7000-8000-000000000001";
        let text = format!(
            r#"[{{"id": "{uuid}", "k": 300}}, {{"id": "undefined", "k": 300}}, {{"id": "undefined", "k": 1}}]"#
        );
        let batch = encode_batch(text.as_bytes(), Format::JsonArray, &schema, &ctx, &shape).unwrap();
        let ids: Vec<Option<&str>> = batch.rejected.iter().map(|r| r.id.as_deref()).collect();
        assert_eq!(ids, [Some(uuid), None, None], "not a UUID, or the very field refused: no id of its own");
        assert_eq!(batch.rejected[2].field.as_deref(), Some("id"));
    }

    #[test]
    fn limits_and_shapes() {
        assert!(matches!(run("[{}, {}, {}]", Format::JsonArray, 2), Err(DecodeError::TooManyEvents { limit: 2 })));
        assert!(matches!(run("{}\n{}\n{}\n", Format::Ndjson, 2), Err(DecodeError::TooManyEvents { .. })));
        assert_eq!(run(r#"{"k": 3}"#, Format::JsonArray, 1).unwrap().accepted, 1);
        assert!(matches!(run(r#""text""#, Format::JsonArray, 1), Err(DecodeError::MalformedJson { .. })));
        assert_eq!(run("[]", Format::JsonArray, 1).unwrap().accepted, 0);
    }

    #[test]
    fn rejections_echo_a_bounded_part_of_what_was_sent() {
        assert_eq!(echo("short".into()), "short");
        let long = echo("é".repeat(200));
        assert!(long.len() <= ECHO_BYTES + 20, "{}", long.len());
        assert!(long.starts_with("ééé") && long.ends_with("… (400 bytes)"), "{long}");
        let name = "x".repeat(10_000);
        let batch = run(&format!(r#"[{{"{name}": 1}}]"#), Format::JsonArray, 10).unwrap();
        let rejected = &batch.rejected[0];
        assert!(rejected.field.as_ref().is_some_and(|f| f.len() < 300), "{:?}", rejected.field);
        assert!(rejected.error.len() < 300, "{}", rejected.error);
    }

    #[test]
    fn json_or_lines_reads_several_lines_as_ndjson() {
        assert_eq!(run(r#"[{"k": 1}, {"k": 2}]"#, Format::JsonOrLines, 10).unwrap().accepted, 2);
        assert_eq!(run(r#"{"k": 1}"#, Format::JsonOrLines, 10).unwrap().accepted, 1);
        assert_eq!(run("{\"k\": 1}\n{\"k\": 2}\n", Format::JsonOrLines, 10).unwrap().accepted, 2);
        assert!(
            matches!(run("{\"k\": 1}\n\n", Format::JsonOrLines, 10), Ok(batch) if batch.accepted == 1),
            "one line and blanks: JSON"
        );
        assert!(matches!(run("{oops}\n", Format::JsonOrLines, 10), Err(DecodeError::MalformedJson { .. })));
        let ctx = EncodeContext::new(Timestamp::now(), UnknownFields::Reject);
        let parking = parking(64);
        let pretty = b"[\n  {\"k\": 1},\n  {oops}\n]\n";
        let read = encode_batch(pretty, Format::JsonOrLines, &schema(), &ctx, &parking);
        assert!(matches!(read, Err(DecodeError::MalformedJson { .. })), "an array is not read as lines: {read:?}");
        let lines = encode_batch(b"{\"k\": 1}\n{oops}\n", Format::JsonOrLines, &schema(), &ctx, &parking).unwrap();
        assert_eq!((lines.accepted, lines.rejected.len()), (1, 1), "lines are, the bad one parked");
        assert!(several_lines(b"{}\n{}\n"));
        assert!(!several_lines(b"{}\n\n"));
    }
}
