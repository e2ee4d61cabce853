//! The store's own write-ahead journal: what makes a commit durable.
//!
//! Each commit group is appended as one record of physical operations (put or remove a
//! key in a keyspace) and the file is synced before anyone is answered; fjall receives
//! the same group without a sync of its own. There are exceptions, written only here and
//! kept in memory: a new message (`crate::held`), because most are acknowledged within
//! milliseconds and then never need to reach fjall at all; idempotency records and
//! mailbox depths (`crate::deferred`), which reach fjall later and in bulk; and, most of
//! the time, the counters of a commit that has nothing else for fjall
//! (`Writer::write_counters`). A
//! checkpoint (`Writer::checkpoint`) writes the held messages, depths and counters to
//! fjall, syncs fjall and
//! empties this file, carrying into the new one the idempotency records fjall does not
//! hold yet.
//!
//! At open, whatever the file holds is applied to fjall, in order, and synced: each key
//! ends as the last record left it, whether or not fjall had kept some of those writes,
//! so replaying is safe after any crash, and again after a crash during the replay.
//!
//! A record is `payload length (u32 LE) ++ xxh3 of the payload (u64 LE) ++ payload`; the
//! payload is a run of `keyspace (u8) ++ key length (u32 LE) ++ key ++ value length (u32
//! LE, u32::MAX for a removal) ++ value`.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xxhash_rust::xxh3::xxh3_64;

pub const FILE: &str = "journal";
/// The empty journal being put in place of a full one (see [`Journal::clear`]).
pub(crate) const NEXT: &str = "journal.next";

const HEADER: usize = 12;
const REMOVED: u32 = u32::MAX;

/// The keyspaces, numbered as the journal names them (never renumber).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ks {
    Mailbox = 0,
    Dedup = 1,
    Depth = 2,
    Coords = 3,
    Meta = 4,
    Log = 5,
    Streams = 6,
    Ids = 7,
    Gone = 8,
    Seqs = 9,
    SeqReceipts = 10,
}

impl Ks {
    pub(crate) const ALL: [Ks; 11] = [
        Ks::Mailbox,
        Ks::Dedup,
        Ks::Depth,
        Ks::Coords,
        Ks::Meta,
        Ks::Log,
        Ks::Streams,
        Ks::Ids,
        Ks::Gone,
        Ks::Seqs,
        Ks::SeqReceipts,
    ];

    fn from_code(code: u8) -> Option<Ks> {
        Ks::ALL.get(usize::from(code)).copied()
    }
}

/// One operation of a record.
pub struct Change<'a> {
    pub keyspace: Ks,
    pub key: &'a [u8],
    /// `None` removes the key.
    pub value: Option<&'a [u8]>,
}

/// A record being built.
pub struct Record {
    bytes: Vec<u8>,
}

impl Record {
    /// A record built in `buffer`, whose capacity it keeps (a group's record is tens of
    /// kilobytes at full load; growing a new one each time costs copies).
    pub fn reusing(mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        buffer.resize(HEADER, 0);
        Self { bytes: buffer }
    }

    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }

    /// Like [`Record::push`], with the value encoded in place.
    pub fn push_encoded(&mut self, keyspace: Ks, key: &[u8], value: &impl serde::Serialize) {
        self.push_key(keyspace, key);
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        self.bytes = postcard::to_extend(value, std::mem::take(&mut self.bytes)).expect("records always encode");
        let len = length(&self.bytes[at + 4..]);
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub fn push(&mut self, keyspace: Ks, key: &[u8], value: Option<&[u8]>) {
        self.push_key(keyspace, key);
        match value {
            Some(value) => {
                self.bytes.extend_from_slice(&length(value).to_le_bytes());
                self.bytes.extend_from_slice(value);
            }
            None => self.bytes.extend_from_slice(&REMOVED.to_le_bytes()),
        }
    }

    fn push_key(&mut self, keyspace: Ks, key: &[u8]) {
        self.bytes.push(keyspace as u8);
        self.bytes.extend_from_slice(&length(key).to_le_bytes());
        self.bytes.extend_from_slice(key);
    }

    /// The record with its header, ready to append; refused past 4 GiB (a snapshot merge
    /// of that size is one commit group).
    fn seal(&mut self) -> io::Result<&[u8]> {
        let payload = &self.bytes[HEADER..];
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other("a commit group of 4 GiB or more cannot be journaled"))?;
        let hash = xxh3_64(payload);
        self.bytes[..4].copy_from_slice(&len.to_le_bytes());
        self.bytes[4..HEADER].copy_from_slice(&hash.to_le_bytes());
        Ok(&self.bytes)
    }
}

/// Keys and values come from frames of at most 16 MiB and from the store's own records.
fn length(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).expect("journal keys and values are far below 4 GiB")
}

pub struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes of whole records; the next record goes here.
    len: u64,
    /// Appends are refused at this length: checkpoints are failing (the log says why),
    /// and the journal must not grow without bound.
    max_len: u64,
    /// Why the file may no longer match `len` (a failed write could not be cut back):
    /// appending is refused from then on, until a restart reads the file again.
    broken: Option<String>,
}

impl Journal {
    /// Opens the journal in `dir`, to hold at most `max_len` bytes, and returns it with
    /// what it holds: its records up to the first that is incomplete or fails its
    /// checksum. That one is most likely a
    /// write a crash cut short (and then no one was answered for it or anything after);
    /// if it was damaged later instead, the caller sees that fjall holds commits the
    /// journal now lacks (`replay` in `lib.rs`), or the watermark does.
    pub fn open(dir: &Path, max_len: u64) -> io::Result<(Journal, Contents)> {
        let path = dir.join(FILE);
        let file = open_file(&path, false)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        let (records, len) = split(&bytes);
        if len < bytes.len() {
            tracing::warn!(path = %path.display(), at = len, dropped_bytes = bytes.len() - len, "the journal ends in an incomplete or damaged record; dropping it and everything after it");
        }
        let journal = Journal {
            file,
            path,
            len: len as u64,
            max_len,
            broken: None,
        };
        Ok((journal, Contents { bytes, records }))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a record, synced if `sync`, and says how long the sync took. On failure the
    /// file is cut back to where it was, so a half-written record is never followed by
    /// others.
    pub fn append(&mut self, record: &mut Record, sync: bool) -> io::Result<Option<Duration>> {
        if let Some(why) = &self.broken {
            return Err(io::Error::other(why.clone()));
        }
        if self.len >= self.max_len {
            return Err(io::Error::other(
                "the journal is full because checkpoints fail; see the log",
            ));
        }
        let bytes = record.seal()?;
        let written = self.file.write_all_at(bytes, self.len).and_then(|()| {
            if !sync {
                return Ok(None);
            }
            let started = Instant::now();
            self.file.sync_data().map(|()| Some(started.elapsed()))
        });
        match written {
            Ok(synced) => {
                self.len += bytes.len() as u64;
                Ok(synced)
            }
            Err(e) => {
                self.cut(self.len);
                Err(e)
            }
        }
    }

    /// Takes back the last record (its commit to fjall failed, so the writer forgets the
    /// group and reuses its seqs: the record must never be replayed).
    pub fn take_back(&mut self, record: &Record) {
        self.cut(self.len - record.bytes.len() as u64);
    }

    /// Empties the journal once fjall durably holds everything in it, by putting an
    /// empty file in its place: cutting tens of MiB from the file in place took the
    /// writer 20–60 ms at full load, and freeing the old file's blocks is left to a
    /// thread of its own. A failure before the swap leaves the journal longer than
    /// needed but consistent: replay covers more. One after it (the directory cannot be
    /// synced, so a power loss could bring the old file back and lose what is appended to
    /// the new one) stops all appends.
    pub fn clear(&mut self) -> io::Result<()> {
        let next = Next::prepare(self.dir(), None)?;
        self.replace(next)
    }

    /// Puts `next` in this journal's place (see [`Journal::clear`]).
    pub fn replace(&mut self, next: Next) -> io::Result<()> {
        let Next { file: fresh, path, len } = next;
        std::fs::rename(&path, &self.path)?;
        let old = std::mem::replace(&mut self.file, fresh);
        self.len = len;
        // The old file's blocks are freed when it is closed.
        let _ = std::thread::Builder::new()
            .name("chinwag-journal-drop".into())
            .spawn(move || drop(old));
        let synced = File::open(self.dir()).and_then(|d| d.sync_all());
        if let Err(e) = &synced {
            self.stop(format!(
                "cannot sync the directory after emptying the journal ({e}); restart the node"
            ));
        }
        synced
    }

    /// Cuts the file back to `to`; if that cannot be done durably, stops all appends.
    fn cut(&mut self, to: u64) {
        let cut = self.file.set_len(to).and_then(|()| self.file.sync_all());
        match cut {
            Ok(()) => self.len = to,
            Err(e) => self.stop(format!(
                "cannot cut the journal back after a failed commit ({e}); restart the node"
            )),
        }
    }

    fn stop(&mut self, why: String) {
        tracing::error!(path = %self.path.display(), "{why}");
        self.broken = Some(why);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dir(&self) -> &Path {
        self.path.parent().expect("the journal is in the store's directory")
    }
}

/// The file that will take the journal's place, written and synced beside it.
pub struct Next {
    file: File,
    path: PathBuf,
    len: u64,
}

impl Next {
    /// Creates it in `dir` holding `carried`, if any, synced: a checkpoint does this
    /// while fjall syncs, then [`Journal::replace`]s the journal with it. What fjall does
    /// not hold yet, and the old journal did, thus stays journaled.
    pub fn prepare(dir: &Path, carried: Option<&mut Record>) -> io::Result<Next> {
        let path = dir.join(NEXT);
        let file = open_file(&path, true)?;
        let len = match carried {
            Some(record) => {
                let bytes = record.seal()?;
                file.write_all_at(bytes, 0).and_then(|()| file.sync_data())?;
                bytes.len() as u64
            }
            None => 0,
        };
        Ok(Next { file, path, len })
    }
}

fn open_file(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate)
        .open(path)
}

/// What a journal held when it was opened.
pub struct Contents {
    bytes: Vec<u8>,
    records: Vec<Range<usize>>,
}

impl Contents {
    /// The payloads of its whole, intact records, in order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        self.records.iter().map(|r| &self.bytes[r.clone()])
    }

    /// Whether the file was empty: not even a damaged record to drop.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Where the payloads of the whole, intact records at the start of `bytes` are, and how
/// many bytes those records take.
fn split(bytes: &[u8]) -> (Vec<Range<usize>>, usize) {
    let mut payloads = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let hash = u64::from_le_bytes(bytes[at + 4..at + HEADER].try_into().expect("8 bytes"));
        let end = at + HEADER + len;
        match bytes.get(at + HEADER..end) {
            Some(payload) if xxh3_64(payload) == hash => payloads.push(at + HEADER..end),
            _ => break,
        }
        at = end;
    }
    (payloads, at)
}

/// The operations of one record's payload, in order; `None` if it is malformed.
pub fn changes(payload: &[u8]) -> Option<Vec<Change<'_>>> {
    let mut out = Vec::new();
    let mut rest = payload;
    while let Some((&code, tail)) = rest.split_first() {
        let keyspace = Ks::from_code(code)?;
        let (key, tail) = take(tail)?;
        let (len, tail) = u32_at(tail)?;
        let (value, tail) = if len == REMOVED {
            (None, tail)
        } else {
            let (value, tail) = tail.split_at_checked(len as usize)?;
            (Some(value), tail)
        };
        out.push(Change { keyspace, key, value });
        rest = tail;
    }
    Some(out)
}

fn u32_at(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, tail) = bytes.split_at_checked(4)?;
    Some((u32::from_le_bytes(head.try_into().ok()?), tail))
}

fn take(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, tail) = u32_at(bytes)?;
    tail.split_at_checked(len as usize)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    type Op<'a> = (Ks, &'a [u8], Option<&'a [u8]>);
    /// A record read back: (keyspace code, key, value).
    type Read = Vec<(u8, Vec<u8>, Option<Vec<u8>>)>;

    fn record(ops: &[Op]) -> Record {
        let mut r = Record::reusing(Vec::new());
        for (ks, k, v) in ops {
            r.push(*ks, k, *v);
        }
        r
    }

    fn reopen(dir: &Path) -> io::Result<Vec<Read>> {
        let (_, contents) = Journal::open(dir, u64::MAX)?;
        Ok(contents
            .records()
            .map(|p| {
                changes(p)
                    .unwrap()
                    .into_iter()
                    .map(|c| (c.keyspace as u8, c.key.to_vec(), c.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .collect())
    }

    #[test]
    fn records_read_back_in_order_with_removals() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), u64::MAX).unwrap();
        let synced = j.append(
            &mut record(&[(Ks::Mailbox, b"k1", Some(b"v1")), (Ks::Gone, b"", None)]),
            true,
        );
        // Only a synced append says how long its sync took (the metrics count syncs so).
        assert!(synced.unwrap().is_some());
        let unsynced = j.append(&mut record(&[(Ks::Meta, b"seq", Some(b""))]), false);
        assert!(unsynced.unwrap().is_none());
        drop(j);
        let got = reopen(dir.path()).unwrap();
        assert_eq!(
            got,
            vec![
                vec![(0, b"k1".to_vec(), Some(b"v1".to_vec())), (8, vec![], None)],
                vec![(4, b"seq".to_vec(), Some(vec![]))],
            ]
        );
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), u64::MAX).unwrap();
        j.append(&mut record(&[(Ks::Dedup, b"a", Some(b"1"))]), true).unwrap();
        let whole = j.len();
        j.append(&mut record(&[(Ks::Dedup, b"b", Some(b"2"))]), true).unwrap();
        drop(j);
        let file = OpenOptions::new().write(true).open(dir.path().join(FILE)).unwrap();
        file.set_len(whole + 5).unwrap();
        let (mut j, contents) = Journal::open(dir.path(), u64::MAX).unwrap();
        assert_eq!(contents.records().count(), 1);
        assert_eq!(j.len(), whole);
        j.append(&mut record(&[(Ks::Dedup, b"c", Some(b"3"))]), true).unwrap();
        drop(j);
        let keys: Vec<Vec<u8>> = reopen(dir.path())
            .unwrap()
            .into_iter()
            .map(|r| r[0].1.clone())
            .collect();
        assert_eq!(keys, vec![b"a".to_vec(), b"c".to_vec()]);
    }

    #[test]
    fn a_damaged_record_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), u64::MAX).unwrap();
        for key in [b"a", b"b"] {
            j.append(&mut record(&[(Ks::Log, key, Some(b"x"))]), true).unwrap();
        }
        drop(j);
        let file = OpenOptions::new().write(true).open(dir.path().join(FILE)).unwrap();
        file.write_all_at(b"y", HEADER as u64 + 9).unwrap();
        assert!(reopen(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn take_back_and_clear_shorten_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path(), u64::MAX).unwrap();
        j.append(&mut record(&[(Ks::Ids, b"a", None)]), true).unwrap();
        let mut second = record(&[(Ks::Ids, b"b", None)]);
        j.append(&mut second, true).unwrap();
        j.take_back(&second);
        assert_eq!(reopen(dir.path()).unwrap().len(), 1);
        j.clear().unwrap();
        assert_eq!(j.len(), 0);
        assert!(reopen(dir.path()).unwrap().is_empty());
    }

    fn keyspace() -> impl Strategy<Value = Ks> {
        (0u8..11).prop_map(|code| Ks::from_code(code).unwrap())
    }

    proptest! {
        #[test]
        fn records_round_trip(ops in proptest::collection::vec(
            (keyspace(), proptest::collection::vec(any::<u8>(), 0..40), proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300))),
            0..20,
        )) {
            let mut r = Record::reusing(vec![7; 100]);
            for (ks, key, value) in &ops {
                r.push(*ks, key, value.as_deref());
            }
            let sealed = r.seal().unwrap().to_vec();
            let (records, len) = split(&sealed);
            prop_assert_eq!(len, sealed.len());
            let read: Vec<_> = changes(&sealed[records[0].clone()]).unwrap().into_iter()
                .map(|c| (c.keyspace, c.key.to_vec(), c.value.map(<[u8]>::to_vec)))
                .collect();
            prop_assert_eq!(read, ops);
        }

        /// Whatever a damaged file holds, reading it never panics, and whatever it
        /// accepts is a prefix of the file.
        #[test]
        fn any_bytes_are_read_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (records, len) = split(&bytes);
            prop_assert!(len <= bytes.len());
            for record in records {
                let _ = changes(&bytes[record]);
            }
            let _ = changes(&bytes);
        }
    }

    #[test]
    fn malformed_payloads_are_refused() {
        assert!(changes(&[9, 0, 0, 0, 0]).is_none(), "unknown keyspace");
        assert!(changes(&[0, 5, 0, 0, 0, b'a']).is_none(), "short key");
        assert!(changes(&[0, 1, 0, 0, 0, b'a', 2, 0, 0]).is_none(), "short length");
    }
}
