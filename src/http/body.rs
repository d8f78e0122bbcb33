//! Reading a request body safely: media type and encoding checks, a cap on the bytes read off
//! the wire and another on the bytes after decompression (so a gzip bomb stops at the limit).

use std::io::Read;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;

/// How the events are laid out in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: an array of event objects (or one object).
    JsonArray,
    /// `application/x-ndjson`: one event object per line.
    Ndjson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

pub fn format_of(headers: &HeaderMap) -> Result<Format, ApiError> {
    let raw = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("<binary>")).unwrap_or("");
    let essence = raw.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(Format::JsonArray),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" | "application/jsonlines" => {
            Ok(Format::Ndjson)
        }
        _ => Err(ApiError::UnsupportedMediaType(raw.to_string())),
    }
}

pub fn encoding_of(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let raw = headers.get(header::CONTENT_ENCODING).map(|v| v.to_str().unwrap_or("<binary>")).unwrap_or("");
    match raw.trim().to_ascii_lowercase().as_str() {
        "" | "identity" => Ok(Encoding::Identity),
        "gzip" | "x-gzip" => Ok(Encoding::Gzip),
        "zstd" => Ok(Encoding::Zstd),
        _ => Err(ApiError::UnsupportedEncoding(raw.to_string())),
    }
}

/// Reads at most `limit` bytes of body; refuses early when Content-Length announces more.
pub async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let announced =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::BodyTooLarge { limit }),
        Err(e) => Err(ApiError::BodyRead(e.to_string())),
    }
}

/// Decompresses `raw`, reading at most `limit` bytes of output.
pub fn decompress(raw: Bytes, encoding: Encoding, limit: usize) -> Result<Bytes, ApiError> {
    let reader: Box<dyn Read> = match encoding {
        Encoding::Identity => {
            return if raw.len() > limit { Err(ApiError::DecompressedTooLarge { limit }) } else { Ok(raw) };
        }
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&raw[..])),
        Encoding::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(&raw[..]).map_err(|e| ApiError::BadEncoding(e.to_string()))?)
        }
    };
    let mut out = Vec::with_capacity((raw.len() * 4).min(limit));
    // One byte past the limit tells "exactly at the limit" from "over it".
    reader.take(limit as u64 + 1).read_to_end(&mut out).map_err(|e| ApiError::BadEncoding(e.to_string()))?;
    if out.len() > limit {
        return Err(ApiError::DecompressedTooLarge { limit });
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_bomb_stops_at_the_limit() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![b' '; 50 * 1024 * 1024]).unwrap();
        let bomb = Bytes::from(gz.finish().unwrap());
        assert!(bomb.len() < 100 * 1024);
        assert!(matches!(decompress(bomb, Encoding::Gzip, 1024 * 1024), Err(ApiError::DecompressedTooLarge { .. })));
    }

    #[test]
    fn zstd_round_trip_and_garbage() {
        let packed = zstd::encode_all(&b"[{}]"[..], 3).unwrap();
        assert_eq!(&decompress(Bytes::from(packed), Encoding::Zstd, 10).unwrap()[..], b"[{}]");
        assert!(matches!(decompress(Bytes::from_static(b"nope"), Encoding::Gzip, 10), Err(ApiError::BadEncoding(_))));
    }

    #[test]
    fn media_types() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/json; charset=utf-8".parse().unwrap());
        assert_eq!(format_of(&h).unwrap(), Format::JsonArray);
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(matches!(format_of(&h), Err(ApiError::UnsupportedMediaType(_))));
        h.insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        assert!(matches!(encoding_of(&h), Err(ApiError::UnsupportedEncoding(_))));
    }
}
