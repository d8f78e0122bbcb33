use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// A 40-byte payload: 57 bytes framed, so the segment sizes below hold a known number.
fn payload(i: u64) -> Vec<u8> {
    format!("{i:040}").into_bytes()
}

const FRAMED: u64 = 57;

fn config(dir: &Path, max_bytes: u64, segment_bytes: u64) -> WalConfig {
    WalConfig { dir: dir.to_path_buf(), max_bytes, segment_bytes }
}

fn roomy(dir: &Path) -> WalConfig {
    config(dir, 1 << 20, 1 << 16)
}

fn open(config: WalConfig) -> (Wal, Vec<BlockId>) {
    let (journal, records) = Wal::open(config).unwrap();
    (journal, ids(&records))
}

fn ids(records: &[Record]) -> Vec<BlockId> {
    records.iter().map(|r| r.id).collect()
}

/// Segment files by name, i.e. by the first id each may hold.
fn segments(dir: &Path) -> Vec<u64> {
    let mut names: Vec<u64> = fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_suffix(".journal")?.parse().ok())
        .collect();
    names.sort_unstable();
    names
}

fn segment_file(dir: &Path, name: u64) -> PathBuf {
    dir.join(format!("{name:020}.journal"))
}

fn disk_bytes(dir: &Path) -> u64 {
    segments(dir).into_iter().map(|n| fs::metadata(segment_file(dir, n)).unwrap().len()).sum()
}

async fn append_all(journal: &Wal, ids: impl IntoIterator<Item = u64>) {
    for i in ids {
        assert_eq!(journal.append(payload(i)).await.unwrap(), i);
    }
}

/// The journal holds producers' rows: its directory, segments and lock are the gateway's user's
/// alone, whatever the umask.
#[tokio::test]
async fn only_the_gateway_s_user_can_read_the_journal() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("journal");
    let (journal, _) = open(roomy(&dir));
    journal.append(payload(1)).await.unwrap();
    let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the directory");
    for name in segments(&dir) {
        assert_eq!(mode(&segment_file(&dir, name)), 0o600, "segment {name}");
    }
    assert_eq!(mode(&dir.join("lock")), 0o600, "the lock file");
}

#[tokio::test]
async fn unconfirmed_blocks_come_back_after_reopen_and_ids_go_on() {
    let tmp = TempDir::new().unwrap();
    let (journal, found) = open(roomy(tmp.path()));
    assert!(found.is_empty());
    append_all(&journal, 1..=3).await;
    journal.confirm(&[2]).await.unwrap();
    journal.close().await.unwrap();
    drop(journal);

    let (journal, records) = Wal::open(roomy(tmp.path())).unwrap();
    assert_eq!(ids(&records), [1, 3]);
    assert_eq!(records[0].payload, payload(1));
    assert_eq!(records[1].payload, payload(3));
    assert_eq!(journal.stats().unconfirmed, 2);
    assert_eq!(journal.append(b"next".to_vec()).await.unwrap(), 4);
    journal.close().await.unwrap();
}

#[tokio::test]
async fn ids_go_on_after_every_segment_with_blocks_is_deleted() {
    let tmp = TempDir::new().unwrap();
    // One block per segment.
    let (journal, _) = open(config(tmp.path(), 1 << 20, 64));
    append_all(&journal, 1..=3).await;
    journal.confirm(&[1, 2, 3]).await.unwrap();
    // Only the segment holding the confirmation is left, named by the next id.
    assert_eq!(segments(tmp.path()), [4]);
    journal.close().await.unwrap();
    drop(journal);

    let (journal, found) = open(config(tmp.path(), 1 << 20, 64));
    assert!(found.is_empty());
    // Segment 4 has no room for it, so the block opens segment 5 and takes its id; segment 4,
    // no longer active and with no block, goes.
    assert_eq!(journal.append(payload(5)).await.unwrap(), 5);
    assert_eq!(segments(tmp.path()), [5]);
    journal.close().await.unwrap();
}

#[tokio::test]
async fn a_tail_torn_mid_record_is_cut_and_appends_go_on_after_it() {
    let tmp = TempDir::new().unwrap();
    let (journal, _) = open(roomy(tmp.path()));
    append_all(&journal, 1..=3).await;
    journal.close().await.unwrap();
    drop(journal);
    let file = segment_file(tmp.path(), 1);
    OpenOptions::new().write(true).open(&file).unwrap().set_len(3 * FRAMED - 5).unwrap();

    let (journal, found) = open(roomy(tmp.path()));
    assert_eq!(found, [1, 2]);
    assert_eq!(fs::metadata(&file).unwrap().len(), 2 * FRAMED);
    // The torn block was never acknowledged, so its id may be handed out again.
    assert_eq!(journal.append(b"again".to_vec()).await.unwrap(), 3);
    journal.close().await.unwrap();
    drop(journal);

    let (_journal, records) = Wal::open(roomy(tmp.path())).unwrap();
    assert_eq!(ids(&records), [1, 2, 3]);
    assert_eq!(records[2].payload, b"again");
}

#[tokio::test]
async fn a_flipped_byte_in_the_last_record_cuts_it() {
    let tmp = TempDir::new().unwrap();
    let (journal, _) = open(roomy(tmp.path()));
    append_all(&journal, 1..=3).await;
    journal.close().await.unwrap();
    drop(journal);
    let file = segment_file(tmp.path(), 1);
    let mut bytes = fs::read(&file).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 0x40;
    fs::write(&file, bytes).unwrap();

    let (_journal, found) = open(roomy(tmp.path()));
    assert_eq!(found, [1, 2]);
    assert_eq!(fs::metadata(&file).unwrap().len(), 2 * FRAMED);
}

#[tokio::test]
async fn a_zero_filled_tail_is_cut() {
    let tmp = TempDir::new().unwrap();
    let (journal, _) = open(roomy(tmp.path()));
    append_all(&journal, 1..=2).await;
    journal.close().await.unwrap();
    drop(journal);
    let file = segment_file(tmp.path(), 1);
    OpenOptions::new().append(true).open(&file).unwrap().write_all(&[0; 4096]).unwrap();

    let (_journal, found) = open(roomy(tmp.path()));
    assert_eq!(found, [1, 2]);
    assert_eq!(fs::metadata(&file).unwrap().len(), 2 * FRAMED);
}

#[tokio::test]
async fn a_corrupt_record_in_an_earlier_segment_cuts_only_that_segment() {
    let tmp = TempDir::new().unwrap();
    // Two blocks per segment: segments 1 (blocks 1, 2) and 3 (blocks 3, 4).
    let small = || config(tmp.path(), 1 << 20, 2 * FRAMED);
    let (journal, _) = open(small());
    append_all(&journal, 1..=4).await;
    journal.close().await.unwrap();
    drop(journal);
    assert_eq!(segments(tmp.path()), [1, 3]);
    let file = segment_file(tmp.path(), 1);
    let mut bytes = fs::read(&file).unwrap();
    bytes[FRAMED as usize + 20] ^= 1;
    fs::write(&file, bytes).unwrap();

    let (_journal, found) = open(small());
    assert_eq!(found, [1, 3, 4]);
}

#[tokio::test]
async fn a_record_that_checks_but_cannot_be_read_stops_the_open() {
    let tmp = TempDir::new().unwrap();
    let (journal, _) = open(roomy(tmp.path()));
    append_all(&journal, 1..=1).await;
    journal.close().await.unwrap();
    drop(journal);
    let rest = [9u8, 1, 2, 3];
    let mut record = (rest.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(&crc32fast::hash(&rest).to_le_bytes());
    record.extend_from_slice(&rest);
    OpenOptions::new().append(true).open(segment_file(tmp.path(), 1)).unwrap().write_all(&record).unwrap();

    let error = Wal::open(roomy(tmp.path())).unwrap_err();
    assert!(matches!(error, WalError::Corrupt { offset: FRAMED, .. }), "{error:?}");
}

#[tokio::test]
async fn full_refuses_at_once_and_room_comes_back_after_confirming() {
    let tmp = TempDir::new().unwrap();
    // Room for three blocks; two per segment.
    let (journal, _) = open(config(tmp.path(), 3 * FRAMED + 20, 2 * FRAMED));
    append_all(&journal, 1..=3).await;
    assert!(!journal.has_room(40));
    assert!(journal.has_room(0));
    let error = journal.append(payload(4)).await.unwrap_err();
    assert!(matches!(error, WalError::Full { .. }), "{error:?}");
    assert_eq!(journal.stats().bytes, 3 * FRAMED);
    assert_eq!(disk_bytes(tmp.path()), 3 * FRAMED);

    // Segment 1 (blocks 1, 2) is freed; the confirmation lands in segment 3.
    journal.confirm(&[1, 2]).await.unwrap();
    assert_eq!(segments(tmp.path()), [3]);
    assert_eq!(journal.stats().bytes, disk_bytes(tmp.path()));
    assert!(journal.has_room(40));
    assert_eq!(journal.append(payload(4)).await.unwrap(), 4);
    journal.close().await.unwrap();
}

#[tokio::test]
async fn segments_are_deleted_once_their_blocks_are_confirmed() {
    let tmp = TempDir::new().unwrap();
    let small = || config(tmp.path(), 1 << 20, 2 * FRAMED);
    let (journal, _) = open(small());
    append_all(&journal, 1..=10).await;
    assert_eq!(segments(tmp.path()), [1, 3, 5, 7, 9]);
    journal.confirm(&[1, 2, 3]).await.unwrap();
    // Segment 3 keeps block 4; the confirmation needed a segment of its own.
    assert_eq!(segments(tmp.path()), [3, 5, 7, 9, 11]);
    journal.confirm(&[4, 5, 6, 7, 8, 9, 10, 99]).await.unwrap();
    assert_eq!(segments(tmp.path()), [11]);
    let stats = journal.stats();
    assert_eq!((stats.segments, stats.unconfirmed, stats.bytes), (1, 0, disk_bytes(tmp.path())));
    journal.close().await.unwrap();
    drop(journal);

    let (journal, found) = open(small());
    assert!(found.is_empty());
    // Segment 11 (confirmations only) has no room left: the block opens segment 12.
    assert_eq!(journal.append(payload(12)).await.unwrap(), 12);
    journal.close().await.unwrap();
}

#[tokio::test]
async fn a_spent_active_segment_is_rolled_over_and_deleted() {
    let tmp = TempDir::new().unwrap();
    let big = || config(tmp.path(), 8 << 20, 4 << 20);
    let (journal, _) = open(big());
    journal.append(vec![7; 1000]).await.unwrap();
    journal.confirm(&[1]).await.unwrap();
    // Too small to be worth a new file: stays.
    assert_eq!(segments(tmp.path()), [1]);
    journal.append(vec![7; 600 << 10]).await.unwrap();
    journal.append(vec![7; 600 << 10]).await.unwrap();
    journal.confirm(&[2, 3]).await.unwrap();
    assert_eq!(segments(tmp.path()), [4]);
    assert_eq!(journal.stats().bytes, 0);
    journal.close().await.unwrap();
}

/// Block 2 sits in segment 1, which block 1 keeps alive; its confirmation is written in
/// segment 3, which is then deleted. The confirmation must survive that, twice over.
#[tokio::test]
async fn confirmations_of_blocks_in_surviving_segments_survive_deletion() {
    let tmp = TempDir::new().unwrap();
    // Payloads of 20 bytes: 37 framed; two blocks and a confirmation of two fit 100 bytes.
    let small = || config(tmp.path(), 1 << 20, 100);
    let block = |i: u8| vec![i; 20];
    let (journal, _) = open(small());
    for i in 1..=3 {
        journal.append(block(i)).await.unwrap();
    }
    assert_eq!(segments(tmp.path()), [1, 3]);
    journal.confirm(&[2, 3]).await.unwrap();
    assert_eq!(segments(tmp.path()), [1, 3]);
    // Block 4 does not fit segment 3: segment 4 starts, segment 3 is all confirmed and goes,
    // and the confirmation of block 2 is carried into segment 4.
    journal.append(block(4)).await.unwrap();
    assert_eq!(segments(tmp.path()), [1, 4]);
    journal.close().await.unwrap();
    drop(journal);

    let (journal, found) = open(small());
    assert_eq!(found, [1, 4]);
    // Again, from what the open read back: segment 4 goes, block 2's confirmation moves on.
    journal.confirm(&[4]).await.unwrap();
    journal.append(block(5)).await.unwrap();
    assert_eq!(segments(tmp.path()), [1, 5]);
    journal.close().await.unwrap();
    drop(journal);

    let (journal, found) = open(small());
    assert_eq!(found, [1, 5]);
    journal.confirm(&[1]).await.unwrap();
    assert_eq!(segments(tmp.path()), [5]);
    journal.close().await.unwrap();
    drop(journal);

    let (journal, found) = open(small());
    assert_eq!(found, [5]);
    journal.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_syncs() {
    let tmp = TempDir::new().unwrap();
    // A slow sync, so that the appends queue behind it however fast this disk syncs.
    let hooks = Hooks { sync_delay: Duration::from_millis(20) };
    let (journal, _) = Wal::open_with(roomy(tmp.path()), hooks).unwrap();
    let journal = Arc::new(journal);
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let journal = Arc::clone(&journal);
            tokio::spawn(async move { journal.append(payload(i)).await })
        })
        .collect();
    let mut got = Vec::new();
    for task in tasks {
        got.push(task.await.unwrap().unwrap());
    }
    got.sort_unstable();
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    let syncs = journal.stats().syncs;
    assert!(syncs <= 10, "{syncs} syncs for 100 appends");
    journal.close().await.unwrap();
    drop(journal);

    let (_journal, found) = open(roomy(tmp.path()));
    assert_eq!(found.len(), 100);
}

#[tokio::test]
async fn acknowledged_appends_survive_a_crash() {
    let tmp = TempDir::new().unwrap();
    let (journal, _) = open(roomy(tmp.path()));
    append_all(&journal, 1..=5).await;
    journal.confirm(&[1]).await.unwrap();
    // A crash right now: the files as they are, with the writer still running.
    let copy = TempDir::new().unwrap();
    for name in segments(tmp.path()) {
        fs::copy(segment_file(tmp.path(), name), segment_file(copy.path(), name)).unwrap();
    }
    let (_copied, found) = open(roomy(copy.path()));
    assert_eq!(found, [2, 3, 4, 5]);

    // And a stop without close.
    drop(journal);
    let (journal, found) = open(roomy(tmp.path()));
    assert_eq!(found, [2, 3, 4, 5]);
    assert_eq!(journal.append(payload(6)).await.unwrap(), 6);
}

#[tokio::test]
async fn a_closed_journal_refuses_work() {
    let tmp = TempDir::new().unwrap();
    let (journal, _) = open(roomy(tmp.path()));
    journal.close().await.unwrap();
    assert!(matches!(journal.append(payload(1)).await, Err(WalError::Closed)));
    assert!(matches!(journal.confirm(&[1]).await, Err(WalError::Closed)));
    journal.close().await.unwrap();
}

#[tokio::test]
async fn stats_follow_appends_and_confirmations() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("nested/journal");
    let (journal, _) = open(roomy(&dir));
    assert_eq!(journal.stats().oldest_unconfirmed, None);
    append_all(&journal, 1..=2).await;
    let stats = journal.stats();
    assert_eq!((stats.unconfirmed, stats.segments, stats.bytes), (2, 1, 2 * FRAMED));
    assert!(stats.oldest_unconfirmed.is_some());
    assert!(stats.syncs >= 1);
    journal.confirm(&[1, 2]).await.unwrap();
    let stats = journal.stats();
    assert_eq!((stats.unconfirmed, stats.oldest_unconfirmed), (0, None));
    assert_eq!(stats.bytes, disk_bytes(&dir));
    journal.close().await.unwrap();
}

#[tokio::test]
async fn a_second_open_of_a_directory_in_use_is_refused_and_blocks_are_read_back() {
    let dir = TempDir::new().unwrap();
    let (journal, _) = open(roomy(dir.path()));
    let first = journal.append(payload(1)).await.unwrap();
    let second = journal.append(payload(2)).await.unwrap();
    assert!(matches!(Wal::open(roomy(dir.path())), Err(WalError::Locked { .. })));
    // What the confirmer reads back while the journal runs.
    let read = journal.read(&[second, 999]).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read.get(&second), Some(&payload(2)));
    journal.confirm(&[first]).await.unwrap();
    journal.close().await.unwrap();
    drop(journal);
    let (_again, unconfirmed) = open(roomy(dir.path()));
    assert_eq!(unconfirmed, [second], "the lock went with the first journal");
}
