//! The store's own write-ahead journal: what makes a commit durable.
//!
//! Each commit group is appended as one record of physical operations (put or remove a
//! key in a keyspace) and the file is synced before anyone is answered; fjall receives
//! the same group without a sync of its own. Messages are the exception: a new message
//! is written only here and kept in memory (`Shared::hot`), because most are acknowledged
//! within milliseconds and then never need to reach fjall at all. A checkpoint
//! (`Writer::checkpoint`) writes the messages still held in memory to fjall, syncs fjall
//! and empties this file.
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
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

pub const FILE: &str = "journal";

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
}

impl Ks {
    const ALL: [Ks; 9] = [
        Ks::Mailbox,
        Ks::Dedup,
        Ks::Depth,
        Ks::Coords,
        Ks::Meta,
        Ks::Log,
        Ks::Streams,
        Ks::Ids,
        Ks::Gone,
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
        self.bytes.push(keyspace as u8);
        self.bytes.extend_from_slice(&length(key).to_le_bytes());
        self.bytes.extend_from_slice(key);
        let at = self.bytes.len();
        self.bytes.extend_from_slice(&[0; 4]);
        self.bytes = postcard::to_extend(value, std::mem::take(&mut self.bytes)).expect("records always encode");
        let len = length(&self.bytes[at + 4..]);
        self.bytes[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }

    pub fn push(&mut self, keyspace: Ks, key: &[u8], value: Option<&[u8]>) {
        self.bytes.push(keyspace as u8);
        self.bytes.extend_from_slice(&length(key).to_le_bytes());
        self.bytes.extend_from_slice(key);
        match value {
            Some(value) => {
                self.bytes.extend_from_slice(&length(value).to_le_bytes());
                self.bytes.extend_from_slice(value);
            }
            None => self.bytes.extend_from_slice(&REMOVED.to_le_bytes()),
        }
    }

    /// The record with its header, ready to append.
    fn seal(&mut self) -> &[u8] {
        let payload = &self.bytes[HEADER..];
        let hash = xxh3_64(payload);
        let len = length(payload);
        self.bytes[..4].copy_from_slice(&len.to_le_bytes());
        self.bytes[4..HEADER].copy_from_slice(&hash.to_le_bytes());
        &self.bytes
    }
}

/// Keys and values are bounded far below 4 GiB (frames, ids and records are small), and
/// a commit group is bounded by `commit_batch_max`.
fn length(bytes: &[u8]) -> u32 {
    u32::try_from(bytes.len()).expect("journal items are far below 4 GiB")
}

/// Why the journal could not be read at open.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("record at byte {offset} is damaged and is not the last one")]
    Damaged { offset: u64 },
}

pub struct Journal {
    file: File,
    path: PathBuf,
    /// Bytes of whole records; the next record goes here.
    len: u64,
}

impl Journal {
    /// Opens the journal in `dir` and returns it with the payloads of its whole records.
    /// A last record cut short (a crash during its write, before it was synced and so
    /// before anyone was answered) is dropped; a damaged record followed by others is an
    /// error, since those others may have been acknowledged.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Vec<u8>>), ReadError> {
        let path = dir.join(FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        let (payloads, len) = split(&bytes)?;
        if len < bytes.len() {
            tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() - len, "dropping a journal record cut short by a crash");
        }
        let journal = Journal {
            file,
            path,
            len: len as u64,
        };
        Ok((journal, payloads))
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a record, synced if `sync`. On failure the file is cut back to where it was,
    /// so a half-written record is never followed by others.
    pub fn append(&mut self, record: &mut Record, sync: bool) -> io::Result<()> {
        let bytes = record.seal();
        let written = self
            .file
            .write_all_at(bytes, self.len)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.cut(self.len)?;
                Err(e)
            }
        }
    }

    /// Takes back the last record, of `len` bytes (its commit to fjall failed).
    pub fn take_back(&mut self, record: &Record) -> io::Result<()> {
        let to = self.len - record.bytes.len() as u64;
        self.cut(to)?;
        self.len = to;
        Ok(())
    }

    /// Empties the journal once fjall durably holds everything in it.
    pub fn clear(&mut self) -> io::Result<()> {
        self.cut(0)?;
        self.len = 0;
        Ok(())
    }

    fn cut(&self, to: u64) -> io::Result<()> {
        self.file.set_len(to)?;
        self.file.sync_all()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The payloads of the whole records at the start of `bytes`, and how many bytes they take.
fn split(bytes: &[u8]) -> Result<(Vec<Vec<u8>>, usize), ReadError> {
    let mut payloads = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= HEADER {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let hash = u64::from_le_bytes(bytes[at + 4..at + HEADER].try_into().expect("8 bytes"));
        let end = at + HEADER + len;
        let Some(payload) = bytes.get(at + HEADER..end) else {
            break;
        };
        if xxh3_64(payload) != hash {
            if end < bytes.len() {
                return Err(ReadError::Damaged { offset: at as u64 });
            }
            break;
        }
        payloads.push(payload.to_vec());
        at = end;
    }
    Ok((payloads, at))
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

    fn reopen(dir: &Path) -> Result<Vec<Read>, ReadError> {
        let (_, payloads) = Journal::open(dir)?;
        Ok(payloads
            .iter()
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
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(
            &mut record(&[(Ks::Mailbox, b"k1", Some(b"v1")), (Ks::Gone, b"", None)]),
            true,
        )
        .unwrap();
        j.append(&mut record(&[(Ks::Meta, b"seq", Some(b""))]), false).unwrap();
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
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&mut record(&[(Ks::Dedup, b"a", Some(b"1"))]), true).unwrap();
        let whole = j.len();
        j.append(&mut record(&[(Ks::Dedup, b"b", Some(b"2"))]), true).unwrap();
        drop(j);
        let file = OpenOptions::new().write(true).open(dir.path().join(FILE)).unwrap();
        file.set_len(whole + 5).unwrap();
        let (mut j, payloads) = Journal::open(dir.path()).unwrap();
        assert_eq!(payloads.len(), 1);
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
    fn a_damaged_record_followed_by_others_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for key in [b"a", b"b"] {
            j.append(&mut record(&[(Ks::Log, key, Some(b"x"))]), true).unwrap();
        }
        drop(j);
        let file = OpenOptions::new().write(true).open(dir.path().join(FILE)).unwrap();
        file.write_all_at(b"y", HEADER as u64 + 9).unwrap();
        assert!(matches!(reopen(dir.path()), Err(ReadError::Damaged { offset: 0 })));
    }

    #[test]
    fn take_back_and_clear_shorten_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&mut record(&[(Ks::Ids, b"a", None)]), true).unwrap();
        let mut second = record(&[(Ks::Ids, b"b", None)]);
        j.append(&mut second, true).unwrap();
        j.take_back(&second).unwrap();
        assert_eq!(reopen(dir.path()).unwrap().len(), 1);
        j.clear().unwrap();
        assert_eq!(j.len(), 0);
        assert!(reopen(dir.path()).unwrap().is_empty());
    }

    fn keyspace() -> impl Strategy<Value = Ks> {
        (0u8..9).prop_map(|code| Ks::from_code(code).unwrap())
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
            let sealed = r.seal().to_vec();
            let (payloads, len) = split(&sealed).unwrap();
            prop_assert_eq!(len, sealed.len());
            let read: Vec<_> = changes(&payloads[0]).unwrap().into_iter()
                .map(|c| (c.keyspace, c.key.to_vec(), c.value.map(<[u8]>::to_vec)))
                .collect();
            prop_assert_eq!(read, ops);
        }

        /// Whatever a damaged file holds, reading it never panics, and whatever it
        /// accepts is a prefix of the file.
        #[test]
        fn any_bytes_are_read_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok((payloads, len)) = split(&bytes) {
                prop_assert!(len <= bytes.len());
                for payload in &payloads {
                    let _ = changes(payload);
                }
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
