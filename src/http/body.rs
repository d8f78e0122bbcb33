//! Reading a request body off the wire: media type and encoding from the headers, and a cap on
//! the bytes read (decompression, with its own cap, is `decode`'s).

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;
use crate::decode::{Encoding, Format};

pub fn format_of(headers: &HeaderMap) -> Result<Format, ApiError> {
    let raw = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("<binary>")).unwrap_or("");
    let essence = raw.split(';').next().unwrap_or("").trim();
    let is = |names: &[&str]| names.iter().any(|name| essence.eq_ignore_ascii_case(name));
    if is(&["application/json"]) {
        Ok(Format::JsonArray)
    } else if is(&["application/x-ndjson", "application/ndjson", "application/jsonl", "application/jsonlines"]) {
        Ok(Format::Ndjson)
    } else {
        Err(ApiError::UnsupportedMediaType(raw.to_string()))
    }
}

pub fn encoding_of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let raw = headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("<binary>")).unwrap_or("");
    let coding = raw.trim();
    let is = |names: &[&str]| names.iter().any(|name| coding.eq_ignore_ascii_case(name));
    if is(&["", "identity"]) {
        Ok(Encoding::Identity)
    } else if is(&["gzip", "x-gzip"]) {
        Ok(Encoding::Gzip)
    } else if is(&["zstd"]) {
        Ok(Encoding::Zstd)
    } else {
        Err(ApiError::UnsupportedEncoding(raw.to_string()))
    }
}

/// Reads at most `limit` bytes of body within `timeout`; refuses early when Content-Length
/// announces more, without polling the body (so no `100 Continue` goes out). What is left
/// unread is the [`super::drain`] middleware's.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let announced =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let read = tokio::time::timeout(timeout, Limited::new(body, limit).collect());
    let after_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    match read.await.map_err(|_| ApiError::BodyTimeout { after_ms })? {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge { limit }),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json; charset=utf-8".parse().unwrap());
        assert_eq!(format_of(&h).unwrap(), Format::JsonArray);
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(matches!(format_of(&h), Err(ApiError::UnsupportedMediaType(_))));
        for (ndjson, format) in [("Application/X-NDJSON", Format::Ndjson), ("application/jsonl ; q=1", Format::Ndjson)]
        {
            h.insert(header::CONTENT_TYPE, ndjson.parse().unwrap());
            assert_eq!(format_of(&h).unwrap(), format, "{ndjson}");
        }
        h.insert(header::CONTENT_TYPE, " APPLICATION/JSON".parse().unwrap());
        assert_eq!(format_of(&h).unwrap(), Format::JsonArray);
        assert_eq!(encoding_of(&h).unwrap(), Encoding::Identity, "no Content-Encoding");
        for (coding, encoding) in [
            ("identity", Encoding::Identity),
            ("GZip", Encoding::Gzip),
            ("x-gzip", Encoding::Gzip),
            (" zstd ", Encoding::Zstd),
        ] {
            h.insert(header::CONTENT_ENCODING, coding.parse().unwrap());
            assert_eq!(encoding_of(&h).unwrap(), encoding, "{coding}");
        }
        h.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert!(matches!(encoding_of(&h), Err(ApiError::UnsupportedEncoding(_))));
    }
}
