//! Numbered sends: a device's retries recognised without a record per message.
//!
//! A send identified only by its `client_id` needs an idempotency record of its own for a
//! whole dedup window, and writing and compacting those records is about a fifth of the
//! core at full load (docs/performance.md). A device that numbers its sends (`seq`, see
//! docs/protocol.md) promises to retry only its last [`WINDOW`] of them, so the store keeps
//! per device just the receipts of those: one [`Window`], in the `seqs` keyspace in blocks
//! of [`BLOCK`] seqs, each block written once per checkpoint however many messages the
//! device sent into it since. Blocks, not whole windows: a checkpoint then writes what
//! changed (a device that sent one message, one block of at most 64 receipts) rather than
//! up to 1,024 receipts for every device that sent anything, which took the writer
//! 8–20 ms of its 20–40 ms checkpoints at 10,000/s (docs/performance.md).
//!
//! Between checkpoints a receipt is in the journal alone (`seq_receipts`, one small record
//! per message, as before). Replay after a crash puts those records into the
//! `seq_receipts` keyspace, and [`fold`] merges them into the windows at open. Merging is
//! a join: a window is determined by the set of receipts inserted into it, whatever their
//! order and however often each comes (a property test checks this), so a checkpoint or
//! a replay interrupted and done again leaves the same windows.

use std::collections::{BTreeSet, VecDeque};

use chinwag_core::{DcName, Epoch, MessageId, Receipt};
use fjall::{Keyspace, OwnedWriteBatch, PersistMode};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use serde::{Deserialize, Serialize};

use crate::schema::{self, DedupRecord};

/// How far below a device's highest seq its receipts are kept. A send further below is
/// refused, since the store can no longer tell whether it was accepted; a client keeps
/// fewer of its sends unacknowledged than this.
pub const WINDOW: u64 = 1024;

/// Seqs per block of a window in `seqs`: a window spans at most 17 blocks.
pub const BLOCK: u64 = 64;

/// Receipts kept in memory for all devices at most, beyond the windows changed since the
/// last checkpoint: about 32 bytes each, so about 64 MB.
const RESIDENT_MAX: usize = 1 << 21;
/// Windows kept in memory at most, likewise: each costs its key, its map entry and a
/// small allocation (about 200 bytes, estimated from the sizes, not measured) even with
/// one receipt in it. Tests keep 4, so that windows are let go and read back often.
const RESIDENT_WINDOWS_MAX: usize = if cfg!(test) { 4 } else { 1 << 16 };

/// One device's receipts for its last [`WINDOW`] seqs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The DC of every receipt here: only sends accepted in this DC are numbered here.
    origin: DcName,
    /// By seq, ascending, all within [`WINDOW`] of the last.
    entries: VecDeque<Entry>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    seq: u64,
    epoch: u32,
    id_seq: u64,
    at_ms: u64,
}

/// What a window says of a numbered send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    New,
    /// Accepted before, less than a dedup window before the retry.
    Duplicate(Receipt),
    /// Too far below the device's highest to tell.
    TooOld {
        highest: u64,
    },
}

impl Window {
    pub fn new(origin: DcName) -> Self {
        Self {
            origin,
            entries: VecDeque::new(),
        }
    }

    pub fn highest(&self) -> Option<u64> {
        self.entries.back().map(|e| e.seq)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// When the device last sent a message this window remembers.
    pub fn last_used_ms(&self) -> Option<u64> {
        self.entries.iter().map(|e| e.at_ms).max()
    }

    /// Judges `seq` sent now; receipts from before `horizon_ms` no longer count, as for
    /// idempotency records.
    pub fn check(&self, seq: u64, horizon_ms: u64) -> Check {
        let Some(highest) = self.highest() else {
            return Check::New;
        };
        if seq > highest {
            return Check::New;
        }
        if highest - seq >= WINDOW {
            return Check::TooOld { highest };
        }
        match self.find(seq) {
            Ok(i) if self.entries[i].at_ms >= horizon_ms => Check::Duplicate(self.receipt(&self.entries[i])),
            // A gap (a send that never arrived) or a receipt too old to count.
            _ => Check::New,
        }
    }

    /// Remembers `receipt` as `seq`'s, and forgets what falls out of the window. What
    /// falls out goes first, so a window never holds (or allocates for) more than
    /// [`WINDOW`] receipts.
    pub fn insert(&mut self, seq: u64, receipt: &Receipt) {
        if receipt.id.origin != self.origin {
            // Only after the DC was renamed: the old name's receipts cannot be told apart.
            self.entries.clear();
            self.origin = receipt.id.origin.clone();
        }
        let highest = self.highest().map_or(seq, |highest| highest.max(seq));
        if highest - seq >= WINDOW {
            return;
        }
        while self.entries.front().is_some_and(|e| highest - e.seq >= WINDOW) {
            self.entries.pop_front();
        }
        let entry = Entry {
            seq,
            epoch: receipt.id.epoch.0,
            id_seq: receipt.id.seq,
            at_ms: receipt.at_ms,
        };
        // Almost always the device's next number: no search.
        if self.entries.back().is_none_or(|last| seq > last.seq) {
            self.entries.push_back(entry);
        } else {
            match self.find(seq) {
                Ok(i) => self.entries[i] = entry,
                Err(i) => self.entries.insert(i, entry),
            }
        }
        debug_assert!(self.entries.len() as u64 <= WINDOW);
        debug_assert!(
            self.entries
                .iter()
                .zip(self.entries.iter().skip(1))
                .all(|(a, b)| a.seq < b.seq)
        );
    }

    fn find(&self, seq: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&seq, |e| e.seq)
    }

    fn receipt(&self, entry: &Entry) -> Receipt {
        Receipt {
            id: MessageId {
                origin: self.origin.clone(),
                epoch: Epoch(entry.epoch),
                seq: entry.id_seq,
            },
            at_ms: entry.at_ms,
            duplicate: true,
        }
    }

    /// The window whole, as stores of format 5 held it in `seqs` and as each block is
    /// held now: each field of an entry as the difference from the entry before (zigzag
    /// varints), about 5 bytes an entry where a device sends steadily.
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        self.encode_entries(self.entries.iter())
    }

    /// The receipts of `block` (seqs `block * BLOCK ..` the next block's first), encoded
    /// as [`Window::encode`] encodes a window; `None` if it has none.
    fn encode_block(&self, block: u64) -> Option<Vec<u8>> {
        let start = self.entries.partition_point(|e| e.seq / BLOCK < block);
        let end = self.entries.partition_point(|e| e.seq / BLOCK <= block);
        (start < end).then(|| self.encode_entries(self.entries.range(start..end)))
    }

    /// The blocks this window's receipts fall in, ascending. A search per block rather
    /// than a look at every receipt: a checkpoint asks this of every window it writes.
    fn blocks(&self) -> Vec<u64> {
        let mut blocks = Vec::new();
        let mut at = 0;
        while let Some(entry) = self.entries.get(at) {
            let block = entry.seq / BLOCK;
            blocks.push(block);
            at = self.entries.partition_point(|e| e.seq / BLOCK <= block);
        }
        blocks
    }

    /// Adds every receipt of `other` (a block of this device's window, or an old whole
    /// window) as [`Window::insert`] would.
    pub(crate) fn merge(&mut self, other: &Window) {
        for entry in &other.entries {
            self.insert(entry.seq, &other.receipt(entry));
        }
    }

    fn encode_entries<'a>(&self, entries: impl Iterator<Item = &'a Entry>) -> Vec<u8> {
        let mut last = Entry::default();
        let deltas = entries
            .map(|e| {
                let delta = (
                    e.seq.wrapping_sub(last.seq) as i64,
                    e.epoch.wrapping_sub(last.epoch) as i32,
                    e.id_seq.wrapping_sub(last.id_seq) as i64,
                    e.at_ms.wrapping_sub(last.at_ms) as i64,
                );
                last = *e;
                delta
            })
            .collect();
        let record = WindowRecord {
            origin: self.origin.as_str(),
            deltas,
        };
        postcard::to_stdvec(&record).expect("windows always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let record: WindowRecord = postcard::from_bytes(bytes).map_err(|e| e.to_string())?;
        let origin = DcName::parse(record.origin).map_err(|e| format!("origin: {e}"))?;
        let mut window = Window::new(origin);
        let mut last = Entry::default();
        for (seq, epoch, id_seq, at_ms) in record.deltas {
            last = Entry {
                seq: last.seq.wrapping_add(seq as u64),
                epoch: last.epoch.wrapping_add(epoch as u32),
                id_seq: last.id_seq.wrapping_add(id_seq as u64),
                at_ms: last.at_ms.wrapping_add(at_ms as u64),
            };
            if window.highest().is_some_and(|h| h >= last.seq) {
                return Err("seqs out of order".into());
            }
            window.entries.push_back(last);
        }
        if window
            .entries
            .front()
            .zip(window.highest())
            .is_some_and(|(first, h)| h - first.seq >= WINDOW)
        {
            return Err("wider than the window".into());
        }
        Ok(window)
    }
}

#[derive(Serialize, Deserialize)]
struct WindowRecord<'a> {
    origin: &'a str,
    /// (seq, epoch, id seq, time) of each entry, less the entry before's.
    deltas: Vec<(i64, i32, i64, i64)>,
}

/// The windows of the devices the writer has met since the store opened (or since they
/// were last let go), and which changed since the last checkpoint.
pub struct Windows {
    origin: DcName,
    resident: HashMap<Box<[u8]>, Stored>,
    changed: HashSet<Box<[u8]>>,
    /// Entries of all resident windows.
    entries: usize,
}

/// A window, with what `seqs` holds of it.
struct Stored {
    window: Window,
    /// Blocks `seqs` holds (or held: compaction may have dropped expired ones since),
    /// ascending.
    blocks: Vec<u64>,
    /// Blocks with receipts `seqs` does not hold yet.
    dirty: BTreeSet<u64>,
    /// Whether `seqs` holds the window whole, under the device key, as stores of format
    /// 5 wrote it: replaced by blocks at the next checkpoint.
    whole: bool,
}

impl Stored {
    fn insert(&mut self, seq: u64, receipt: &Receipt) {
        self.window.insert(seq, receipt);
        self.dirty.insert(seq / BLOCK);
    }

    /// Whether the next checkpoint must write this window even if no receipt comes:
    /// `seqs` holds it whole, or holds a block it does not need (one that could not be
    /// read, or that the window slid past), which is then removed.
    fn stale(&self) -> bool {
        self.whole || self.blocks != self.window.blocks()
    }

    /// Adds to `batch` what makes `seqs` hold this window: its dirty blocks, and the
    /// removal of blocks (and of a whole window) it no longer needs.
    fn write(&self, device_key: &[u8], batch: &mut OwnedWriteBatch, seqs: &Keyspace) {
        for &block in &self.dirty {
            // None: every receipt of it has left the window since.
            if let Some(bytes) = self.window.encode_block(block) {
                batch.insert(seqs, block_key(device_key, block), bytes);
            }
        }
        let now = self.window.blocks();
        for &gone in self.blocks.iter().filter(|b| now.binary_search(b).is_err()) {
            batch.remove(seqs, block_key(device_key, gone));
        }
        if self.whole {
            batch.remove(seqs, device_key);
        }
    }

    /// `seqs` now holds what [`Stored::write`] added.
    fn written(&mut self) {
        self.blocks = self.window.blocks();
        self.dirty.clear();
        self.whole = false;
    }
}

impl Windows {
    pub fn new(origin: DcName) -> Self {
        Self {
            origin,
            resident: HashMap::default(),
            changed: HashSet::default(),
            entries: 0,
        }
    }

    /// The window of a device (the device key of a `schema::seq_receipt_key`), read from
    /// `seqs` if it is not in memory; it stays there at least until the next checkpoint.
    pub fn window(&mut self, device_key: &[u8], seqs: &Keyspace) -> Result<&Window, fjall::Error> {
        self.stored(device_key, seqs).map(|stored| &stored.window)
    }

    fn stored(&mut self, device_key: &[u8], seqs: &Keyspace) -> Result<&mut Stored, fjall::Error> {
        if !self.resident.contains_key(device_key) {
            let stored = read(seqs, device_key, &self.origin)?;
            self.entries += stored.window.len();
            if stored.stale() {
                self.changed.insert(device_key.into());
            }
            self.resident.insert(device_key.into(), stored);
        }
        Ok(self.resident.get_mut(device_key).expect("just made resident"))
    }

    /// Takes the receipts of numbered sends one durable commit stored, by
    /// `schema::seq_receipt_key`. Their windows were read when the sends were checked and
    /// are only let go at checkpoints, so none is read again here.
    pub fn add(&mut self, receipts: impl IntoIterator<Item = (Vec<u8>, Receipt)>, seqs: &Keyspace) {
        for (key, receipt) in receipts {
            let Some((device_key, seq)) = schema::split_seq_receipt_key(&key) else {
                continue;
            };
            let stored = match self.stored(device_key, seqs) {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a device's window; a retry of this send may be stored again");
                    continue;
                }
            };
            let before = stored.window.len();
            stored.insert(seq, &receipt);
            let after = stored.window.len();
            self.entries = self.entries + after - before;
            if !self.changed.contains(device_key) {
                self.changed.insert(device_key.into());
            }
        }
    }

    /// Windows changed since the last checkpoint.
    pub fn changed(&self) -> usize {
        self.changed.len()
    }

    /// Windows in memory, and the receipts in them.
    pub fn resident(&self) -> (usize, usize) {
        (self.resident.len(), self.entries)
    }

    /// Adds what changed in the windows since the last checkpoint to `batch`.
    pub fn write_changed(&self, batch: &mut OwnedWriteBatch, seqs: &Keyspace) {
        for key in &self.changed {
            self.resident[key].write(key, batch, seqs);
        }
    }

    /// The checkpoint that wrote the changed windows is durable. Lets go of the windows
    /// if too many windows or receipts are in memory: they are in `seqs`.
    pub fn written(&mut self) {
        for key in self.changed.drain() {
            self.resident
                .get_mut(&key)
                .expect("changed windows are resident")
                .written();
        }
        if self.entries > RESIDENT_MAX || self.resident.len() > RESIDENT_WINDOWS_MAX {
            self.resident.clear();
            self.entries = 0;
        }
    }
}

/// `device key ++ block (big-endian)`: a block of a device's window in `seqs`. The block's
/// first byte is below 4 (a block is a seq over 64), so no device key, which ends in a
/// printable device name, equals a block key of a shorter device name.
fn block_key(device_key: &[u8], block: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(device_key.len() + 8);
    key.extend_from_slice(device_key);
    key.extend_from_slice(&block.to_be_bytes());
    key
}

/// A device's window as `seqs` holds it; empty if it has none. A block (or whole window)
/// that cannot be read is left out, with an error in the log, and removed at the next
/// checkpoint: fjall checksums every block, so it would take a bug, and refusing every
/// send of the device forever would be worse than the chance of storing one of its
/// retries twice.
fn read(seqs: &Keyspace, device_key: &[u8], origin: &DcName) -> Result<Stored, fjall::Error> {
    let mut stored = Stored {
        window: Window::new(origin.clone()),
        blocks: Vec::new(),
        dirty: BTreeSet::new(),
        whole: false,
    };
    // Exactly the device key (a whole window of format 5) and the device key followed by
    // a block number, whose first byte is below 4: no key of another device, since
    // device names are printable, however many devices with longer names there are.
    let end = [device_key, &[4]].concat();
    for guard in seqs.range(device_key.to_vec()..end) {
        let (key, bytes) = guard.into_inner()?;
        let block = match &key[device_key.len()..] {
            [] => None,
            rest => match schema::decode_u64(rest) {
                Some(block) => Some(block),
                None => {
                    tracing::error!("a key of no known shape among a window's blocks; left alone");
                    continue;
                }
            },
        };
        match block {
            Some(block) => stored.blocks.push(block),
            None => stored.whole = true,
        }
        match Window::decode(&bytes) {
            Ok(part) => stored.window.merge(&part),
            Err(error) => {
                tracing::error!(%error, ?block, "unreadable part of a window of numbered sends; left out");
            }
        }
    }
    if stored.whole {
        stored.dirty = stored.window.blocks().into_iter().collect();
    }
    Ok(stored)
}

/// Merges the receipts a replay put into `seq_receipts` into their windows in `seqs`, and
/// empties `seq_receipts`, in one synced batch; returns how many there were.
pub fn fold(
    seqs: &Keyspace,
    seq_receipts: &Keyspace,
    db: &fjall::Database,
    origin: &DcName,
) -> Result<usize, fjall::Error> {
    let mut windows: HashMap<Vec<u8>, Stored> = HashMap::default();
    let mut batch = db.batch().durability(Some(PersistMode::SyncAll));
    let mut folded = 0;
    for guard in seq_receipts.iter() {
        let (key, value) = guard.into_inner()?;
        batch.remove(seq_receipts, &*key);
        folded += 1;
        let Some((device_key, seq)) = schema::split_seq_receipt_key(&key) else {
            continue;
        };
        let Ok(record) = postcard::from_bytes::<DedupRecord>(&value) else {
            tracing::error!("unreadable receipt of a numbered send in the journal; a retry of it may be stored again");
            continue;
        };
        let stored = match windows.entry(device_key.to_vec()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(read(seqs, device_key, origin)?),
        };
        let receipt = Receipt {
            id: record.id.into(),
            at_ms: record.at_ms,
            duplicate: false,
        };
        stored.insert(seq, &receipt);
    }
    if folded == 0 {
        return Ok(0);
    }
    for (key, stored) in &windows {
        stored.write(key, &mut batch, seqs);
    }
    batch.commit()?;
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn receipt(id_seq: u64, at_ms: u64) -> Receipt {
        Receipt {
            id: MessageId {
                origin: DcName::parse("east").unwrap(),
                epoch: Epoch(7),
                seq: id_seq,
            },
            at_ms,
            duplicate: false,
        }
    }

    fn window(seqs: &[u64]) -> Window {
        let mut w = Window::new(DcName::parse("east").unwrap());
        for &seq in seqs {
            w.insert(seq, &receipt(seq * 10, 1_000 + seq));
        }
        w
    }

    #[test]
    fn a_window_tells_new_duplicate_and_too_old_seqs_apart() {
        let w = window(&[1, 2, 4, 2000]);
        assert_eq!(w.highest(), Some(2000));
        assert_eq!(w.len(), 1, "seqs 1024 or more below the highest are let go");
        assert_eq!(w.check(2001, 0), Check::New);
        assert_eq!(w.check(4, 0), Check::TooOld { highest: 2000 });
        assert_eq!(w.check(2000 - WINDOW, 0), Check::TooOld { highest: 2000 });
        assert_eq!(w.check(2000 - WINDOW + 1, 0), Check::New, "a gap inside the window");
        let mut dup = receipt(20_000, 3_000);
        dup.duplicate = true;
        assert_eq!(w.check(2000, 0), Check::Duplicate(dup));
        assert_eq!(w.check(2000, 3_001), Check::New, "older than the dedup window");
        let small = window(&[1, 2, 4]);
        assert_eq!(small.check(3, 0), Check::New);
        assert!(matches!(small.check(2, 0), Check::Duplicate(r) if r.id.seq == 20 && r.at_ms == 1_002));
        assert_eq!(Window::new(DcName::parse("east").unwrap()).check(1, 0), Check::New);
    }

    /// What the docs say a window costs: about 5 bytes a receipt on disk for a device that
    /// sends steadily (each message id 500 above the last, as when 500 senders share the
    /// DC's counter, a few milliseconds apart), 32 in memory.
    #[test]
    fn a_steady_devices_window_costs_about_five_bytes_a_receipt() {
        let mut w = Window::new(DcName::parse("east").unwrap());
        for seq in 1..=WINDOW {
            w.insert(seq, &receipt(1_000_000 + 500 * seq, 1_795_774_510_973 + 7 * seq));
        }
        let per_receipt = w.encode().len() as f64 / WINDOW as f64;
        assert!((4.0..6.0).contains(&per_receipt), "{per_receipt} bytes a receipt");
        assert_eq!(std::mem::size_of::<Entry>(), 32);
    }

    #[test]
    fn damaged_windows_are_refused() {
        assert!(Window::decode(b"\xff").is_err());
        let wide = WindowRecord {
            origin: "east",
            deltas: vec![(1, 0, 0, 0), (WINDOW as i64, 0, 0, 0)],
        };
        assert!(Window::decode(&postcard::to_stdvec(&wide).unwrap()).is_err());
        let backwards = WindowRecord {
            origin: "east",
            deltas: vec![(5, 0, 0, 0), (-1, 0, 0, 0)],
        };
        assert!(Window::decode(&postcard::to_stdvec(&backwards).unwrap()).is_err());
    }

    fn inserts() -> impl Strategy<Value = Vec<(u64, u64, u64)>> {
        // Seqs near each other and far apart, so that windows both fill and slide.
        let seq = prop_oneof![1u64..40, 1u64..3000, any::<u64>()];
        proptest::collection::vec((seq, any::<u64>(), any::<u64>()), 0..60)
    }

    fn build(inserts: &[(u64, u64, u64)]) -> Window {
        let mut w = Window::new(DcName::parse("east").unwrap());
        for &(seq, id, at) in inserts {
            w.insert(seq, &receipt(id, at));
        }
        w
    }

    /// An empty `seqs` keyspace, and no window in memory.
    fn fresh() -> (tempfile::TempDir, fjall::Database, Keyspace, Windows) {
        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let seqs = db.keyspace("seqs", fjall::KeyspaceCreateOptions::default).unwrap();
        (dir, db, seqs, Windows::new(east()))
    }

    fn alice() -> chinwag_core::UserId {
        chinwag_core::UserId::parse("alice").unwrap()
    }

    fn receipt_key(device: &str, seq: u64) -> Vec<u8> {
        schema::seq_receipt_key(&alice(), &chinwag_core::DeviceId::parse(device).unwrap(), seq)
    }

    fn device_key(device: &str) -> Vec<u8> {
        schema::device_key(&alice(), &chinwag_core::DeviceId::parse(device).unwrap(), 0)
    }

    /// Writes what changed as a checkpoint does; returns how many keys it wrote or removed.
    fn checkpoint(windows: &mut Windows, db: &fjall::Database, seqs: &Keyspace) -> usize {
        let mut batch = db.batch();
        windows.write_changed(&mut batch, seqs);
        let written = batch.len();
        batch.commit().unwrap();
        windows.written();
        written
    }

    fn east() -> DcName {
        DcName::parse("east").unwrap()
    }

    #[test]
    fn a_checkpoint_writes_only_the_blocks_that_changed() {
        let (_dir, db, seqs, mut windows) = fresh();
        let send = |windows: &mut Windows, seqs_sent: std::ops::RangeInclusive<u64>| {
            windows.add(
                seqs_sent.map(|seq| (receipt_key("phone", seq), receipt(seq * 10, 1_000 + seq))),
                &seqs,
            );
        };
        send(&mut windows, 1..=2000);
        // The window holds seqs 977..=2000: blocks 15 to 31.
        assert_eq!(checkpoint(&mut windows, &db, &seqs), 17);
        send(&mut windows, 2001..=2001);
        assert_eq!(checkpoint(&mut windows, &db, &seqs), 1, "one block changed");
        // Seq 2048 starts block 32 and leaves block 15 behind (the window starts at 1025).
        send(&mut windows, 2002..=2048);
        assert_eq!(
            checkpoint(&mut windows, &db, &seqs),
            3,
            "blocks 31 and 32 written, 15 removed"
        );
        assert_eq!(checkpoint(&mut windows, &db, &seqs), 0, "nothing changed");
        let expected = windows.window(&device_key("phone"), &seqs).unwrap().clone();
        assert_eq!(read(&seqs, &device_key("phone"), &east()).unwrap().window, expected);
        assert_eq!(expected.len() as u64, WINDOW);
        assert_eq!(seqs.len().unwrap(), 17);
    }

    #[test]
    fn a_whole_window_of_format_5_is_read_and_then_written_in_blocks() {
        let (_dir, db, seqs, mut windows) = fresh();
        let whole = window(&[3, 64, 65, 200]);
        seqs.insert(device_key("phone"), whole.encode()).unwrap();
        assert_eq!(*windows.window(&device_key("phone"), &seqs).unwrap(), whole);
        assert_eq!(windows.changed(), 1, "to be written in blocks");
        assert_eq!(
            checkpoint(&mut windows, &db, &seqs),
            4,
            "blocks 0, 1 and 3 written, the whole removed"
        );
        assert_eq!(seqs.get(device_key("phone")).unwrap(), None);
        assert_eq!(read(&seqs, &device_key("phone"), &east()).unwrap().window, whole);
    }

    #[test]
    fn a_devices_window_never_takes_blocks_of_a_device_whose_name_extends_its_own() {
        let (_dir, db, seqs, mut windows) = fresh();
        // "p" + 8 characters is as long as a block key of "p".
        for (device, seq) in [("p", 5), ("ph", 6), ("phone123", 7), ("p12345678", 8)] {
            windows.add([(receipt_key(device, seq), receipt(seq, seq))], &seqs);
        }
        seqs.insert(device_key("p12345670"), window(&[9]).encode()).unwrap();
        checkpoint(&mut windows, &db, &seqs);
        let mut expected = Window::new(east());
        expected.insert(5, &receipt(5, 5));
        assert_eq!(read(&seqs, &device_key("p"), &east()).unwrap().window, expected);
    }

    #[test]
    fn an_unreadable_block_is_left_out_then_removed() {
        let (_dir, db, seqs, mut windows) = fresh();
        windows.add(
            (1..=70).map(|seq| (receipt_key("phone", seq), receipt(seq, seq))),
            &seqs,
        );
        checkpoint(&mut windows, &db, &seqs);
        seqs.insert(block_key(&device_key("phone"), 0), b"\xff").unwrap();
        let mut windows = Windows::new(east());
        assert_eq!(windows.window(&device_key("phone"), &seqs).unwrap().highest(), Some(70));
        assert_eq!(windows.changed(), 1, "to be removed");
        assert_eq!(checkpoint(&mut windows, &db, &seqs), 1);
        assert_eq!(seqs.len().unwrap(), 1, "only block 1 left");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// However the receipts came, whenever checkpoints wrote them, failed or let
        /// the windows go, `seqs` holds the window the writer holds.
        #[test]
        fn blocks_read_back_as_the_window_written(
            inserts in inserts(),
            after in proptest::collection::vec(0u8..4, 60),
        ) {
            let (_dir, db, seqs, mut windows) = fresh();
            for (&(seq, id, at), &then) in inserts.iter().zip(&after) {
                windows.add([(receipt_key("phone", seq), receipt(id, at))], &seqs);
                match then {
                    1 => {
                        checkpoint(&mut windows, &db, &seqs);
                    }
                    // Let go, and read again at the next receipt.
                    2 => {
                        checkpoint(&mut windows, &db, &seqs);
                        windows.resident.clear();
                        windows.entries = 0;
                    }
                    // A checkpoint that failed: its batch never committed.
                    3 => windows.write_changed(&mut db.batch(), &seqs),
                    _ => {}
                }
            }
            checkpoint(&mut windows, &db, &seqs);
            let stored = read(&seqs, &device_key("phone"), &east()).unwrap();
            prop_assert_eq!(&stored.window, &build(&inserts));
            prop_assert_eq!(seqs.len().unwrap(), stored.window.blocks().len());
        }
    }

    proptest! {
        #[test]
        fn windows_round_trip(inserts in inserts()) {
            let w = build(&inserts);
            prop_assert_eq!(Window::decode(&w.encode()).unwrap(), w);
        }

        /// Replay may insert receipts again and in another order than they were stored
        /// (a checkpoint's windows, then the journal's receipts): the window must not
        /// depend on either. Distinct seqs, since a seq's receipt never changes.
        #[test]
        fn a_window_depends_only_on_the_receipts_inserted(
            (inserts, shuffled) in inserts().prop_flat_map(|mut inserts| {
                inserts.sort_by_key(|i| i.0);
                inserts.dedup_by_key(|i| i.0);
                (Just(inserts.clone()), Just(inserts).prop_shuffle())
            }),
            again in 0usize..60,
        ) {
            let mut replayed = shuffled;
            replayed.extend(inserts.iter().take(again).copied());
            prop_assert_eq!(build(&replayed), build(&inserts));
        }
    }
}
