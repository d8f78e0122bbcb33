//! The framing of one record (the layout is in the module docs of `journal`), and the
//! batch of records waiting to be written.

use bytes::Bytes;

use super::BlockId;

/// Bytes in front of the part the checksum covers: its length and its checksum.
pub(super) const HEADER: u64 = 8;
const KIND_BLOCK: u8 = 1;
const KIND_CONFIRMATIONS: u8 = 2;
/// What a block record adds to its payload: header, kind and id.
pub(super) const BLOCK_OVERHEAD: u64 = HEADER + 1 + 8;
/// What a confirmation record adds to its ids: header, kind and count.
const CONFIRMATIONS_OVERHEAD: u64 = HEADER + 1 + 4;
/// Ids per confirmation record. A long list is split so that one record stays far below the
/// 4 GiB a length field can say, and a record cut by a crash loses few confirmations.
const IDS_PER_RECORD: usize = 1 << 16;

/// The framed size of a block record with `payload` bytes, or `None` when its length would
/// not fit the u32 length field.
pub(super) fn block_len(payload: u64) -> Option<u64> {
    let rest = payload.checked_add(BLOCK_OVERHEAD - HEADER)?;
    u32::try_from(rest).ok()?;
    Some(HEADER + rest)
}

/// A block's payload: pieces laid end to end. A batch's rows stay in the buffers they were
/// encoded into; the journal writes them from there.
#[derive(Debug, Clone, Default)]
pub struct Payload(pub Vec<Bytes>);

impl Payload {
    pub fn len(&self) -> usize {
        self.0.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self(vec![Bytes::from(bytes)])
    }
}

impl From<Vec<Bytes>> for Payload {
    fn from(pieces: Vec<Bytes>) -> Self {
        Self(pieces)
    }
}

/// Records gathered for one write: framing and confirmations copied into small buffers,
/// payload pieces shared (written from where they are with one vectored write).
#[derive(Debug, Default)]
pub(super) struct Pending {
    parts: Vec<Bytes>,
    /// Bytes in `parts`.
    shared: usize,
    /// Framing not yet cut into `parts`.
    tail: Vec<u8>,
}

impl Pending {
    pub fn len(&self) -> usize {
        self.shared + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything gathered, in order; leaves the batch empty.
    pub fn take(&mut self) -> Vec<Bytes> {
        self.cut();
        self.shared = 0;
        std::mem::take(&mut self.parts)
    }

    fn share(&mut self, piece: &Bytes) {
        if piece.is_empty() {
            return;
        }
        self.cut();
        self.shared += piece.len();
        self.parts.push(piece.clone());
    }

    fn cut(&mut self) {
        if !self.tail.is_empty() {
            self.shared += self.tail.len();
            self.parts.push(Bytes::from(std::mem::take(&mut self.tail)));
        }
    }
}

/// Appends a block record. The payload's length was checked with [`block_len`].
pub(super) fn push_block(out: &mut Pending, id: BlockId, payload: &Payload) {
    let mut head = [0u8; 1 + 8];
    head[0] = KIND_BLOCK;
    head[1..].copy_from_slice(&id.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head);
    for piece in &payload.0 {
        crc.update(piece);
    }
    // block_len kept the rest below u32::MAX.
    let len = (head.len() + payload.len()) as u32;
    out.tail.extend_from_slice(&len.to_le_bytes());
    out.tail.extend_from_slice(&crc.finalize().to_le_bytes());
    out.tail.extend_from_slice(&head);
    for piece in &payload.0 {
        out.share(piece);
    }
}

/// The framed size of the confirmation records [`push_confirmations`] writes for `ids` ids.
pub(super) fn confirmations_len(ids: usize) -> u64 {
    ids.div_ceil(IDS_PER_RECORD) as u64 * CONFIRMATIONS_OVERHEAD + ids as u64 * 8
}

/// Appends confirmation records for `ids`.
pub(super) fn push_confirmations(out: &mut Pending, ids: &[BlockId]) {
    let buf = &mut out.tail;
    for chunk in ids.chunks(IDS_PER_RECORD) {
        let start = begin(buf, KIND_CONFIRMATIONS);
        // At most IDS_PER_RECORD, so the count fits.
        buf.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
        for id in chunk {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        seal(buf, start);
    }
}

/// Reserves the header and writes the kind; returns where the record starts.
fn begin(buf: &mut Vec<u8>, kind: u8) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER as usize]);
    buf.push(kind);
    start
}

/// Fills in the length and checksum of the record that starts at `start`, now that its rest
/// is in place: one pass over the bytes, no second copy of the payload.
fn seal(buf: &mut [u8], start: usize) {
    let body = start + HEADER as usize;
    let rest = &buf[body..];
    // Callers keep the rest below u32::MAX (block_len, IDS_PER_RECORD).
    let len = (rest.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(rest).to_le_bytes();
    buf[start..start + 4].copy_from_slice(&len);
    buf[start + 4..body].copy_from_slice(&crc);
}

/// The length and checksum of a record header.
pub(super) fn parse_header(header: [u8; HEADER as usize]) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = header;
    (u32::from_le_bytes([a, b, c, d]), u32::from_le_bytes([e, f, g, h]))
}

/// What a record whose checksum holds says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Body {
    Block { id: BlockId, payload: Vec<u8> },
    Confirmations(Vec<BlockId>),
}

/// Reads the part of a record after its header (its checksum already checked). An error here
/// is not a torn write — the checksum holds — but a record this code does not understand.
pub(super) fn decode(mut rest: Vec<u8>) -> Result<Body, &'static str> {
    match rest.first() {
        Some(&KIND_BLOCK) => {
            let id = rest.get(1..9).map(le_u64).ok_or("a block record is too short for its id")?;
            // Shifts the payload down in place rather than copying it into a new buffer.
            rest.drain(..9);
            Ok(Body::Block { id, payload: rest })
        }
        Some(&KIND_CONFIRMATIONS) => {
            let count = rest
                .get(1..5)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or("a confirmation record is too short for its count")?;
            let ids = rest
                .get(5..)
                .filter(|ids| ids.len() as u64 == u64::from(count) * 8)
                .ok_or("a confirmation record's count does not match its length")?;
            Ok(Body::Confirmations(ids.chunks_exact(8).map(le_u64).collect()))
        }
        Some(_) => Err("unknown record kind"),
        None => Err("empty record"),
    }
}

/// `bytes` holds exactly 8 bytes (callers slice them so).
fn le_u64(bytes: &[u8]) -> u64 {
    let mut le = [0; 8];
    le.copy_from_slice(bytes);
    u64::from_le_bytes(le)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(buf: &[u8]) -> Vec<Body> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < buf.len() {
            let (len, crc) = parse_header(buf[at..at + 8].try_into().unwrap());
            let rest = buf[at + 8..at + 8 + len as usize].to_vec();
            assert_eq!(crc32fast::hash(&rest), crc);
            out.push(decode(rest).unwrap());
            at += 8 + len as usize;
        }
        out
    }

    fn written(out: &mut Pending) -> Vec<u8> {
        out.take().concat()
    }

    #[test]
    fn records_round_trip_with_the_lengths_announced() {
        let mut out = Pending::default();
        let payload = Payload(vec![Bytes::from_static(b"hel"), Bytes::new(), Bytes::from_static(b"lo")]);
        push_block(&mut out, 7, &payload);
        assert_eq!(out.len() as u64, block_len(5).unwrap());
        let before = out.len();
        push_confirmations(&mut out, &[3, 7]);
        assert_eq!((out.len() - before) as u64, confirmations_len(2));
        let buf = written(&mut out);
        assert!(out.is_empty());
        assert_eq!(&buf[8..9], &[1]);
        assert_eq!(
            split(&buf),
            vec![Body::Block { id: 7, payload: b"hello".to_vec() }, Body::Confirmations(vec![3, 7])]
        );
    }

    #[test]
    fn a_payload_is_shared_not_copied() {
        let piece = Bytes::from(vec![5u8; 4096]);
        let mut out = Pending::default();
        push_block(&mut out, 1, &Payload(vec![piece.clone()]));
        assert!(out.take().iter().any(|part| part.as_ptr() == piece.as_ptr()));
    }

    #[test]
    fn long_confirmation_lists_are_split_into_records() {
        let ids: Vec<BlockId> = (0..IDS_PER_RECORD as u64 + 3).collect();
        let mut out = Pending::default();
        push_confirmations(&mut out, &ids);
        assert_eq!(out.len() as u64, confirmations_len(ids.len()));
        let buf = written(&mut out);
        let bodies = split(&buf);
        assert_eq!(bodies.len(), 2);
        assert_eq!(
            bodies[1],
            Body::Confirmations(vec![ids.len() as u64 - 3, ids.len() as u64 - 2, ids.len() as u64 - 1])
        );
    }

    #[test]
    fn records_that_do_not_add_up_are_refused() {
        assert!(decode(vec![9, 0]).is_err());
        assert!(decode(vec![1, 0, 0]).is_err());
        assert!(decode(vec![2, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(block_len(u64::from(u32::MAX)).is_none());
    }
}
