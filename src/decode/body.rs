//! The body as sent: how its events are laid out and how it is compressed; decompression with
//! a cap on the output, so a gzip bomb stops at the limit.

use std::io::Read;

use bytes::Bytes;

use super::DecodeError;

/// How the events are laid out in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/json`: an array of event objects (or one object).
    JsonArray,
    /// `application/x-ndjson`: one event object per line.
    Ndjson,
    /// JSON as [`Self::JsonArray`], read as NDJSON when that fails and the body has several
    /// lines (a Kafka message without a content type may be either).
    JsonOrLines,
    /// ClickHouse's `JSONEachRow`: objects one after another, or an array of them (told
    /// apart by the first character, so the body is read once).
    JsonEachRow,
    /// ClickHouse's `JSONCompactEachRow`: one array of values per line, by position
    /// ([`crate::schema::EncodeContext::order`]).
    JsonCompactEachRow,
}

/// `Content-Encoding` of the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Zstd,
}

/// Decompresses `raw`, reading at most `limit` bytes of output.
pub fn decompress(raw: Bytes, encoding: Encoding, limit: usize) -> Result<Bytes, DecodeError> {
    let reader: Box<dyn Read> = match encoding {
        Encoding::Identity => {
            return if raw.len() > limit { Err(DecodeError::DecompressedTooLarge { limit }) } else { Ok(raw) };
        }
        Encoding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(&raw[..])),
        Encoding::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(&raw[..]).map_err(|e| DecodeError::BadEncoding(e.to_string()))?)
        }
    };
    let mut out = Vec::with_capacity((raw.len() * 4).min(limit));
    // One byte past the limit tells "exactly at the limit" from "over it".
    reader.take(limit as u64 + 1).read_to_end(&mut out).map_err(|e| DecodeError::BadEncoding(e.to_string()))?;
    if out.len() > limit {
        return Err(DecodeError::DecompressedTooLarge { limit });
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
        assert!(matches!(decompress(bomb, Encoding::Gzip, 1024 * 1024), Err(DecodeError::DecompressedTooLarge { .. })));
    }

    #[test]
    fn zstd_round_trip_and_garbage() {
        let packed = zstd::encode_all(&b"[{}]"[..], 3).unwrap();
        assert_eq!(&decompress(Bytes::from(packed), Encoding::Zstd, 10).unwrap()[..], b"[{}]");
        assert!(matches!(
            decompress(Bytes::from_static(b"nope"), Encoding::Gzip, 10),
            Err(DecodeError::BadEncoding(_))
        ));
    }
}
