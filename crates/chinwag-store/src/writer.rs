//! The single writer thread and its group commit.
//!
//! Every write goes through one thread, which takes whatever operations are waiting (up to
//! `commit_batch_max`), turns them into one atomic fjall write batch and makes it durable
//! with one fsync of the store's journal ([`crate::journal`]). Throughput therefore grows with load instead of being
//! capped at one fsync per message, and the order of commits is the order of this
//! thread's loop: that is what gives seqs, and the commit listener, a single total order.
//!
//! Because only this thread writes, the state that decides a write — the next seqs, each
//! mailbox's depth, which idempotency keys and message ids exist, how far each stream is
//! applied — is known here exactly. A batch cannot read its own writes, so it keeps its
//! own changes aside ([`Pending`]) and they become the writer's state only once the batch
//! is durable.
//!
//! When replicating, each local change is also appended to this DC's own stream in the
//! same batch (see [`crate::schema::Entry`]), and entries of other DCs' streams are applied
//! here too ([`Writer::ingest`]).

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chinwag_core::{
    CommitListener, Coordinate, DcName, Epoch, Message, MessageId, NewMessage, Receipt, SharedMessage, StoreError,
    UserId,
};
use chinwag_replication::{StreamId, VersionVector};
use fjall::PersistMode;
use tokio::sync::{mpsc, oneshot, watch};

use crate::batch::Batch;
use crate::deferred::Deferred;
use crate::expiry;
use crate::highest::Highest;
use crate::journal::{Journal, Ks, Next, Record};
use crate::numbered::{Check, Windows};
use crate::schema::{self, DedupRecord, Entry, IdRecord, MessageRecord, SnapshotItem, StreamState};
use crate::watermark::Watermark;
use crate::{Sealing, Shared, StoreOptions, Tables};

pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub enum Op {
    Append(NewMessage, Reply<Receipt>),
    Ack(UserId, Vec<u64>, Reply<()>),
    AddCoordinate(UserId, Coordinate, Reply<()>),
    RemoveCoordinate(UserId, Coordinate, Reply<()>),
    /// Apply entries of another DC's stream, numbered from `first`; answers how far the
    /// stream is applied afterwards.
    Ingest(StreamId, u64, Vec<Vec<u8>>, Reply<u64>),
    /// Drop a log prefix every peer has; answered once asked for, not once dropped.
    Truncate(StreamId, u64, Reply<()>),
    /// Drop the coordinates of a DC that has gone silent (not logged: a local belief).
    ForgetCoordinates(DcName, Reply<()>),
    /// Merge another DC's snapshot; answers what is applied afterwards.
    MergeSnapshot(VersionVector, Vec<Vec<u8>>, Reply<VersionVector>),
    /// Finish everything queued before this, answer, then stop.
    Shutdown(oneshot::Sender<()>),
    /// Answered once everything queued before it is committed and the writer's work
    /// after that commit (sealing memtables, a checkpoint, writing idempotency records) is
    /// done.
    Settle(oneshot::Sender<()>),
}

/// Receives what one commit did, for metrics.
pub type CommitObserver = Box<dyn Fn(&CommitStats) + Send + Sync>;

/// One commit, as the metrics see it.
#[derive(Debug, Clone, Copy)]
pub struct CommitStats {
    /// From applying its first operation until all of it was durable (its answers go out
    /// after).
    pub took: Duration,
    pub ops: usize,
    pub syncs: Syncs,
}

/// The syncs a commit waited for, kept apart from its other work: on a shared or
/// virtual disk they are most of a commit (docs/performance.md), and the part that
/// depends on the disk rather than on the node.
#[derive(Debug, Clone, Copy)]
pub struct Syncs {
    /// The store's journal, on every commit that needs to be durable.
    pub journal: Option<Duration>,
    /// fjall's journal, at most every [`FJALL_SYNC_EVERY`].
    pub fjall: Option<Duration>,
}

pub struct Writer {
    pub tables: Tables,
    pub shared: Arc<Shared>,
    pub options: StoreOptions,
    pub listener: Arc<dyn CommitListener>,
    pub observer: CommitObserver,
    /// This DC's own stream.
    pub stream: StreamId,
    pub next_seq: u64,
    pub log_seq: u64,
    pub streams: HashMap<StreamId, StreamState>,
    /// Durable batches so far, also recorded in the watermark.
    pub commits: u64,
    pub watermark: Watermark,
    /// Messages per mailbox, for users with a non-empty mailbox.
    pub depths: HashMap<UserId, u64>,
    /// Tells the replication driver how far this DC's own stream reaches.
    pub log_head: watch::Sender<u64>,
    /// When memtables are sealed (see `Tables::seal_full`).
    pub sealing: Sealing,
    /// Makes each commit durable; see [`crate::journal`].
    pub journal: Journal,
    /// The journal directory's lock (`crate::place`), released when the writer ends.
    pub _journal_lock: std::fs::File,
    /// The last journal record's buffer, for the next one.
    pub buffer: Vec<u8>,
    /// Idempotency records and depth changes not yet written to fjall.
    pub deferred: Deferred,
    /// Each sender's highest idempotency key, to skip the tables' lookup above it.
    pub highest: Highest,
    /// The receipts of numbered sends (`crate::numbered`).
    pub numbered: Windows,
    /// When to try again after a failed checkpoint.
    pub retry_checkpoint_at: Option<Instant>,
    /// What fjall has been given and synced of the commits.
    pub fjall: FjallState,
    /// Log prefixes asked to be dropped (`Op::Truncate`): through which seq, per stream.
    /// Dropped a bounded part per commit (see [`Writer::drop_logs`]), so a long backlog is
    /// never one huge batch.
    pub truncating: HashMap<StreamId, u64>,
}

/// What fjall has of the commits: not all of them, since a commit that changes nothing
/// but the counters leaves them in the store's journal alone ([`Writer::write_counters`]).
pub struct FjallState {
    /// The commit count fjall's `meta` holds: readers pair a snapshot of fjall with the
    /// held messages of the same count (`EmbeddedStore::consistent_view`).
    pub commits: u64,
    /// When fjall's own journal was last synced (see [`FJALL_SYNC_EVERY`]).
    pub synced_at: Instant,
    /// Whether the last write to fjall failed: commits that leave fjall alone still
    /// succeed, but the store is not healthy until one that writes to it does.
    pub failing: bool,
}

/// How often a commit also syncs fjall's journal, though the store's journal makes it
/// durable. fjall refuses to open when a batch in its journal fails its checksum, which
/// after a power loss any unsynced batch may; so only the batches of the last moment may
/// be unsynced, as when fjall was synced on every commit. It also leaves a checkpoint
/// little to sync.
pub(crate) const FJALL_SYNC_EVERY: Duration = Duration::from_millis(100);

/// Log entries a commit drops for `Op::Truncate`, besides twice what it adds to the logs.
pub(crate) const TRUNCATE_MAX: u64 = if cfg!(test) { 100 } else { 4_096 };

/// What one batch will change once it is durable.
#[derive(Default)]
struct Pending {
    committed: Vec<SharedMessage>,
    coordinates: Vec<(UserId, Coordinate, bool)>,
    /// New depth of each mailbox the batch touched.
    depths: HashMap<UserId, u64>,
    /// Idempotency keys first used in this batch.
    dedup: HashMap<Vec<u8>, Receipt>,
    /// Numbered sends stored by this batch, by `schema::seq_receipt_key`.
    numbered: HashMap<Vec<u8>, Receipt>,
    /// Mailbox keys deleted in this batch, so two devices acknowledging the same message
    /// at once count it once.
    deleted: HashSet<Vec<u8>>,
    /// Messages deleted because a recipient's device acknowledged them, by sender: for
    /// the senders' delivery receipts.
    receipts: HashMap<UserId, Vec<MessageId>>,
    /// Messages this batch puts into (`Some`) or deletes from (`None`) the ones held in
    /// memory (see [`crate::journal`]).
    held: HashMap<(UserId, u64), Option<SharedMessage>>,
    /// Message id index entries written (`Some`) or removed (`None`) in this batch.
    ids: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Tombstones written (`true`) or consumed (`false`) in this batch.
    gone: HashMap<Vec<u8>, bool>,
    streams: HashMap<StreamId, StreamState>,
    /// Messages from other DCs' streams stored by this batch.
    replicated_in: u64,
    /// Entries this batch adds to the logs, this DC's own and relayed ones.
    logged: u64,
    answers: Vec<Answer>,
    stop: Option<oneshot::Sender<()>>,
    settled: Vec<oneshot::Sender<()>>,
    /// The batch must reach the disk before anyone is answered.
    durable: bool,
}

/// Whether a checkpoint is the last before the writer stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    Running,
    Clean,
}

enum Answer {
    Receipt(Reply<Receipt>, Result<Receipt, StoreError>),
    Done(Reply<()>),
    Applied(Reply<u64>, u64),
    Merged(Reply<VersionVector>, VersionVector),
}

type Fallible<T> = Result<T, fjall::Error>;

impl Writer {
    pub fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        if let Err(e) = crate::sched::yield_on_wake() {
            tracing::warn!(error = %e, "could not make the store writer yield on wake-up; it will preempt the runtime thread on a busy core");
        }
        // What the journal replayed at open can be over the limit; seal it now rather
        // than at the first write, which may be long in coming.
        self.seal_full_memtables();
        let mut batch = Vec::with_capacity(self.options.commit_batch_max);
        loop {
            let Some(first) = ops.blocking_recv() else { return };
            batch.push(first);
            while batch.len() < self.options.commit_batch_max {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(done) = self.commit(batch.drain(..)) {
                // A clean stop leaves nothing to replay at the next open.
                self.checkpoint(Ending::Clean);
                // Let go of the database before saying so: whoever closed the store may
                // want to open the directory again.
                drop(self);
                let _ = done.send(());
                return;
            }
        }
    }

    fn seal_full_memtables(&self) {
        if let Err(e) = self.tables.seal_full(self.sealing) {
            tracing::error!(error = %e, "cannot seal a full memtable");
        }
    }

    /// Applies and commits a batch of operations and answers each; returns a shutdown
    /// request if the batch held one.
    fn commit(&mut self, ops: impl Iterator<Item = Op>) -> Option<oneshot::Sender<()>> {
        let started = Instant::now();
        let (seq_before, log_before) = (self.next_seq, self.log_seq);
        let mut pending = Pending::default();
        let mut batch = Batch::new(&self.tables, std::mem::take(&mut self.buffer));
        let mut count = 0;
        let mut result = Ok(());
        for op in ops {
            count += 1;
            if let Err(e) = self.apply(&mut batch, op, &mut pending) {
                result = Err(e);
            }
        }
        let durable = pending.durable;
        self.drop_logs(&mut batch, &mut pending);
        let result = result.and_then(|()| {
            self.write_depths(&mut batch, &pending);
            // Decided once: the counters go to fjall with the commit that syncs it.
            let sync_fjall = durable && self.fjall_sync_due();
            self.write_counters(&mut batch, durable, sync_fjall);
            self.write(batch, &mut pending, durable, sync_fjall)
        });
        match result {
            Ok(syncs) => {
                if durable {
                    self.commits += 1;
                    if let Err(e) = self.watermark.record(self.commits) {
                        // Only the detection of later damage is weakened; the data is safe.
                        tracing::warn!(error = %e, "cannot record the commit watermark");
                    }
                }
                (self.observer)(&CommitStats {
                    took: started.elapsed(),
                    ops: count,
                    syncs,
                });
                if !self.fjall.failing {
                    self.shared.set_failure(None);
                }
                self.deferred.add(pending.dedup.drain(), pending.depths.keys());
                self.numbered.add(pending.numbered.drain(), &self.tables.seqs);
                self.publish(&mut pending);
                self.dropped_logs();
                for answer in pending.answers {
                    // A caller that went away (its connection closed) no longer needs the
                    // answer; the operation is durable all the same.
                    match answer {
                        Answer::Receipt(reply, result) => drop(reply.send(result)),
                        Answer::Done(reply) => drop(reply.send(Ok(()))),
                        Answer::Applied(reply, through) => drop(reply.send(Ok(through))),
                        Answer::Merged(reply, applied) => drop(reply.send(Ok(applied))),
                    }
                }
                // After the answers, so neither delays anyone this batch served.
                self.seal_full_memtables();
                self.checkpoint_if_due();
            }
            Err(e) => {
                // Nothing is durable: forget what the batch would have changed, fail it all.
                tracing::error!(error = %e, ops = count, "store commit failed");
                self.next_seq = seq_before;
                self.log_seq = log_before;
                let err = StoreError::Unavailable(format!("commit failed: {e}"));
                self.shared.set_failure(Some(err.to_string()));
                for answer in pending.answers {
                    match answer {
                        Answer::Receipt(reply, _) => drop(reply.send(Err(err.clone()))),
                        Answer::Done(reply) => drop(reply.send(Err(err.clone()))),
                        Answer::Applied(reply, _) => drop(reply.send(Err(err.clone()))),
                        Answer::Merged(reply, _) => drop(reply.send(Err(err.clone()))),
                    }
                }
                // A full journal fails every commit until a checkpoint empties it.
                self.checkpoint_if_due();
            }
        }
        if !pending.settled.is_empty() {
            self.deferred.settle();
        }
        for done in pending.settled {
            let _ = done.send(());
        }
        pending.stop
    }

    /// Checkpoints once the journal or what is held in memory reaches its limit, or hands
    /// the idempotency records alone to be written once they reach theirs; after a
    /// failure, tries neither again for a second.
    fn checkpoint_if_due(&mut self) {
        if let Some(Err(e)) = self.deferred.poll() {
            tracing::error!(error = %e, "cannot write idempotency records; they stay in memory until this succeeds");
            self.retry_checkpoint_at = Some(Instant::now() + Duration::from_secs(1));
        }
        let memory = self.options.memory;
        let held = self.held_count() + self.deferred.depths() + self.numbered.changed();
        let checkpoint = self.journal.len() >= memory.checkpoint_bytes || held >= memory.held_max();
        if self.retry_checkpoint_at.is_none_or(|at| Instant::now() >= at) {
            if checkpoint {
                self.retry_checkpoint_at =
                    (!self.checkpoint(Ending::Running)).then(|| Instant::now() + Duration::from_secs(1));
            } else if self.deferred.receipts() >= memory.held_max() {
                self.deferred.start_spill();
            }
        }
        (self.shared.journal_bytes).store(self.journal.len(), std::sync::atomic::Ordering::Relaxed);
        let receipts = self.deferred.receipts_held();
        (self.shared.held_receipts).store(receipts, std::sync::atomic::Ordering::Relaxed);
        let (windows, window_receipts) = self.numbered.resident();
        (self.shared.windows).store(windows, std::sync::atomic::Ordering::Relaxed);
        (self.shared.window_receipts).store(window_receipts, std::sync::atomic::Ordering::Relaxed);
    }

    /// Adds the counters every commit moves. Most commits of a single DC write nothing
    /// else to fjall, and a commit to fjall waits for its journal's lock, which writing out
    /// idempotency records holds for the 5–7 ms of their sync; so fjall receives them only
    /// with a commit that writes to it anyway, with the durable commit that is due to sync
    /// fjall (at most every [`FJALL_SYNC_EVERY`]: fjall's commit count, synced, is what
    /// shows at open that a journal lost commits, as it did when every commit wrote it),
    /// and at every checkpoint. Otherwise the journal alone holds them, as it holds
    /// idempotency records. When replicating they always go: every commit that changes
    /// the held messages or the log writes to fjall then (log entries, message ids), and
    /// a snapshot reads the log's head from fjall.
    fn write_counters(&self, batch: &mut Batch, durable: bool, sync_fjall: bool) {
        let to_fjall = !batch.fjall.is_empty() || self.options.replicate || sync_fjall;
        for (key, value) in self.counters(self.commits + u64::from(durable)) {
            let value = schema::encode_u64(value);
            if to_fjall {
                batch.insert(Ks::Meta, key, value);
            } else {
                batch.journal_only(Ks::Meta, key.as_bytes(), Some(&value));
            }
        }
    }

    /// The counters every commit moves, with the commit count `commits`, by their keys in
    /// `meta`.
    fn counters(&self, commits: u64) -> [(&'static str, u64); 3] {
        [
            (schema::NEXT_SEQ, self.next_seq),
            (schema::LOG_SEQ, self.log_seq),
            (schema::COMMITS, commits),
        ]
    }

    fn fjall_sync_due(&self) -> bool {
        self.fjall.synced_at.elapsed() >= FJALL_SYNC_EVERY
    }

    /// Makes the batch durable in the journal (synced, unless nothing in it needs to be:
    /// after a crash the node drops its own coordinates anyway), then hands what it has
    /// for fjall to fjall, if anything, without a sync of its own but at most every
    /// [`FJALL_SYNC_EVERY`], then updates the held messages. Not under one lock:
    /// fjall may hold a commit 100 ms at a time, and readers must not wait for that.
    /// Readers that need both parts of one commit compare commit counts
    /// (`EmbeddedStore::consistent_view`).
    fn write(&mut self, batch: Batch, p: &mut Pending, durable: bool, sync_fjall: bool) -> Fallible<Syncs> {
        let Batch { fjall, mut record, .. } = batch;
        let appended = self.journal.append(&mut record, durable).map_err(fjall::Error::from);
        let committed = appended.and_then(|journal| {
            let fjall = self.commit_to_fjall(fjall, &record, p, durable, sync_fjall)?;
            Ok(Syncs { journal, fjall })
        });
        self.buffer = record.into_buffer();
        committed
    }

    /// The second half of [`Writer::write`], syncing fjall if `sync` (the counters are
    /// then in the batch: [`Writer::write_counters`]); returns how long fjall's sync took,
    /// if it synced.
    fn commit_to_fjall(
        &mut self,
        fjall: fjall::OwnedWriteBatch,
        record: &Record,
        p: &mut Pending,
        durable: bool,
        sync: bool,
    ) -> Fallible<Option<Duration>> {
        let writes = !fjall.is_empty();
        debug_assert!(writes || !sync, "a commit that syncs fjall writes the counters to it");
        let mode = if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        };
        let started = Instant::now();
        if let Err(e) = fjall.durability(Some(mode)).commit() {
            self.fjall.failing = true;
            // The caller forgets the batch, so the journal must too.
            self.journal.take_back(record);
            return Err(e);
        }
        if writes {
            self.fjall.commits = self.commits + u64::from(durable);
            self.fjall.failing = false;
        }
        let synced = sync.then(|| {
            self.fjall.synced_at = Instant::now();
            self.fjall.synced_at - started
        });
        let mut held = self.shared.held.write().expect("held lock");
        held.set_commits(self.fjall.commits);
        for ((user, seq), msg) in p.held.drain() {
            match msg {
                Some(msg) => held.insert(msg),
                None => held.remove(&user, seq),
            }
        }
        Ok(synced)
    }

    fn held_count(&self) -> usize {
        self.shared.held.read().expect("held lock").footprint()
    }

    /// Writes what is held in memory to fjall (messages and changed depths), syncs fjall
    /// (which makes every batch it took unsynced durable too) and empties the journal. The
    /// idempotency records fjall lacks are carried into the new journal rather than
    /// waited for, unless the spill thread has fallen behind: waiting for it was most of
    /// a checkpoint's 350 ms at full load, and every message stalls behind one. A clean
    /// stop writes them instead, so it leaves nothing to replay. A failure leaves
    /// everything as it was, to be tried again; returns whether it succeeded.
    fn checkpoint(&mut self, ending: Ending) -> bool {
        let started = Instant::now();
        let journal_bytes = self.journal.len();
        // More records than two spills take means the spill thread is behind (fjall is
        // slow or holding writes): waiting for it then keeps what the new journal carries
        // to two batches (about 7 MB at the defaults with 15-byte client ids, measured at
        // 54 bytes a record).
        let behind = self.deferred.receipts_held() > 2 * self.options.memory.held_max();
        if (ending == Ending::Clean || behind)
            && let Err(e) = self.deferred.finish_spill()
        {
            tracing::error!(error = %e, "checkpoint failed: cannot write idempotency records; the journal keeps growing until one succeeds");
            return false;
        }
        let mut batch = self.tables.db.batch().durability(Some(PersistMode::SyncAll));
        let held = {
            // Only this thread changes the held messages, so reading them is enough.
            let held = self.shared.held.read().expect("held lock");
            for msg in held.iter() {
                let key = schema::mailbox_key(&msg.to, msg.seq);
                batch.insert(&self.tables.mailbox, key, MessageRecord::of(msg).encode());
            }
            held.len()
        };
        let depths = self.deferred.depths();
        (self.deferred).write_depths(&mut batch, &self.tables.depth, &self.depths);
        let windows = self.numbered.changed();
        self.numbered.write_changed(&mut batch, &self.tables.seqs);
        let meta = &self.tables.meta;
        // The journal is about to be emptied, and it may be all that holds the latest.
        for (key, value) in self.counters(self.commits) {
            batch.insert(meta, key, schema::encode_u64(value));
        }
        batch.insert(meta, schema::CHECKPOINT_COMMITS, schema::encode_u64(self.commits));
        let mut carried = Record::reusing(Vec::new());
        let receipts = self.deferred.carry(&mut carried);
        let (committed, next) =
            commit_beside_next_journal(batch, self.journal.dir(), (receipts > 0).then_some(&mut carried));
        if let Err(e) = committed {
            tracing::error!(error = %e, held, "checkpoint failed; the journal keeps growing until one succeeds");
            return false;
        }
        let synced_micros = started.elapsed().as_micros();
        // Only the writer changes the held messages, so these are exactly the ones written.
        {
            let mut held = self.shared.held.write().expect("held lock");
            held.clear();
            held.set_commits(self.commits);
        }
        self.fjall = FjallState {
            commits: self.commits,
            synced_at: Instant::now(),
            failing: false,
        };
        self.deferred.depths_written();
        self.numbered.written();
        if let Err(e) = next.and_then(|next| self.journal.replace(next)) {
            // Before the swap, harmless but for a longer replay at the next open; after
            // it, the journal has stopped taking commits (see `Journal::clear`). Either
            // way it is still full, so this is tried again like any failed checkpoint,
            // not at every commit.
            tracing::error!(error = %e, path = %self.journal.path().display(), "cannot empty the journal; the journal keeps growing until a checkpoint succeeds");
            return false;
        }
        let micros = started.elapsed().as_micros();
        // What the new journal starts with: the records carried.
        let carried_bytes = self.journal.len();
        tracing::debug!(
            held,
            depths,
            windows,
            receipts,
            carried_bytes,
            journal_bytes,
            synced_micros,
            micros,
            "checkpoint"
        );
        true
    }

    /// Adds one operation to the batch. `Err` is a storage failure that fails the batch.
    fn apply(&mut self, batch: &mut Batch, op: Op, pending: &mut Pending) -> Fallible<()> {
        pending.durable |= matches!(
            op,
            Op::Append(..) | Op::Ack(..) | Op::Ingest(..) | Op::MergeSnapshot(..)
        );
        match op {
            Op::Append(new, reply) => {
                let result = self.append(batch, new, pending)?;
                pending.answers.push(Answer::Receipt(reply, result));
            }
            Op::Ack(user, seqs, reply) => {
                self.ack_local(batch, user, &seqs, pending)?;
                pending.answers.push(Answer::Done(reply));
            }
            Op::AddCoordinate(user, at, reply) => {
                self.local_coordinate(batch, user, at, true, pending);
                pending.answers.push(Answer::Done(reply));
            }
            Op::RemoveCoordinate(user, at, reply) => {
                self.local_coordinate(batch, user, at, false, pending);
                pending.answers.push(Answer::Done(reply));
            }
            Op::Ingest(stream, first, entries, reply) => {
                let through = self.ingest(batch, &stream, first, entries, pending)?;
                pending.answers.push(Answer::Applied(reply, through));
            }
            Op::Truncate(stream, through, reply) => {
                let target = self.truncating.entry(stream).or_default();
                *target = (*target).max(through);
                pending.answers.push(Answer::Done(reply));
            }
            Op::ForgetCoordinates(dc, reply) => {
                self.forget_coordinates(batch, &dc, pending)?;
                pending.answers.push(Answer::Done(reply));
            }
            Op::MergeSnapshot(applied, items, reply) => {
                let merged = self.merge_snapshot(batch, &applied, items, pending)?;
                pending.answers.push(Answer::Merged(reply, merged));
            }
            Op::Shutdown(done) => pending.stop = Some(done),
            Op::Settle(done) => pending.settled.push(done),
        }
        Ok(())
    }

    /// Appends `entry` to this DC's own stream, if replicating. Stream entries are always
    /// made durable: peers receive them as soon as they commit, and a seq lost in a crash
    /// would be reused for something else.
    /// `entry` is only built when there is a stream to log it to: in a single DC, the
    /// copies of a message's fields it takes were 2.4 % of the writer's time at saturation.
    fn log_own(&mut self, batch: &mut Batch, entry: impl FnOnce() -> Entry, p: &mut Pending) {
        if self.options.replicate {
            p.durable = true;
            self.log_seq += 1;
            p.logged += 1;
            batch.insert(Ks::Log, schema::entry_key(&self.stream, self.log_seq), entry().encode());
        }
    }

    /// A connection of this DC logged in or closed: store it and tell the other DCs.
    fn local_coordinate(&mut self, batch: &mut Batch, user: UserId, at: Coordinate, added: bool, p: &mut Pending) {
        let entry = || {
            let (user, at) = (user.clone(), at.clone());
            if added {
                Entry::Online { user, at }
            } else {
                Entry::Offline { user, at }
            }
        };
        self.log_own(batch, entry, p);
        self.set_coordinate(batch, user, at, added, p);
    }

    fn set_coordinate(&self, batch: &mut Batch, user: UserId, at: Coordinate, added: bool, p: &mut Pending) {
        let key = schema::coord_key(&user, &at);
        if added {
            batch.insert(Ks::Coords, key, []);
        } else {
            batch.remove(Ks::Coords, key);
        }
        p.coordinates.push((user, at, added));
    }

    fn depth(&self, user: &UserId, pending: &Pending) -> u64 {
        pending
            .depths
            .get(user)
            .or_else(|| self.depths.get(user))
            .copied()
            .unwrap_or(0)
    }

    /// Stores one message unless it is a retry or the mailbox is full. `Ok(Err)` is this
    /// message's own refusal; `Err` a storage failure.
    fn append(&mut self, batch: &mut Batch, new: NewMessage, p: &mut Pending) -> Fallible<Result<Receipt, StoreError>> {
        let numbered = match &new.seq {
            Some(numbered) => {
                let key = schema::seq_receipt_key(&new.from, &numbered.device, numbered.seq);
                match self.check_numbered(&key, new.at_ms, p)? {
                    Check::Duplicate(receipt) => return Ok(Ok(receipt)),
                    // With peers the send is also looked for by its client id, below.
                    Check::TooOld { highest } if !self.options.replicate => {
                        return Ok(Err(StoreError::SeqTooOld {
                            seq: numbered.seq,
                            highest,
                            window: crate::numbered::WINDOW,
                        }));
                    }
                    Check::TooOld { .. } | Check::New => Some(key),
                }
            }
            None => None,
        };
        // Twins across DCs are found by client id, so with peers every send keeps its
        // idempotency record; a numbered one also goes into its device's window.
        let recorded = numbered.is_none() || self.options.replicate;
        let dedup_key = recorded.then(|| schema::dedup_key(&new.from, &new.client_id));
        if let Some(key) = &dedup_key
            && let Some(earlier) = self.earlier(key, new.at_ms, p)?
        {
            // An unreadable record would mean a damaged store. Storing the retry again
            // could deliver it twice, so it is answered as a duplicate of an unknown message.
            return Ok(Ok(earlier.unwrap_or_else(|e| self.unknown_receipt(&e))));
        }
        if self.depth(&new.to, p) >= self.options.mailbox_max_messages {
            return Ok(Err(StoreError::MailboxFull {
                user: new.to,
                limit: self.options.mailbox_max_messages,
            }));
        }
        let entry = || Entry::Put {
            to: new.to.clone(),
            from: new.from.clone(),
            client_id: new.client_id.clone(),
            text: new.text.clone(),
            at_ms: new.at_ms,
        };
        if !self.options.replicate {
            // Ids still come from the stream's counter, so they never change meaning if
            // replication is turned on later.
            self.log_seq += 1;
        }
        self.log_own(batch, entry, p);
        let id = MessageId {
            origin: self.options.dc.clone(),
            epoch: self.stream.epoch(),
            seq: self.log_seq,
        };
        let receipt = Receipt {
            id: id.clone(),
            at_ms: new.at_ms,
            duplicate: false,
        };
        let msg = Message {
            id,
            seq: 0,
            from: new.from,
            to: new.to,
            client_id: new.client_id,
            text: new.text,
            at_ms: new.at_ms,
        };
        self.insert_message(batch, msg, dedup_key, p);
        if let Some(key) = numbered {
            batch.journal_only_encoded(Ks::SeqReceipts, &key, &schema::dedup_view(&receipt));
            p.numbered.insert(key, receipt.clone());
        }
        Ok(Ok(receipt))
    }

    /// Stores a message that arrived from another DC, unless it is the twin of one already
    /// here: the same sender and client id accepted under another id, because a retry
    /// reached two DCs before either heard of the other. Every DC keeps the smaller of the
    /// two ids and drops the other, so all converge on one copy. A record from more than a
    /// dedup window before this message is no twin: judged by the two messages' times, not
    /// by when each DC happens to look, so every DC decides alike.
    fn insert_replicated(&mut self, batch: &mut Batch, msg: Message, p: &mut Pending) -> Fallible<()> {
        let dedup_key = schema::dedup_key(&msg.from, &msg.client_id);
        let twin = self
            .earlier(&dedup_key, msg.at_ms, p)?
            .and_then(Result::ok)
            .map(|r| r.id);
        match twin {
            Some(twin) if twin < msg.id => return Ok(()),
            Some(twin) if twin > msg.id => {
                if let Some(mailbox_key) = self.located(&schema::id_key(&twin), p)?
                    && let Some(user) = schema::split_user(&mailbox_key)
                {
                    self.delete_message(batch, &user, mailbox_key, p)?;
                }
            }
            _ => {}
        }
        self.insert_message(batch, msg, Some(dedup_key), p);
        p.replicated_in += 1;
        Ok(())
    }

    /// Puts a message into its recipient's mailbox at the next mailbox seq, with an
    /// idempotency record under `dedup_key` if given.
    fn insert_message(&mut self, batch: &mut Batch, mut msg: Message, dedup_key: Option<Vec<u8>>, p: &mut Pending) {
        msg.seq = self.next_seq;
        self.next_seq += 1;
        let mailbox_key = schema::mailbox_key(&msg.to, msg.seq);
        batch.insert_held(&mailbox_key, &MessageRecord::of(&msg));
        if self.options.replicate {
            let id_key = schema::id_key(&msg.id);
            batch.insert(Ks::Ids, id_key.clone(), mailbox_key.clone());
            p.ids.insert(id_key, Some(mailbox_key.clone()));
        }
        let depth = self.depth(&msg.to, p) + 1;
        p.depths.insert(msg.to.clone(), depth);
        if let Some(dedup_key) = dedup_key {
            let receipt = Receipt {
                id: msg.id.clone(),
                at_ms: msg.at_ms,
                duplicate: false,
            };
            batch.journal_only_encoded(Ks::Dedup, &dedup_key, &schema::dedup_view(&receipt));
            debug_assert!(self.highest.covers(&dedup_key), "stored without being checked first");
            p.dedup.insert(dedup_key, receipt);
        }
        let msg = Arc::new(msg);
        p.held.insert((msg.to.clone(), msg.seq), Some(msg.clone()));
        p.committed.push(msg);
    }

    /// Writes the final size of every mailbox the batch touched, once per batch however
    /// many messages it stored or deleted.
    fn write_depths(&self, batch: &mut Batch, p: &Pending) {
        for (user, &depth) in &p.depths {
            let key = user.as_str().as_bytes();
            let value = schema::depth_value(depth);
            batch.journal_only(Ks::Depth, key, value.as_ref().map(|v| v.as_slice()));
        }
    }

    /// Deletes a mailbox entry if it is still there; returns its message id.
    fn delete_message(
        &mut self,
        batch: &mut Batch,
        user: &UserId,
        mailbox_key: Vec<u8>,
        p: &mut Pending,
    ) -> Fallible<Option<MessageId>> {
        if p.deleted.contains(&mailbox_key) {
            return Ok(None);
        }
        let seq = schema::key_seq(&mailbox_key).unwrap_or(0);
        // Only replicated entries can delete a message in the batch that stored it; its
        // sender gets no receipt for that.
        let stored_here = self.options.replicate && matches!(p.held.get(&(user.clone(), seq)), Some(Some(_)));
        let held = self.held(user, seq, p);
        // Most acknowledged messages are still held, and then the mailbox table is not read.
        let id = match (stored_here, held.as_deref()) {
            (true, held) => held.map(|msg| msg.id.clone()),
            (false, Some(Message { from, id, .. })) => {
                p.receipts.entry(from.clone()).or_default().push(id.clone());
                Some(id.clone())
            }
            (false, None) => {
                let Some(record) = self.tables.mailbox.get(&mailbox_key)? else {
                    return Ok(None);
                };
                match postcard::from_bytes::<MessageRecord>(&record) {
                    Ok(r) => {
                        let id = DcName::parse(r.origin).ok().map(|origin| MessageId {
                            origin,
                            epoch: Epoch(r.epoch),
                            seq: r.origin_seq,
                        });
                        if let (Some(id), Ok(from)) = (&id, UserId::parse(r.from)) {
                            p.receipts.entry(from).or_default().push(id.clone());
                        }
                        id
                    }
                    Err(_) => None,
                }
            }
        };
        if held.is_some() {
            batch.remove_held(&mailbox_key);
            p.held.insert((user.clone(), seq), None);
        } else {
            batch.remove(Ks::Mailbox, &mailbox_key);
        }
        p.deleted.insert(mailbox_key);
        if let Some(id) = &id
            && self.options.replicate
        {
            let id_key = schema::id_key(id);
            batch.remove(Ks::Ids, id_key.clone());
            p.ids.insert(id_key, None);
        }
        let depth = self.depth(user, p).saturating_sub(1);
        p.depths.insert(user.clone(), depth);
        Ok(id)
    }

    /// Message `seq` of `user`'s mailbox if it is held in memory, not (yet) in fjall.
    fn held(&self, user: &UserId, seq: u64, p: &Pending) -> Option<SharedMessage> {
        match p.held.get(&(user.clone(), seq)) {
            Some(entry) => entry.clone(),
            None => self.shared.held.read().expect("held lock").get(user, seq).cloned(),
        }
    }

    /// A user acknowledged messages on a connection of this DC.
    fn ack_local(&mut self, batch: &mut Batch, user: UserId, seqs: &[u64], p: &mut Pending) -> Fallible<()> {
        let mut ids = Vec::new();
        for &seq in seqs {
            if let Some(id) = self.delete_message(batch, &user, schema::mailbox_key(&user, seq), p)? {
                ids.push(IdRecord::from(&id));
            }
        }
        if !ids.is_empty() {
            self.log_own(batch, || Entry::Acked { user, ids }, p);
        }
        Ok(())
    }

    /// The receipt (as a duplicate) of the message last accepted with this sender and
    /// client id, if that was less than a dedup window before `at_ms`: from this batch,
    /// else from the table, where a record can be unreadable (`Err`). The origin's append
    /// and every other DC's twin check both ask this, judged by the messages' own times,
    /// so all DCs decide alike.
    fn earlier(
        &mut self,
        dedup_key: &[u8],
        at_ms: u64,
        p: &Pending,
    ) -> Fallible<Option<Result<Receipt, postcard::Error>>> {
        if self.highest.above(dedup_key, &self.tables.dedup)? {
            return Ok(None);
        }
        let found = match p.dedup.get(dedup_key).or_else(|| self.deferred.receipt(dedup_key)) {
            Some(receipt) => Ok(receipt.clone()),
            None => match self.tables.dedup.get(dedup_key)? {
                Some(record) => postcard::from_bytes::<DedupRecord>(&record).map(|r| Receipt {
                    id: r.id.into(),
                    at_ms: r.at_ms,
                    duplicate: true,
                }),
                None => return Ok(None),
            },
        };
        let horizon = expiry::horizon(at_ms, self.options.dedup_window);
        Ok(match found {
            Ok(receipt) if receipt.at_ms < horizon => None,
            found => Some(found.map(|receipt| Receipt {
                duplicate: true,
                ..receipt
            })),
        })
    }

    /// What this batch or the device's window says of a numbered send (`key` is its
    /// `schema::seq_receipt_key`).
    fn check_numbered(&mut self, key: &[u8], at_ms: u64, p: &Pending) -> Fallible<Check> {
        if let Some(receipt) = p.numbered.get(key) {
            return Ok(Check::Duplicate(Receipt {
                duplicate: true,
                ..receipt.clone()
            }));
        }
        let (device_key, seq) = schema::split_seq_receipt_key(key).expect("a receipt key");
        let horizon = expiry::horizon(at_ms, self.options.dedup_window);
        Ok(self.numbered.window(device_key, &self.tables.seqs)?.check(seq, horizon))
    }

    fn unknown_receipt(&self, error: &postcard::Error) -> Receipt {
        tracing::error!(%error, "unreadable dedup record");
        Receipt {
            id: MessageId {
                origin: self.options.dc.clone(),
                epoch: self.stream.epoch(),
                seq: 0,
            },
            at_ms: 0,
            duplicate: true,
        }
    }

    fn stream_state(&self, stream: &StreamId, p: &Pending) -> StreamState {
        p.streams
            .get(stream)
            .or_else(|| self.streams.get(stream))
            .copied()
            .unwrap_or_default()
    }

    /// Applies entries of another DC's stream, in order, skipping what is already applied.
    fn ingest(
        &mut self,
        batch: &mut Batch,
        stream: &StreamId,
        first: u64,
        entries: Vec<Vec<u8>>,
        p: &mut Pending,
    ) -> Fallible<u64> {
        let before = self.stream_state(stream, p);
        if *stream == self.stream || first > before.applied + 1 {
            // Our own stream never comes back in; a gap is the replicator's to repair.
            return Ok(before.applied);
        }
        // Whether this stream's presence counts does not change within one ingest.
        let current = self.current_life(stream, p);
        if before.applied == 0 && current && self.epochs_of(&stream.dc, p).any(|e| e < stream.epoch()) {
            // The first entry of a DC's new life (its store was rebuilt from nothing): the
            // coordinates we hold for it came from its earlier life, whose connections are
            // gone, and nothing will ever retract them.
            self.forget_coordinates(batch, &stream.dc, p)?;
        }
        // Each entry is marked applied as soon as it is: later ones of this batch must see
        // it (an `Acked` right after its message's `Put` must not wait for that `Put`).
        p.streams.insert(stream.clone(), before);
        for (i, bytes) in entries.into_iter().enumerate() {
            let seq = first + i as u64;
            if seq <= before.applied {
                continue;
            }
            match Entry::decode(&bytes) {
                Ok(entry) => self.apply_entry(batch, stream, seq, entry, current, p)?,
                // An entry this build cannot read is skipped, not retried forever: the
                // stream must keep moving for everything after it.
                Err(e) => {
                    tracing::error!(%stream, seq, error = %e, "skipping an undecodable entry");
                    self.forget_gone(batch, stream, seq, seq, p)?;
                }
            }
            batch.insert(Ks::Log, schema::entry_key(stream, seq), bytes);
            p.logged += 1;
            p.streams.get_mut(stream).expect("inserted before the loop").applied = seq;
        }
        let state = self.stream_state(stream, p);
        batch.insert(
            Ks::Streams,
            schema::stream_key(stream),
            postcard::to_stdvec(&state).expect("encodes"),
        );
        Ok(state.applied)
    }

    /// Applies one entry of `stream`; its presence entries only if `current` (see
    /// [`Writer::current_life`]).
    fn apply_entry(
        &mut self,
        batch: &mut Batch,
        stream: &StreamId,
        seq: u64,
        entry: Entry,
        current: bool,
        p: &mut Pending,
    ) -> Fallible<()> {
        match entry {
            Entry::Put {
                to,
                from,
                client_id,
                text,
                at_ms,
            } => {
                let id = MessageId {
                    origin: stream.dc.clone(),
                    epoch: stream.epoch(),
                    seq,
                };
                let id_key = schema::id_key(&id);
                if self.is_gone(&id_key, p)? {
                    // Acknowledged elsewhere before it reached us.
                    batch.remove(Ks::Gone, id_key.clone());
                    p.gone.insert(id_key, false);
                    return Ok(());
                }
                let msg = Message {
                    id,
                    seq: 0,
                    from,
                    to,
                    client_id,
                    text,
                    at_ms,
                };
                self.insert_replicated(batch, msg, p)?;
            }
            Entry::Acked { ids, .. } => {
                for id in ids {
                    let id: MessageId = id.into();
                    self.ack_remote(batch, &id, p)?;
                }
            }
            // Presence from an earlier life of a DC is history, and its connection numbers
            // may since name other users' connections.
            Entry::Online { user, at } | Entry::Offline { user, at } if !current => {
                tracing::debug!(%stream, %user, ?at, "presence from an earlier life of its DC skipped");
            }
            Entry::Online { user, at } => self.set_coordinate(batch, user, at, true, p),
            Entry::Offline { user, at } => self.set_coordinate(batch, user, at, false, p),
        }
        Ok(())
    }

    /// A message was acknowledged in another DC: delete it here, or, if it has not
    /// arrived yet, remember that it must not be stored when it does.
    fn ack_remote(&mut self, batch: &mut Batch, id: &MessageId, p: &mut Pending) -> Fallible<()> {
        let id_key = schema::id_key(id);
        if let Some(mailbox_key) = self.located(&id_key, p)? {
            if let Some(user) = schema::split_user(&mailbox_key) {
                self.delete_message(batch, &user, mailbox_key, p)?;
            }
            return Ok(());
        }
        let origin = StreamId::new(id.origin.clone(), id.epoch);
        if id.seq > self.applied(&origin, p) {
            batch.insert(Ks::Gone, id_key.clone(), []);
            p.gone.insert(id_key, true);
        }
        Ok(())
    }

    /// Drops the tombstones of messages `from..=through` of `stream`, which this DC has
    /// now applied without their entries (a snapshot covered them, or they could not be
    /// read): no entry will come to consume them.
    fn forget_gone(
        &mut self,
        batch: &mut Batch,
        stream: &StreamId,
        from: u64,
        through: u64,
        p: &mut Pending,
    ) -> Fallible<()> {
        let range = schema::entry_key(stream, from)..=schema::entry_key(stream, through);
        let mut keys = Vec::new();
        for key in self.tables.gone.range(range.clone()) {
            keys.push(key.key()?.to_vec());
        }
        // And those laid earlier in this batch, not yet in the table.
        keys.extend(
            (p.gone.iter())
                .filter(|&(key, &gone)| gone && range.contains(key))
                .map(|(key, _)| key.clone()),
        );
        for key in keys {
            batch.remove(Ks::Gone, key.clone());
            p.gone.insert(key, false);
        }
        Ok(())
    }

    fn is_gone(&self, id_key: &[u8], p: &Pending) -> Fallible<bool> {
        match p.gone.get(id_key) {
            Some(&gone) => Ok(gone),
            None => self.tables.gone.contains_key(id_key),
        }
    }

    /// Works through [`Writer::truncating`]: [`TRUNCATE_MAX`] entries this commit, plus
    /// twice what it adds to the logs, so that a backlog shrinks even while logs grow fast.
    fn drop_logs(&mut self, batch: &mut Batch, p: &mut Pending) {
        if self.truncating.is_empty() {
            return;
        }
        let asked: Vec<(StreamId, u64)> = self.truncating.iter().map(|(s, t)| (s.clone(), *t)).collect();
        let mut budget = TRUNCATE_MAX + 2 * p.logged;
        for (stream, through) in &asked {
            budget -= self.truncate(batch, stream, *through, budget, p);
            if budget == 0 {
                break;
            }
        }
    }

    /// Forgets the prefixes now dropped for good. Called after a successful commit, so one
    /// whose commit failed stays asked for.
    fn dropped_logs(&mut self) {
        if self.truncating.is_empty() {
            return;
        }
        let mut asked = std::mem::take(&mut self.truncating);
        let committed = Pending::default();
        asked.retain(|stream, through| {
            let (truncated, applied) = self.log_bounds(stream, &committed);
            truncated < (*through).min(applied)
        });
        self.truncating = asked;
    }

    /// How far `stream`'s log is truncated, and how far it reaches.
    fn log_bounds(&self, stream: &StreamId, p: &Pending) -> (u64, u64) {
        let state = self.stream_state(stream, p);
        let applied = if *stream == self.stream {
            self.log_seq
        } else {
            state.applied
        };
        (state.truncated, applied)
    }

    /// Drops `stream`'s log through `through`, at most `max` entries of it; returns how
    /// many it dropped.
    fn truncate(&mut self, batch: &mut Batch, stream: &StreamId, through: u64, max: u64, p: &mut Pending) -> u64 {
        let (truncated, applied) = self.log_bounds(stream, p);
        let through = through.min(applied).min(truncated.saturating_add(max));
        if through <= truncated {
            return 0;
        }
        for seq in truncated + 1..=through {
            batch.remove(Ks::Log, schema::entry_key(stream, seq));
        }
        let state = StreamState {
            truncated: through,
            ..self.stream_state(stream, p)
        };
        batch.insert(
            Ks::Streams,
            schema::stream_key(stream),
            postcard::to_stdvec(&state).expect("encodes"),
        );
        p.streams.insert(stream.clone(), state);
        through - truncated
    }

    /// The epochs of `dc`'s streams known here, this DC's own included.
    fn epochs_of<'a>(&'a self, dc: &'a DcName, p: &'a Pending) -> impl Iterator<Item = Epoch> + 'a {
        std::iter::once(&self.stream)
            .chain(self.streams.keys())
            .chain(p.streams.keys())
            .filter(move |s| s.dc == *dc)
            .map(StreamId::epoch)
    }

    /// Whether `stream` is the one its DC writes now, as far as we know: a DC writes one
    /// stream at a time, and a store rebuilt from nothing takes a later epoch (its
    /// creation time; message ids rely on that too). Ours is the one we write.
    fn current_life(&self, stream: &StreamId, p: &Pending) -> bool {
        if stream.dc == self.stream.dc {
            return *stream == self.stream;
        }
        !self.epochs_of(&stream.dc, p).any(|e| e > stream.epoch())
    }

    /// How far `stream` is applied here, this DC's own stream included.
    fn applied(&self, stream: &StreamId, p: &Pending) -> u64 {
        if *stream == self.stream {
            self.log_seq
        } else {
            self.stream_state(stream, p).applied
        }
    }

    fn located(&self, id_key: &[u8], p: &Pending) -> Fallible<Option<Vec<u8>>> {
        match p.ids.get(id_key) {
            Some(entry) => Ok(entry.clone()),
            None => Ok(self.tables.ids.get(id_key)?.map(|v| v.to_vec())),
        }
    }

    /// Merges a snapshot by the rule in [`crate::snapshot`].
    fn merge_snapshot(
        &mut self,
        batch: &mut Batch,
        a_s: &VersionVector,
        items: Vec<Vec<u8>>,
        p: &mut Pending,
    ) -> Fallible<VersionVector> {
        let mut held = HashSet::default();
        let mut coords: HashMap<DcName, Vec<(UserId, Coordinate)>> = HashMap::default();
        for bytes in items {
            let Ok(item) = postcard::from_bytes::<SnapshotItem>(&bytes) else {
                tracing::warn!("skipping an undecodable snapshot item");
                continue;
            };
            match item {
                SnapshotItem::Message {
                    to,
                    id,
                    from,
                    client_id,
                    text,
                    at_ms,
                } => {
                    let id: MessageId = id.into();
                    let id_key = schema::id_key(&id);
                    held.insert(id_key.clone());
                    let origin = StreamId::new(id.origin.clone(), id.epoch);
                    let unseen = id.seq > self.applied(&origin, p);
                    if unseen && self.located(&id_key, p)?.is_none() && !self.is_gone(&id_key, p)? {
                        let msg = Message {
                            id,
                            seq: 0,
                            from,
                            to,
                            client_id,
                            text,
                            at_ms,
                        };
                        self.insert_replicated(batch, msg, p)?;
                    }
                }
                SnapshotItem::Online { user, at } => coords.entry(at.dc.clone()).or_default().push((user, at)),
                SnapshotItem::Gone { id } => {
                    let id: MessageId = id.into();
                    // The sender saw it acknowledged before its message arrived there.
                    self.ack_remote(batch, &id, p)?;
                }
            }
        }
        // What the sender has seen and no longer holds was acknowledged.
        for (stream, seen) in a_s.iter() {
            let lo = schema::entry_key(stream, 1);
            let hi = schema::entry_key(stream, seen);
            let ours: Vec<(Vec<u8>, Vec<u8>)> = self
                .tables
                .ids
                .range(lo..=hi)
                .map(|e| e.into_inner().map(|(k, v)| (k.to_vec(), v.to_vec())))
                .collect::<Result<_, _>>()?;
            for (id_key, mailbox_key) in ours {
                if !held.contains(&id_key)
                    && p.ids.get(&id_key) != Some(&None)
                    && let Some(user) = schema::split_user(&mailbox_key)
                {
                    self.delete_message(batch, &user, mailbox_key, p)?;
                }
            }
        }
        self.merge_coordinates(batch, a_s, coords, p)?;
        let mut merged = VersionVector::default();
        for (stream, seen) in a_s.iter() {
            if *stream == self.stream {
                continue;
            }
            let applied = self.stream_state(stream, p).applied;
            if seen > applied {
                // The log never received the entries up to `seen`, so it cannot relay them,
                // nor the ones before them that it did receive: those are dropped too,
                // or they would stay below the truncation point for good.
                // All of it, even a long backlog: the merge is one batch anyway.
                self.truncate(batch, stream, applied, u64::MAX, p);
                self.forget_gone(batch, stream, applied + 1, seen, p)?;
                let mut state = self.stream_state(stream, p);
                state.applied = seen;
                state.truncated = seen;
                batch.insert(
                    Ks::Streams,
                    schema::stream_key(stream),
                    postcard::to_stdvec(&state).expect("encodes"),
                );
                p.streams.insert(stream.clone(), state);
            }
        }
        merged.advance(&self.stream, self.log_seq);
        for (stream, state) in self.streams.iter().chain(p.streams.iter()) {
            merged.advance(stream, state.applied);
        }
        Ok(merged)
    }

    fn forget_coordinates(&mut self, batch: &mut Batch, dc: &DcName, p: &mut Pending) -> Fallible<()> {
        self.drop_coordinates(batch, |at| at == dc, p)
    }

    /// Removes every coordinate in a DC `of` accepts, those added earlier in this batch too.
    fn drop_coordinates(&mut self, batch: &mut Batch, of: impl Fn(&DcName) -> bool, p: &mut Pending) -> Fallible<()> {
        let mut gone = Vec::new();
        for entry in self.tables.coords.iter() {
            if let Some((user, at)) = schema::split_coord_key(&entry.key()?)
                && of(&at.dc)
            {
                gone.push((user, at));
            }
        }
        let added = p.coordinates.iter().filter(|(_, at, added)| *added && of(&at.dc));
        gone.extend(added.map(|(user, at, _)| (user.clone(), at.clone())));
        for (user, at) in gone {
            self.set_coordinate(batch, user, at, false, p);
        }
        Ok(())
    }

    /// Takes each other DC's coordinates from the snapshot where the sender is further
    /// along that DC's stream.
    fn merge_coordinates(
        &mut self,
        batch: &mut Batch,
        a_s: &VersionVector,
        mut from_snapshot: HashMap<DcName, Vec<(UserId, Coordinate)>>,
        p: &mut Pending,
    ) -> Fallible<()> {
        // The sender's coordinates of a DC replace ours when it is further along that DC's
        // current stream; being further along an earlier life's says nothing of who is
        // online now.
        let newest = |stream: &StreamId| {
            self.current_life(stream, p) && !a_s.streams().any(|s| s.dc == stream.dc && s.epoch() > stream.epoch())
        };
        let newer: HashSet<DcName> = a_s
            .iter()
            .filter(|(stream, seen)| stream.dc != self.options.dc && *seen > self.applied(stream, p) && newest(stream))
            .map(|(stream, _)| stream.dc.clone())
            .collect();
        if newer.is_empty() {
            return Ok(());
        }
        self.drop_coordinates(batch, |dc| newer.contains(dc), p)?;
        for dc in newer {
            for (user, at) in from_snapshot.remove(&dc).unwrap_or_default() {
                self.set_coordinate(batch, user, at, true, p);
            }
        }
        Ok(())
    }

    /// Makes a durable batch visible: coordinates first, so a message committed in the same
    /// batch as its recipient's login is pushed to the new connection too.
    fn publish(&mut self, p: &mut Pending) {
        {
            let mut coords = self.shared.coordinates.write().expect("coordinates lock");
            for (user, at, added) in p.coordinates.drain(..) {
                coords.apply(user, at, added);
            }
        }
        for (user, depth) in p.depths.drain() {
            let before = if depth == 0 {
                self.depths.remove(&user)
            } else {
                self.depths.insert(user, depth)
            };
            self.shared
                .add_depth(i128::from(depth) - i128::from(before.unwrap_or(0)));
        }
        self.streams.extend(p.streams.drain());
        self.shared
            .replicated_in
            .fetch_add(p.replicated_in, std::sync::atomic::Ordering::Relaxed);
        if self.options.replicate {
            self.log_head
                .send_if_modified(|head| std::mem::replace(head, self.log_seq) != self.log_seq);
        }
        let coords = self.shared.coordinates.read().expect("coordinates lock");
        // A message acknowledged in the same batch that brought it is not pushed.
        let acked = |m: &SharedMessage| !p.deleted.is_empty() && p.deleted.contains(&schema::mailbox_key(&m.to, m.seq));
        for msg in p.committed.iter().filter(|m| !acked(m)) {
            self.listener.committed(msg, coords.of(&msg.to));
        }
        for (from, ids) in p.receipts.drain() {
            self.listener.delivered(&from, &ids, coords.of(&from));
        }
    }
}

/// Commits a checkpoint's `batch` to fjall while another thread writes and syncs the
/// journal that will replace the current one: two waits for the disk at once rather
/// than one after the other (the new journal's sync took about half of a checkpoint at
/// full load when it came second).
fn commit_beside_next_journal(
    batch: fjall::OwnedWriteBatch,
    dir: &std::path::Path,
    carried: Option<&mut Record>,
) -> (Result<(), fjall::Error>, std::io::Result<Next>) {
    std::thread::scope(|scope| {
        let next = std::thread::Builder::new()
            .name("chinwag-journal".into())
            .spawn_scoped(scope, || Next::prepare(dir, carried));
        let committed = batch.commit();
        let next = next.and_then(|thread| {
            (thread.join()).unwrap_or_else(|_| Err(std::io::Error::other("the thread preparing the journal panicked")))
        });
        (committed, next)
    })
}
