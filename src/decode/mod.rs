//! Body → rows: decompress the body, read its events with a strict one-pass JSON scanner,
//! validate and encode each against the live schema into its partition's rows, and say which
//! events were refused and why. Knows nothing of HTTP: the Kafka front decodes through here too.

mod batch;
mod body;
mod ids;
mod scan;
mod swar;

pub use batch::{BatchShape, EncodedBatch, EventRow, Placing, RawEvent, RejectedEvent, encode_batch};
pub use body::{Encoding, Format, decompress};
pub use ids::{IdSeed, quarantine_id};
pub use scan::{EventSchema, Scanner, SyntaxError};

use serde_json::Value;

use crate::schema::{EncodeContext, EventFields, Reason, Rejection, TableSchema};

/// Why a body as a whole cannot be decoded (a bad event alone is a [`RejectedEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the request body exceeds {limit} bytes once decompressed")]
    DecompressedTooLarge { limit: usize },
    #[error("the request holds more than {limit} events")]
    TooManyEvents { limit: usize },
    #[error("malformed JSON at line {line}, column {column}: {reason}")]
    MalformedJson { line: usize, column: usize, reason: String },
    #[error("the body cannot be decompressed: {0}")]
    BadEncoding(String),
}

/// Validates one event given as a value and appends its RowBinary row to `out`; returns the
/// mask of columns left to their DEFAULT. The request path reads events straight from the
/// body instead ([`encode_batch`]); this is the same path for one value (tests, conformance).
pub fn encode_event(
    schema: &TableSchema,
    event: &Value,
    ctx: &EncodeContext,
    out: &mut Vec<u8>,
) -> Result<u64, Rejection> {
    let text = event.to_string();
    let mut fields = EventFields::default();
    Scanner::new(&text)
        .event(EventSchema { schema, unknown: ctx.unknown_fields, order: None }, &mut fields)
        .map_err(|e| Rejection::new(Reason::Malformed, None, e.reason))?;
    schema.encode_fields(&fields, ctx, out).map(|encoded| encoded.omitted)
}

#[cfg(test)]
mod tests;
