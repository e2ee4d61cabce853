//! The single writer thread and its group commit.
//!
//! Every write goes through one thread, which takes whatever operations are waiting (up to
//! `commit_batch_max`), turns them into one atomic fjall write batch and makes it durable
//! with one fsync of the journal. Throughput therefore grows with load instead of being
//! capped at one fsync per message, and the order of commits is the order of this
//! thread's loop: that is what gives seqs, and the commit listener, a single total order.
//!
//! Because only this thread writes, the state that decides a write — the next seq, each
//! mailbox's depth, which idempotency keys exist — is known here exactly; a batch keeps
//! its own changes aside and applies them only once the batch is durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chinwag_core::{
    CommitListener, Coordinate, DcName, Message, MessageId, NewMessage, Receipt, SharedMessage, StoreError, UserId,
};
use fjall::{OwnedWriteBatch as WriteBatch, PersistMode};
use tokio::sync::{mpsc, oneshot};

use crate::schema::{self, DedupRecord, MessageRecord};
use crate::watermark::Watermark;
use crate::{Shared, StoreOptions, Tables};

pub type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub enum Op {
    Append(NewMessage, Reply<Receipt>),
    Ack(UserId, Vec<u64>, Reply<()>),
    AddCoordinate(UserId, Coordinate, Reply<()>),
    RemoveCoordinate(UserId, Coordinate, Reply<()>),
    /// Finish everything queued before this, answer, then stop.
    Shutdown(oneshot::Sender<()>),
}

/// Receives what one commit did, for metrics.
pub type CommitObserver = Box<dyn Fn(Duration, usize) + Send + Sync>;

/// How often expired dedup entries are swept, and how many are examined at most per sweep
/// (so a sweep never delays appends noticeably).
pub const DEDUP_SWEEP_EVERY: Duration = Duration::from_secs(10);
const DEDUP_SWEEP_MAX: usize = 10_000;

pub struct Writer {
    pub tables: Tables,
    pub shared: Arc<Shared>,
    pub options: StoreOptions,
    pub listener: Arc<dyn CommitListener>,
    pub observer: CommitObserver,
    pub next_seq: u64,
    /// Durable batches so far, also recorded in the watermark.
    pub commits: u64,
    pub watermark: Watermark,
    /// Messages per mailbox, for users with a non-empty mailbox.
    pub depths: HashMap<UserId, u64>,
    pub last_sweep: Instant,
    /// Where the next dedup sweep resumes; empty means from the start.
    pub sweep_from: Vec<u8>,
}

/// What one batch will change once it is durable.
#[derive(Default)]
struct Pending {
    committed: Vec<SharedMessage>,
    coordinates: Vec<(UserId, Coordinate, bool)>,
    /// New depth of each mailbox the batch touched.
    depths: HashMap<UserId, u64>,
    /// Idempotency keys first used in this batch (a batch cannot read its own writes).
    dedup: HashMap<Vec<u8>, Receipt>,
    /// Mailbox keys deleted in this batch, so two devices acknowledging the same message
    /// at once count it once.
    deleted: std::collections::HashSet<Vec<u8>>,
    answers: Vec<Answer>,
    stop: Option<oneshot::Sender<()>>,
}

enum Answer {
    Receipt(Reply<Receipt>, Result<Receipt, StoreError>),
    Done(Reply<()>),
}

impl Writer {
    pub fn run(mut self, mut ops: mpsc::Receiver<Op>) {
        let mut batch = Vec::with_capacity(self.options.commit_batch_max);
        loop {
            let Some(first) = ops.blocking_recv() else {
                return;
            };
            batch.push(first);
            while batch.len() < self.options.commit_batch_max {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(done) = self.commit(batch.drain(..)) {
                // Let go of the database before saying so: whoever closed the store may
                // want to open the directory again.
                drop(self);
                let _ = done.send(());
                return;
            }
            if self.last_sweep.elapsed() >= DEDUP_SWEEP_EVERY {
                self.sweep_dedup();
            }
        }
    }

    /// Applies and commits a batch of operations and answers each; returns a shutdown
    /// request if the batch held one.
    fn commit(&mut self, ops: impl Iterator<Item = Op>) -> Option<oneshot::Sender<()>> {
        let started = Instant::now();
        let seq_before = self.next_seq;
        let mut pending = Pending::default();
        let mut batch = self.tables.db.batch().durability(Some(PersistMode::SyncAll));
        let mut count = 0;
        let mut result = Ok(());
        for op in ops {
            count += 1;
            if let Err(e) = self.apply(&mut batch, op, &mut pending) {
                result = Err(e);
            }
        }
        let result = result.and_then(|()| {
            batch.insert(&self.tables.meta, schema::NEXT_SEQ, schema::encode_u64(self.next_seq));
            batch.insert(&self.tables.meta, schema::COMMITS, schema::encode_u64(self.commits + 1));
            batch.commit()
        });
        match result {
            Ok(()) => {
                self.commits += 1;
                if let Err(e) = self.watermark.record(self.commits) {
                    // Only the detection of later damage is weakened; the data is safe.
                    tracing::warn!(error = %e, "cannot record the commit watermark");
                }
                (self.observer)(started.elapsed(), count);
                self.publish(&mut pending);
                for answer in pending.answers {
                    // A caller that went away (its connection closed) no longer needs the
                    // answer; the operation is durable all the same.
                    match answer {
                        Answer::Receipt(reply, result) => drop(reply.send(result)),
                        Answer::Done(reply) => drop(reply.send(Ok(()))),
                    }
                }
            }
            Err(e) => {
                // Nothing is durable: forget what the batch would have changed, fail it all.
                tracing::error!(error = %e, ops = count, "store commit failed");
                self.next_seq = seq_before;
                let err = StoreError::Unavailable(format!("commit failed: {e}"));
                for answer in pending.answers {
                    match answer {
                        Answer::Receipt(reply, _) => drop(reply.send(Err(err.clone()))),
                        Answer::Done(reply) => drop(reply.send(Err(err.clone()))),
                    }
                }
            }
        }
        pending.stop
    }

    /// Adds one operation to the batch. `Err` is a storage failure that fails the batch.
    fn apply(&mut self, batch: &mut WriteBatch, op: Op, pending: &mut Pending) -> Result<(), fjall::Error> {
        match op {
            Op::Append(new, reply) => {
                let result = self.append(batch, new, pending)?;
                pending.answers.push(Answer::Receipt(reply, result));
            }
            Op::Ack(user, seqs, reply) => {
                self.ack(batch, user, &seqs, pending)?;
                pending.answers.push(Answer::Done(reply));
            }
            Op::AddCoordinate(user, at, reply) => {
                batch.insert(&self.tables.coords, schema::coord_key(&user, &at), []);
                pending.coordinates.push((user, at, true));
                pending.answers.push(Answer::Done(reply));
            }
            Op::RemoveCoordinate(user, at, reply) => {
                batch.remove(&self.tables.coords, schema::coord_key(&user, &at));
                pending.coordinates.push((user, at, false));
                pending.answers.push(Answer::Done(reply));
            }
            Op::Shutdown(done) => pending.stop = Some(done),
        }
        Ok(())
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
    fn append(
        &mut self,
        batch: &mut WriteBatch,
        new: NewMessage,
        pending: &mut Pending,
    ) -> Result<Result<Receipt, StoreError>, fjall::Error> {
        let dedup_key = schema::dedup_key(&new.from, &new.client_id);
        if let Some(receipt) = pending.dedup.get(&dedup_key) {
            return Ok(Ok(Receipt {
                duplicate: true,
                ..receipt.clone()
            }));
        }
        if let Some(previous) = self.tables.dedup.get(&dedup_key)? {
            return Ok(Ok(self.earlier_receipt(&previous)));
        }
        let depth = self.depth(&new.to, pending);
        if depth >= self.options.mailbox_max_messages {
            return Ok(Err(StoreError::MailboxFull {
                user: new.to,
                limit: self.options.mailbox_max_messages,
            }));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let msg = Message {
            id: MessageId {
                origin: self.options.dc.clone(),
                seq,
            },
            seq,
            from: new.from,
            to: new.to,
            client_id: new.client_id,
            text: new.text,
            at_ms: new.at_ms,
        };
        batch.insert(
            &self.tables.mailbox,
            schema::mailbox_key(&msg.to, seq),
            MessageRecord::of(&msg).encode(),
        );
        let dedup = DedupRecord {
            origin: msg.id.origin.as_str(),
            origin_seq: seq,
            at_ms: msg.at_ms,
        };
        batch.insert(
            &self.tables.dedup,
            dedup_key.clone(),
            postcard::to_stdvec(&dedup).expect("encodes"),
        );
        self.set_depth(batch, &msg.to, depth + 1, pending);
        let receipt = Receipt {
            id: msg.id.clone(),
            at_ms: msg.at_ms,
            duplicate: false,
        };
        pending.dedup.insert(dedup_key, receipt.clone());
        pending.committed.push(Arc::new(msg));
        Ok(Ok(receipt))
    }

    fn set_depth(&self, batch: &mut WriteBatch, user: &UserId, depth: u64, pending: &mut Pending) {
        let key = user.as_str().as_bytes();
        if depth == 0 {
            batch.remove(&self.tables.depth, key);
        } else {
            batch.insert(&self.tables.depth, key, schema::encode_u64(depth));
        }
        pending.depths.insert(user.clone(), depth);
    }

    /// Deletes acknowledged messages that are still there.
    fn ack(
        &mut self,
        batch: &mut WriteBatch,
        user: UserId,
        seqs: &[u64],
        pending: &mut Pending,
    ) -> Result<(), fjall::Error> {
        let mut removed = 0;
        for &seq in seqs {
            let key = schema::mailbox_key(&user, seq);
            // Acks of messages that are gone (acknowledged on another device, or never
            // there) must not drive the depth count down.
            if !pending.deleted.contains(&key) && self.tables.mailbox.contains_key(&key)? {
                batch.remove(&self.tables.mailbox, key.clone());
                pending.deleted.insert(key);
                removed += 1;
            }
        }
        if removed > 0 {
            let depth = self.depth(&user, pending).saturating_sub(removed);
            self.set_depth(batch, &user, depth, pending);
        }
        Ok(())
    }

    fn earlier_receipt(&self, record: &[u8]) -> Receipt {
        // An unreadable record would mean a damaged store. Storing the retry again could
        // deliver it twice, so it is answered as a duplicate of an unknown message.
        let (origin, seq, at_ms) = match postcard::from_bytes::<DedupRecord>(record) {
            Ok(r) => (DcName::parse(r.origin).ok(), r.origin_seq, r.at_ms),
            Err(e) => {
                tracing::error!(error = %e, "unreadable dedup record");
                (None, 0, 0)
            }
        };
        Receipt {
            id: MessageId {
                origin: origin.unwrap_or_else(|| self.options.dc.clone()),
                seq,
            },
            at_ms,
            duplicate: true,
        }
    }

    /// Makes a durable batch visible: coordinates first, so a message committed in the same
    /// batch as its recipient's login is pushed to the new connection too.
    fn publish(&mut self, pending: &mut Pending) {
        {
            let mut coords = self.shared.coordinates.write().expect("coordinates lock");
            for (user, at, added) in pending.coordinates.drain(..) {
                coords.apply(user, at, added);
            }
        }
        for (user, depth) in pending.depths.drain() {
            let before = if depth == 0 {
                self.depths.remove(&user)
            } else {
                self.depths.insert(user, depth)
            };
            self.shared
                .add_depth(i128::from(depth) - i128::from(before.unwrap_or(0)));
        }
        let coords = self.shared.coordinates.read().expect("coordinates lock");
        for msg in &pending.committed {
            self.listener.committed(msg, coords.of(&msg.to));
        }
    }

    fn sweep_dedup(&mut self) {
        self.last_sweep = Instant::now();
        let window_ms = u64::try_from(self.options.dedup_window.as_millis()).unwrap_or(u64::MAX);
        let horizon = crate::unix_ms().saturating_sub(window_ms);
        match self.sweep_dedup_before(horizon) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "swept expired dedup entries"),
            Err(e) => tracing::warn!(error = %e, "dedup sweep failed"),
        }
    }

    /// Examines up to [`DEDUP_SWEEP_MAX`] dedup entries from where the last sweep stopped
    /// and removes those older than `horizon_ms`.
    fn sweep_dedup_before(&mut self, horizon_ms: u64) -> Result<usize, fjall::Error> {
        // Losing a sweep in a crash only means sweeping again: no fsync.
        let mut batch = self.tables.db.batch().durability(Some(PersistMode::Buffer));
        let mut removed = 0;
        let mut examined = 0;
        let mut last = None;
        for entry in self.tables.dedup.range(self.sweep_from.as_slice()..) {
            let (key, value) = entry.into_inner()?;
            examined += 1;
            let expired = postcard::from_bytes::<DedupRecord>(&value).is_ok_and(|r| r.at_ms < horizon_ms);
            if expired {
                batch.remove(&self.tables.dedup, key.clone());
                removed += 1;
            }
            last = Some(key);
            if examined == DEDUP_SWEEP_MAX {
                break;
            }
        }
        self.sweep_from = match (examined == DEDUP_SWEEP_MAX, last) {
            // Resume just after the last key examined.
            (true, Some(key)) => {
                let mut next = key.to_vec();
                next.push(0);
                next
            }
            _ => Vec::new(),
        };
        batch.commit()?;
        Ok(removed)
    }
}

/// The in-memory view of who is online where.
#[derive(Default)]
pub struct CoordinateMap {
    by_user: HashMap<UserId, Vec<Coordinate>>,
    count: usize,
}

impl CoordinateMap {
    pub fn apply(&mut self, user: UserId, at: Coordinate, added: bool) {
        if added {
            let entry = self.by_user.entry(user).or_default();
            if !entry.contains(&at) {
                entry.push(at);
                self.count += 1;
            }
            return;
        }
        let Some(entry) = self.by_user.get_mut(&user) else {
            return;
        };
        if let Some(i) = entry.iter().position(|c| *c == at) {
            entry.swap_remove(i);
            self.count -= 1;
        }
        if entry.is_empty() {
            // Keep the map the size of the online population, not of everyone ever seen.
            self.by_user.remove(&user);
        }
    }

    pub fn of(&self, user: &UserId) -> &[Coordinate] {
        self.by_user.get(user).map_or(&[], Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.count
    }
}
