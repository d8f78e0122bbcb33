//! Reading the segments back at open: every record checked, a torn or corrupt tail cut.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::book::Book;
use super::format::{self, Body, HEADER};
use super::{BlockId, IoContext, WalError, segment_path};

const SEGMENT_SUFFIX: &str = ".journal";

/// The segment names in `dir`, in order. Other files are left alone.
pub(super) fn segment_names(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let file_name = entry.file_name();
        let Some(stem) = file_name.to_str().and_then(|n| n.strip_suffix(SEGMENT_SUFFIX)) else { continue };
        match stem.parse::<u64>() {
            Ok(name) => names.push(name),
            Err(_) => {
                tracing::warn!(file = %entry.path().display(), "skipping a journal file whose name is not a block id");
            }
        }
    }
    names.sort_unstable();
    Ok(names)
}

/// The file name of segment `name`: zero-padded so that names sort as numbers do.
pub(super) fn segment_file_name(name: u64) -> String {
    format!("{name:020}{SEGMENT_SUFFIX}")
}

/// What the segments read so far add up to.
#[derive(Debug)]
pub(super) struct Scan {
    pub book: Book,
    /// Payloads of the blocks not confirmed (yet), by id. A confirmation read later drops its
    /// block's payload at once, so memory holds roughly what stays unconfirmed, not the journal.
    pub payloads: BTreeMap<BlockId, Vec<u8>>,
    pub last_id: Option<BlockId>,
    /// When the blocks found count as appended.
    pub since: Instant,
}

impl Scan {
    pub fn new(since: Instant) -> Self {
        Self { book: Book::default(), payloads: BTreeMap::new(), last_id: None, since }
    }

    /// Reads segment `name`; cuts the file at the first record whose length or checksum does
    /// not hold. A torn write can only leave such a record at the end of what was written, but
    /// a segment is cut there wherever it sits: what follows a bad record cannot be framed.
    pub fn segment(&mut self, dir: &Path, name: u64) -> Result<(), WalError> {
        let path = segment_path(dir, name);
        self.book.add_segment(name);
        let file = OpenOptions::new().read(true).write(true).open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        let mut reader = BufReader::with_capacity(256 * 1024, &file);
        let mut offset = 0;
        let mut cut = None;
        while offset < len {
            match self.record(&mut reader, &path, name, offset, len - offset)? {
                Ok(size) => offset += size,
                Err(reason) => {
                    cut = Some(reason);
                    break;
                }
            }
        }
        drop(reader);
        if let Some(reason) = cut {
            tracing::warn!(
                segment = %path.display(),
                offset,
                cut_bytes = len - offset,
                reason,
                "cutting a torn or corrupt journal tail"
            );
            file.set_len(offset).at(&path)?;
            file.sync_all().at(&path)?;
        }
        self.book.grow(name, offset, false);
        Ok(())
    }

    /// Reads one record of `left` bytes at most: `Ok(Ok(size))` when it holds, `Ok(Err(why))`
    /// when it is torn or corrupt (to cut), `Err` when it cannot be read or understood.
    fn record(
        &mut self,
        reader: &mut BufReader<&File>,
        path: &Path,
        name: u64,
        offset: u64,
        left: u64,
    ) -> Result<Result<u64, &'static str>, WalError> {
        if left < HEADER {
            return Ok(Err("the file ends inside a record header"));
        }
        let mut header = [0; HEADER as usize];
        read(reader, &mut header, path)?;
        let (len, crc) = format::parse_header(header);
        // A zero length is what a zero-filled tail (blocks allocated, data never written) reads as.
        if len == 0 || u64::from(len) > left - HEADER {
            return Ok(Err("a record's length runs past the end of the file"));
        }
        let mut rest = vec![0; len as usize];
        read(reader, &mut rest, path)?;
        if crc32fast::hash(&rest) != crc {
            return Ok(Err("a record's checksum does not match"));
        }
        let corrupt = |reason: &'static str| WalError::Corrupt { path: path.to_path_buf(), offset, reason };
        match format::decode(rest).map_err(corrupt)? {
            Body::Block { id, payload } => {
                // Ids are handed out in order and a segment is named by the first id it may
                // hold: anything else means the files were not written by this journal.
                if id < name || self.last_id.is_some_and(|last| id <= last) {
                    return Err(corrupt("a block id is out of order"));
                }
                self.last_id = Some(id);
                self.book.add_block(name, id, self.since);
                self.payloads.insert(id, payload);
            }
            Body::Confirmations(ids) => {
                for id in ids {
                    self.book.confirm(id, name);
                    self.payloads.remove(&id);
                }
            }
        }
        Ok(Ok(HEADER + u64::from(len)))
    }
}

fn read(reader: &mut BufReader<&File>, buf: &mut [u8], path: &Path) -> Result<(), WalError> {
    // The lengths were checked against the file's size, so running short means the file
    // changed under us: an I/O error, not a tail to cut.
    reader.read_exact(buf).at(path)
}

/// Creates `dir` if missing, making its entry in the parent journal too: otherwise a crash
/// could lose the directory with every segment acknowledged in it.
pub(super) fn ensure_dir(dir: &Path) -> Result<(), WalError> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(WalError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotADirectory, "not a directory").into(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Only the gateway's user may list or read the journal: it holds producers' rows.
            fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).at(dir)?;
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            File::open(&parent).and_then(|d| d.sync_all()).at(&parent)
        }
        Err(e) => Err(e).at(dir),
    }
}

/// The payloads of `wanted` blocks, read from the segments in `dir` while the journal runs:
/// records are only appended, and segments holding unconfirmed blocks are not deleted, so the
/// whole records found are the ones written. A tail being written is simply not read.
pub(super) fn read_blocks(
    dir: &Path,
    wanted: &std::collections::HashSet<BlockId>,
) -> Result<std::collections::HashMap<BlockId, Vec<u8>>, WalError> {
    let mut found = std::collections::HashMap::new();
    let names = segment_names(dir)?;
    // A segment named n holds ids >= n, and the next segment's name bounds them: only the
    // segments that may hold a wanted id are read.
    for (i, &name) in names.iter().enumerate() {
        let next = names.get(i + 1).copied().unwrap_or(u64::MAX);
        if !wanted.iter().any(|&id| id >= name && id < next) {
            continue;
        }
        let path = segment_path(dir, name);
        let file = match File::open(&path) {
            Ok(file) => file,
            // Deleted since the listing: it held only confirmed blocks.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).at(&path),
        };
        let len = file.metadata().at(&path)?.len();
        let mut reader = BufReader::with_capacity(256 * 1024, &file);
        let mut offset = 0;
        while offset + HEADER <= len {
            let mut header = [0; HEADER as usize];
            read(&mut reader, &mut header, &path)?;
            let (size, crc) = format::parse_header(header);
            if size == 0 || u64::from(size) > len - offset - HEADER {
                break;
            }
            let mut rest = vec![0; size as usize];
            read(&mut reader, &mut rest, &path)?;
            if crc32fast::hash(&rest) != crc {
                break;
            }
            if let Ok(Body::Block { id, payload }) = format::decode(rest)
                && wanted.contains(&id)
            {
                found.insert(id, payload);
            }
            offset += HEADER + u64::from(size);
        }
    }
    Ok(found)
}
