//! Numbered sends: a device's retries recognised without a record per message.
//!
//! A send identified only by its `client_id` needs an idempotency record of its own for a
//! whole dedup window, and writing and compacting those records is about a fifth of the
//! core at full load (docs/performance.md). A device that numbers its sends (`seq`, see
//! docs/protocol.md) promises to retry only its last [`WINDOW`] of them, so the store keeps
//! per device just the receipts of those: one [`Window`], in the `seqs` keyspace, written
//! once per checkpoint however many messages the device sent since.
//!
//! Between checkpoints a receipt is in the journal alone (`seq_receipts`, one small record
//! per message, as before). Replay after a crash puts those records into the
//! `seq_receipts` keyspace, and [`fold`] merges them into the windows at open. Merging is
//! a join: a window is determined by the set of receipts inserted into it, whatever their
//! order and however often each comes (a property test checks this), so a checkpoint or
//! a replay interrupted and done again leaves the same windows.

use std::collections::VecDeque;

use chinwag_core::{DcName, Epoch, MessageId, Receipt};
use fjall::{Keyspace, OwnedWriteBatch, PersistMode};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use serde::{Deserialize, Serialize};

use crate::schema::{self, DedupRecord};

/// How far below a device's highest seq its receipts are kept. A send further below is
/// refused, since the store can no longer tell whether it was accepted; a client keeps
/// fewer of its sends unacknowledged than this.
pub const WINDOW: u64 = 1024;

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

    /// The window as the `seqs` keyspace stores it: each field of an entry as the
    /// difference from the entry before (zigzag varints), about 5 bytes an entry where a
    /// device sends steadily.
    pub fn encode(&self) -> Vec<u8> {
        let mut last = Entry::default();
        let deltas = self
            .entries
            .iter()
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
    resident: HashMap<Box<[u8]>, Window>,
    changed: HashSet<Box<[u8]>>,
    /// Entries of all resident windows.
    entries: usize,
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
    pub fn window(&mut self, device_key: &[u8], seqs: &Keyspace) -> Result<&mut Window, fjall::Error> {
        if !self.resident.contains_key(device_key) {
            let window = read(seqs, device_key, &self.origin)?;
            self.entries += window.len();
            self.resident.insert(device_key.into(), window);
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
            let window = match self.window(device_key, seqs) {
                Ok(window) => window,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a device's window; a retry of this send may be stored again");
                    continue;
                }
            };
            let before = window.len();
            window.insert(seq, &receipt);
            let after = window.len();
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

    /// Adds every window changed since the last checkpoint to `batch`.
    pub fn write_changed(&self, batch: &mut OwnedWriteBatch, seqs: &Keyspace) {
        for key in &self.changed {
            batch.insert(seqs, &**key, self.resident[key].encode());
        }
    }

    /// The checkpoint that wrote the changed windows is durable. Lets go of the windows
    /// that did not change if too many windows or receipts are in memory: they are in
    /// `seqs`.
    pub fn written(&mut self) {
        self.changed.clear();
        if self.entries > RESIDENT_MAX || self.resident.len() > RESIDENT_WINDOWS_MAX {
            self.resident.clear();
            self.entries = 0;
        }
    }
}

/// A device's window as `seqs` holds it; empty if it has none. One that cannot be read is
/// replaced by an empty one, with an error in the log: fjall checksums every block, so it
/// would take a bug, and refusing every send of the device forever would be worse than
/// the chance of storing one of its retries twice.
fn read(seqs: &Keyspace, device_key: &[u8], origin: &DcName) -> Result<Window, fjall::Error> {
    let Some(bytes) = seqs.get(device_key)? else {
        return Ok(Window::new(origin.clone()));
    };
    Ok(Window::decode(&bytes).unwrap_or_else(|error| {
        tracing::error!(%error, "unreadable window of numbered sends; starting it again");
        Window::new(origin.clone())
    }))
}

/// Merges the receipts a replay put into `seq_receipts` into their windows in `seqs`, and
/// empties `seq_receipts`, in one synced batch; returns how many there were.
pub fn fold(
    seqs: &Keyspace,
    seq_receipts: &Keyspace,
    db: &fjall::Database,
    origin: &DcName,
) -> Result<usize, fjall::Error> {
    let mut windows: HashMap<Vec<u8>, Window> = HashMap::default();
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
        let window = match windows.entry(device_key.to_vec()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(read(seqs, device_key, origin)?),
        };
        let receipt = Receipt {
            id: record.id.into(),
            at_ms: record.at_ms,
            duplicate: false,
        };
        window.insert(seq, &receipt);
    }
    if folded == 0 {
        return Ok(0);
    }
    for (key, window) in &windows {
        batch.insert(seqs, key, window.encode());
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
