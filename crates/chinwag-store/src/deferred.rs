//! Idempotency records and mailbox depths: journaled with every commit, written to fjall
//! only in bulk.
//!
//! Each new message adds one idempotency record and changes its recipient's depth twice
//! (stored, then acknowledged). Put into fjall's memtables one by one, those writes were
//! most of what fjall still cost a message once messages themselves were held out of it:
//! inserting into the skiplists, then walking them again to write each memtable out, on
//! the core the messages need (docs/performance.md, "Idempotency records written in
//! bulk"). The writer keeps them here instead:
//!
//! - idempotency records until enough have gathered, then hands them to a thread of their
//!   own, at a lower priority, that writes them as sorted tables (fjall's ingestion, which bypasses the memtable
//!   and is synced before it returns). Writing 65,536 took the writer 50–190 ms, a pause
//!   every few seconds for every message behind it; on its own thread that time is shared
//!   out with the rest of the node, in short steps ([`Pace`]). Until they are written
//!   they are still answered from here;
//! - which mailboxes' depths changed, until the next checkpoint writes each once.
//!
//! Both are in the journal, so a crash loses neither: replay puts them into fjall. A
//! checkpoint, which empties the journal, carries the records still held into the new
//! one ([`Deferred::carry`]) rather than waiting for the spill thread.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use chinwag_core::{Receipt, UserId};
use fjall::{Keyspace, OwnedWriteBatch};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use crate::journal::{Ks, Record};
use crate::schema;

type Receipts = HashMap<Vec<u8>, Receipt>;

pub struct Deferred {
    /// Receipts of messages stored since the last spill, by idempotency key.
    receipts: Receipts,
    /// Receipts the spill thread is writing.
    spilling: Option<Arc<Receipts>>,
    jobs: SyncSender<Arc<Receipts>>,
    done: Receiver<Result<usize, fjall::Error>>,
    /// Mailboxes whose depth changed since the last checkpoint.
    depths: HashSet<UserId>,
    /// Receipts gathered before a spill: each new map is made this large at once, since
    /// growing one from empty moved every receipt about once more (most of the 3.5 % of
    /// the writer's time at saturation that rehashing receipt maps took).
    capacity: usize,
    /// Tells the spill thread to stop pausing between steps (see [`Pace`]).
    hurry: Arc<AtomicBool>,
    /// When the last batch was handed to the spill thread.
    handed_at: Option<Instant>,
}

/// How the spill thread shares the core with the messages. Sorting and writing 65,536
/// records, and syncing them, takes it 62–66 ms at 10,000 messages/s; done in one go, the messages that arrive meanwhile wait
/// behind its time slices, and at 10,000 messages/s the seconds with a spill had a p99
/// three to six times the others' (docs/performance.md, "Idempotency records written in
/// short steps"). So it works in steps of [`STEP`] records and sleeps [`PAUSE`] after
/// each, which adds at least 0.13 s to a spill, unless the writer says to hurry: it waits
/// for the spill, the batch filled in less than [`CALM`], or a quarter of the next batch
/// has gathered before this one is written (at 10,000 messages/s a batch takes 6.5 s, and
/// about 2,000 gather meanwhile). Under loads like those the node has no quiet moments
/// to spare, and at saturation the pauses seemed to cost about 5 % of the messages
/// delivered (3 alternated pairs).
struct Pace {
    hurry: Arc<AtomicBool>,
}

/// Records sorted or written in one step: about 0.2–0.6 ms of work.
const STEP: usize = 1024;
const PAUSE: Duration = Duration::from_millis(1);
/// Batches that fill faster than this are written without pauses: 32,768 records a
/// second, at the default batch size.
const CALM: Duration = Duration::from_secs(2);

impl Pace {
    fn hurried(&self) -> bool {
        self.hurry.load(Ordering::Relaxed)
    }

    fn step(&self) {
        if !self.hurried() {
            std::thread::sleep(PAUSE);
        }
    }
}

/// The spill thread's name (the kernel keeps 15 bytes).
const SPILL_THREAD: &str = "chinwag-spill";

impl Deferred {
    /// Starts the thread that writes receipts into `dedup`, in batches of about
    /// `capacity`; it ends when this is dropped.
    pub fn new(dedup: Keyspace, capacity: usize) -> std::io::Result<Self> {
        let (jobs, jobs_rx) = sync_channel::<Arc<Receipts>>(1);
        let (done_tx, done) = sync_channel(1);
        let hurry = Arc::new(AtomicBool::new(false));
        let pace = Pace { hurry: hurry.clone() };
        std::thread::Builder::new().name(SPILL_THREAD.into()).spawn(move || {
            if let Err(e) = crate::sched::background() {
                tracing::warn!(error = %e, "could not lower the priority of the thread writing idempotency records");
            }
            for receipts in jobs_rx {
                #[cfg(test)]
                hold::wait_while_held(capacity);
                let started = std::time::Instant::now();
                let result = write(&dedup, &receipts, &pace);
                let micros = started.elapsed().as_micros();
                tracing::debug!(
                    records = receipts.len(),
                    micros,
                    ok = result.is_ok(),
                    "idempotency records written"
                );
                if done_tx.send(result).is_err() {
                    return;
                }
                // Most often the last reference: the map is freed here, not in the writer.
                drop(receipts);
            }
        })?;
        Ok(Self {
            receipts: Receipts::with_capacity_and_hasher(capacity, Default::default()),
            spilling: None,
            jobs,
            done,
            depths: HashSet::default(),
            capacity,
            hurry,
            handed_at: None,
        })
    }

    pub fn receipt(&self, dedup_key: &[u8]) -> Option<&Receipt> {
        self.receipts
            .get(dedup_key)
            .or_else(|| self.spilling.as_ref()?.get(dedup_key))
    }

    /// Takes what one durable commit wrote to the journal alone.
    pub fn add<'a>(
        &mut self,
        receipts: impl IntoIterator<Item = (Vec<u8>, Receipt)>,
        depths: impl IntoIterator<Item = &'a UserId>,
    ) {
        self.receipts.extend(receipts);
        if self.spilling.is_some() && self.receipts.len() >= self.capacity / 4 {
            // Under this much load pausing would only let the next batch pile up.
            self.hurry.store(true, Ordering::Relaxed);
        }
        for user in depths {
            if !self.depths.contains(user) {
                self.depths.insert(user.clone());
            }
        }
    }

    /// Receipts not yet handed to the spill thread.
    pub fn receipts(&self) -> usize {
        self.receipts.len()
    }

    /// Receipts held in memory, the spill thread's included.
    pub fn receipts_held(&self) -> usize {
        self.receipts.len() + self.spilling.as_ref().map_or(0, |r| r.len())
    }

    pub fn depths(&self) -> usize {
        self.depths.len()
    }

    /// Hands the receipts to the spill thread, unless it is still busy with the last.
    pub fn start_spill(&mut self) {
        self.hand_over(false);
    }

    /// [`Deferred::start_spill`], the spill to be written at the pace `hurry` says.
    fn hand_over(&mut self, hurry: bool) {
        if self.spilling.is_some() || self.receipts.is_empty() {
            return;
        }
        let filled_fast = self.handed_at.is_some_and(|at| at.elapsed() < CALM);
        self.handed_at = Some(Instant::now());
        self.hurry.store(hurry || filled_fast, Ordering::Relaxed);
        let empty = Receipts::with_capacity_and_hasher(self.capacity, Default::default());
        let receipts = Arc::new(std::mem::replace(&mut self.receipts, empty));
        if self.jobs.send(receipts.clone()).is_ok() {
            self.spilling = Some(receipts);
        } else {
            // The thread is gone; `finish_spill` reports it.
            self.receipts = Arc::unwrap_or_clone(receipts);
        }
    }

    /// The outcome of the spill in progress, if it has ended.
    pub fn poll(&mut self) -> Option<Result<usize, fjall::Error>> {
        self.spilling.as_ref()?;
        let result = self.done.try_recv().ok()?;
        Some(self.spilled(result))
    }

    /// Waits for the spill in progress, if any, to end (see `Op::Settle`).
    pub fn settle(&mut self) {
        if let Some(Err(e)) = self.wait() {
            tracing::error!(error = %e, "cannot write idempotency records; they stay in memory until this succeeds");
        }
    }

    /// Writes every receipt held, waiting for the spill thread (a checkpoint must not
    /// empty the journal of one fjall lacks); returns how many it waited for.
    pub fn finish_spill(&mut self) -> Result<usize, fjall::Error> {
        let in_progress = self.wait().transpose()?.unwrap_or(0);
        self.hand_over(true);
        let rest = self.wait().transpose()?.unwrap_or(0);
        if self.receipts.is_empty() {
            Ok(in_progress + rest)
        } else {
            Err(stopped())
        }
    }

    /// Adds every receipt held, the spill thread's first, to `record`; returns how many.
    /// A checkpoint carries them into the next journal instead of waiting for them to be
    /// written: the spill thread's may still fail and be taken back, and the rest are
    /// written at the next spill, which need not be early.
    pub fn carry(&self, record: &mut Record) -> usize {
        let spilling = self.spilling.iter().flat_map(|r| r.iter());
        let mut carried = 0;
        // A key in both holds the newer receipt in `receipts`; it comes last and wins.
        for (key, receipt) in spilling.chain(&self.receipts) {
            record.push_encoded(Ks::Dedup, key, &schema::dedup_view(receipt));
            carried += 1;
        }
        carried
    }

    /// The outcome of the spill in progress, waiting for it; `None` if there is none.
    fn wait(&mut self) -> Option<Result<usize, fjall::Error>> {
        self.spilling.as_ref()?;
        self.hurry.store(true, Ordering::Relaxed);
        let result = self.done.recv().unwrap_or_else(|_| Err(stopped()));
        Some(self.spilled(result))
    }

    /// Forgets the receipts just written, or takes them back if writing them failed.
    fn spilled(&mut self, result: Result<usize, fjall::Error>) -> Result<usize, fjall::Error> {
        let spilled = self.spilling.take().expect("a spill was in progress");
        if result.is_err() {
            // Receipts gathered since are newer; keep those.
            for (key, receipt) in spilled.iter() {
                self.receipts.entry(key.clone()).or_insert_with(|| receipt.clone());
            }
        }
        result
    }

    /// Adds the depth of every mailbox changed since the last checkpoint to `batch`, as
    /// `depths` (the writer's, where an empty mailbox has no entry) has it now.
    pub fn write_depths(&self, batch: &mut OwnedWriteBatch, keyspace: &Keyspace, depths: &HashMap<UserId, u64>) {
        for user in &self.depths {
            let key = user.as_str().as_bytes();
            match schema::depth_value(depths.get(user).copied().unwrap_or(0)) {
                Some(value) => batch.insert(keyspace, key, value),
                None => batch.remove(keyspace, key),
            }
        }
    }

    /// The checkpoint that wrote the depths is durable.
    pub fn depths_written(&mut self) {
        self.depths.clear();
    }
}

/// A test's way to stall the spill thread, as fjall slowing its writes would: while
/// `HOLD` is set, the spill thread of a store whose records are written [`CAPACITY`] at a
/// time (no other test uses that) waits before each write, at most a minute.
#[cfg(test)]
pub mod hold {
    use std::sync::atomic::{AtomicBool, Ordering};

    pub const CAPACITY: usize = 9;
    pub static HOLD: AtomicBool = AtomicBool::new(false);

    pub fn wait_while_held(capacity: usize) {
        crate::expiry::hold::wait_while(|| capacity == CAPACITY && HOLD.load(Ordering::SeqCst));
    }
}

fn stopped() -> fjall::Error {
    fjall::Error::from(std::io::Error::other(
        "the thread writing idempotency records has stopped",
    ))
}

/// Writes `receipts` into `dedup` as new tables, synced when this returns, in steps
/// paced by `pace`.
fn write(dedup: &Keyspace, receipts: &Receipts, pace: &Pace) -> Result<usize, fjall::Error> {
    let mut entries: Vec<_> = receipts.iter().collect();
    // Runs only serve the pauses; merging them costs more comparisons than one sort.
    let run_len = if pace.hurried() { entries.len().max(1) } else { STEP };
    for run in entries.chunks_mut(run_len) {
        run.sort_unstable_by(|a, b| a.0.cmp(b.0));
        pace.step();
    }
    let runs: Vec<_> = entries.chunks(run_len).collect();
    let mut ingestion = dedup.start_ingestion()?;
    for (n, (key, receipt)) in merged(&runs).enumerate() {
        if n > 0 && n % STEP == 0 {
            pace.step();
        }
        ingestion.write(key.as_slice(), schema::encode_dedup(receipt))?;
    }
    ingestion.finish()?;
    Ok(receipts.len())
}

/// The entries of sorted `runs` in ascending key order. Ingestion takes keys strictly
/// ascending (it panics otherwise); a map's keys are distinct, so merging is enough.
fn merged<'a, V>(runs: &[&'a [(&'a Vec<u8>, V)]]) -> impl Iterator<Item = &'a (&'a Vec<u8>, V)> {
    // Each run's next entry, smallest key first: (key, run, position in the run).
    let mut heads: BinaryHeap<Reverse<(&[u8], usize, usize)>> = runs
        .iter()
        .enumerate()
        .filter_map(|(r, run)| Some(Reverse((run.first()?.0.as_slice(), r, 0))))
        .collect();
    std::iter::from_fn(move || {
        let Reverse((_, r, at)) = heads.pop()?;
        if let Some(next) = runs[r].get(at + 1) {
            heads.push(Reverse((next.0.as_slice(), r, at + 1)));
        }
        Some(&runs[r][at])
    })
}

#[cfg(test)]
mod tests {
    use chinwag_core::{DcName, Epoch, MessageId};

    use super::*;

    fn receipt(seq: u64) -> Receipt {
        Receipt {
            id: MessageId {
                origin: DcName::parse("local").unwrap(),
                epoch: Epoch(1),
                seq,
            },
            at_ms: 1_000 + seq,
            duplicate: false,
        }
    }

    fn dedup_keyspace(dir: &std::path::Path) -> Keyspace {
        let db = fjall::Database::builder(dir).open().unwrap();
        db.keyspace("dedup", fjall::KeyspaceCreateOptions::default).unwrap()
    }

    #[test]
    fn written_receipts_are_in_fjall_and_no_longer_held() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = dedup_keyspace(dir.path());
        let mut deferred = Deferred::new(dedup.clone(), 16).unwrap();
        // Inserted out of order: ingestion needs them sorted.
        let keys: Vec<Vec<u8>> = [b"c".as_slice(), b"a", b"b"].map(<[u8]>::to_vec).into();
        deferred.add(keys.iter().cloned().zip((1..).map(receipt)), []);
        deferred.start_spill();
        assert_eq!(
            deferred.receipt(b"a"),
            Some(&receipt(2)),
            "answered while being written"
        );
        assert_eq!(deferred.finish_spill().unwrap(), 3);
        assert_eq!((deferred.receipts_held(), deferred.receipt(b"a")), (0, None));
        for (key, seq) in keys.iter().zip(1..) {
            let stored = dedup.get(key).unwrap().expect("written");
            assert_eq!(stored.as_ref(), schema::encode_dedup(&receipt(seq)));
        }
    }

    #[test]
    fn a_failed_write_keeps_its_receipts_but_not_over_newer_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut deferred = Deferred::new(dedup_keyspace(dir.path()), 16).unwrap();
        let failed: Receipts = [(b"a".to_vec(), receipt(1)), (b"b".to_vec(), receipt(2))]
            .into_iter()
            .collect();
        deferred.spilling = Some(Arc::new(failed));
        // A retry window later, the same key was used again while the write was failing.
        deferred.add([(b"a".to_vec(), receipt(3))], []);
        assert!(deferred.spilled(Err(stopped())).is_err());
        assert!(deferred.spilling.is_none());
        assert_eq!(deferred.receipt(b"a"), Some(&receipt(3)));
        assert_eq!(deferred.receipt(b"b"), Some(&receipt(2)));
        assert_eq!(deferred.receipts(), 2);
    }

    proptest::proptest! {
        #[test]
        fn merged_runs_come_out_in_ascending_order_each_entry_once(
            keys in proptest::collection::hash_set(proptest::collection::vec(0u8..4, 0..6), 0..40),
            step in 1usize..7,
        ) {
            let mut entries: Vec<(&Vec<u8>, u8)> = keys.iter().map(|k| (k, 0)).collect();
            for run in entries.chunks_mut(step) {
                run.sort_unstable_by(|a, b| a.0.cmp(b.0));
            }
            let runs: Vec<_> = entries.chunks(step).collect();
            let out: Vec<&Vec<u8>> = merged(&runs).map(|e| e.0).collect();
            let mut expected: Vec<&Vec<u8>> = keys.iter().collect();
            expected.sort();
            proptest::prop_assert_eq!(out, expected);
        }
    }

    #[test]
    fn the_spill_thread_hurries_under_load_and_paces_itself_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let mut deferred = Deferred::new(dedup_keyspace(dir.path()), 16).unwrap();
        let hurried = |d: &Deferred| d.hurry.load(Ordering::Relaxed);
        let records = |from: u64, n: u64| (from..from + n).map(|i| (i.to_be_bytes().to_vec(), receipt(i)));
        deferred.add(records(0, 16), []);
        // Nothing is being written: gathering is no reason to hurry.
        assert!(!hurried(&deferred));
        deferred.start_spill();
        deferred.add(records(16, 3), []);
        assert!(!hurried(&deferred), "3 of 16 gathered");
        deferred.add(records(19, 1), []);
        assert!(hurried(&deferred), "4 of 16 gathered while writing");
        deferred.finish_spill().unwrap();
        // Handed over just after the last: a batch filled that fast hurries.
        deferred.handed_at = Some(Instant::now());
        deferred.add(records(20, 1), []);
        deferred.start_spill();
        assert!(hurried(&deferred), "filled in less than {CALM:?}");
        deferred.settle();
        deferred.handed_at = Instant::now().checked_sub(CALM);
        deferred.add(records(21, 1), []);
        deferred.start_spill();
        assert!(
            !hurried(&deferred),
            "a batch that filled slowly is written at its own pace"
        );
        deferred.settle();
    }

    #[test]
    fn each_changed_depth_is_written_once_as_it_is_now() {
        let dir = tempfile::tempdir().unwrap();
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let depth = db.keyspace("depth", fjall::KeyspaceCreateOptions::default).unwrap();
        depth.insert("gone", schema::encode_u64(4)).unwrap();
        let mut deferred =
            Deferred::new(db.keyspace("dedup", fjall::KeyspaceCreateOptions::default).unwrap(), 16).unwrap();
        let (kept, gone) = (UserId::parse("kept").unwrap(), UserId::parse("gone").unwrap());
        deferred.add([], [&kept, &gone, &kept]);
        assert_eq!(deferred.depths(), 2);
        let now: HashMap<UserId, u64> = [(kept.clone(), 7)].into_iter().collect();
        let mut batch = db.batch();
        deferred.write_depths(&mut batch, &depth, &now);
        batch.commit().unwrap();
        deferred.depths_written();
        assert_eq!(depth.get("kept").unwrap().unwrap().as_ref(), schema::encode_u64(7));
        assert!(depth.get("gone").unwrap().is_none(), "an emptied mailbox has no depth");
        assert_eq!(deferred.depths(), 0);
    }
}
