//! The single writer thread and its group commit.
//!
//! Every write goes through one thread, which takes whatever operations are waiting (up to
//! `commit_batch_max`), applies them in one redb transaction and makes it durable with one
//! fsync. Throughput therefore grows with load instead of being capped at one fsync per
//! message, and the order of commits is the order of this thread's loop: that is what
//! gives seqs, and the commit listener, a single total order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chinwag_core::{
    CommitListener, Coordinate, Message, MessageId, NewMessage, Receipt, SharedMessage, StoreError,
    UserId,
};
use redb::{Database, Durability, ReadableTable, WriteTransaction};
use tokio::sync::{mpsc, oneshot};

use crate::schema::{self, DedupRecord, MessageRecord};
use crate::{Shared, StoreOptions};

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

/// How often expired dedup entries are swept, and how many at most per sweep (so a sweep
/// never delays appends noticeably).
pub const DEDUP_SWEEP_EVERY: Duration = Duration::from_secs(10);
const DEDUP_SWEEP_MAX: usize = 10_000;

pub struct Writer {
    pub db: Arc<Database>,
    pub shared: Arc<Shared>,
    pub options: StoreOptions,
    pub listener: Arc<dyn CommitListener>,
    pub observer: CommitObserver,
    pub next_seq: u64,
    pub last_sweep: Instant,
}

/// The result of applying one batch, kept until the commit is known to have succeeded.
#[derive(Default)]
struct Effects {
    committed: Vec<SharedMessage>,
    coordinates: Vec<(UserId, Coordinate, bool)>,
    depth_delta: i64,
}

enum Answer {
    Receipt(Reply<Receipt>, Result<Receipt, StoreError>),
    Done(Reply<()>),
    Stopped(oneshot::Sender<()>),
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
            if let Some(done) = self.commit_batch(&mut batch) {
                // Let go of the database before saying so: whoever closed the store may
                // want to open the file again.
                drop(self);
                let _ = done.send(());
                return;
            }
            if self.last_sweep.elapsed() >= DEDUP_SWEEP_EVERY {
                self.sweep_dedup();
            }
        }
    }

    /// Applies and commits `batch` and answers every operation in it, except a shutdown
    /// request, which is returned.
    fn commit_batch(&mut self, batch: &mut Vec<Op>) -> Option<oneshot::Sender<()>> {
        let started = Instant::now();
        let ops = batch.len();
        let mut stop = None;
        let seq_before = self.next_seq;
        let mut effects = Effects::default();
        let mut answers = Vec::with_capacity(ops);
        let outcome = self
            .db
            .begin_write()
            .map_err(|e| e.to_string())
            .and_then(|txn| self.apply(txn, batch.drain(..), &mut effects, &mut answers));
        if let Err(e) = outcome {
            // Nothing is durable: roll back what the batch consumed and fail it all.
            tracing::error!(error = %e, ops, "store commit failed");
            self.next_seq = seq_before;
            let err = StoreError::Unavailable(e);
            for answer in answers {
                match answer {
                    Answer::Receipt(reply, _) => drop(reply.send(Err(err.clone()))),
                    Answer::Done(reply) => drop(reply.send(Err(err.clone()))),
                    Answer::Stopped(done) => stop = Some(done),
                }
            }
            return stop;
        }
        (self.observer)(started.elapsed(), ops);
        self.publish(effects);
        for answer in answers {
            // A caller that went away (its connection closed) no longer needs the answer;
            // the operation is durable all the same.
            match answer {
                Answer::Receipt(reply, result) => drop(reply.send(result)),
                Answer::Done(reply) => drop(reply.send(Ok(()))),
                Answer::Stopped(done) => stop = Some(done),
            }
        }
        stop
    }

    fn apply(
        &mut self,
        mut txn: WriteTransaction,
        batch: impl Iterator<Item = Op>,
        effects: &mut Effects,
        answers: &mut Vec<Answer>,
    ) -> Result<(), String> {
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        {
            let mut tables = Tables::open(&txn).map_err(|e| e.to_string())?;
            for op in batch {
                match op {
                    Op::Append(new, reply) => {
                        let result = self
                            .append(&mut tables, new, effects)
                            .map_err(|e| e.to_string())?;
                        answers.push(Answer::Receipt(reply, result));
                    }
                    Op::Ack(user, seqs, reply) => {
                        effects.depth_delta -=
                            tables.ack(&user, &seqs).map_err(|e| e.to_string())?;
                        answers.push(Answer::Done(reply));
                    }
                    Op::AddCoordinate(user, at, reply) => {
                        tables
                            .coords
                            .insert(schema::coord_key(&user, &at).as_slice(), ())
                            .map_err(|e| e.to_string())?;
                        effects.coordinates.push((user, at, true));
                        answers.push(Answer::Done(reply));
                    }
                    Op::RemoveCoordinate(user, at, reply) => {
                        tables
                            .coords
                            .remove(schema::coord_key(&user, &at).as_slice())
                            .map_err(|e| e.to_string())?;
                        effects.coordinates.push((user, at, false));
                        answers.push(Answer::Done(reply));
                    }
                    Op::Shutdown(done) => answers.push(Answer::Stopped(done)),
                }
            }
            tables
                .meta
                .insert(schema::NEXT_SEQ, self.next_seq)
                .map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// Stores one message unless it is a retry or the mailbox is full. `Err` is a storage
    /// failure that aborts the batch; `Ok(Err)` is this message's own refusal.
    fn append(
        &mut self,
        t: &mut Tables<'_>,
        new: NewMessage,
        effects: &mut Effects,
    ) -> Result<Result<Receipt, StoreError>, redb::Error> {
        let dedup_key = schema::dedup_key(&new.from, &new.client_id);
        if let Some(previous) = t.dedup.get(dedup_key.as_slice())? {
            return Ok(Ok(self.earlier_receipt(previous.value())));
        }
        let depth = t.depth.get(new.to.as_str())?.map_or(0, |d| d.value());
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
        t.mailbox.insert(
            schema::mailbox_key(&msg.to, seq).as_slice(),
            MessageRecord::of(&msg).encode().as_slice(),
        )?;
        let dedup = DedupRecord {
            origin: msg.id.origin.as_str(),
            origin_seq: seq,
            at_ms: msg.at_ms,
        };
        t.dedup.insert(
            dedup_key.as_slice(),
            postcard::to_stdvec(&dedup).expect("encodes").as_slice(),
        )?;
        t.dedup_age
            .insert(schema::dedup_age_key(msg.at_ms, &dedup_key).as_slice(), ())?;
        t.depth.insert(msg.to.as_str(), depth + 1)?;
        effects.depth_delta += 1;
        let receipt = Receipt {
            id: msg.id.clone(),
            at_ms: msg.at_ms,
            duplicate: false,
        };
        effects.committed.push(Arc::new(msg));
        Ok(Ok(receipt))
    }

    fn earlier_receipt(&self, record: &[u8]) -> Receipt {
        // A record this process cannot read would mean a corrupt file; answering with the
        // retry as if new would risk a duplicate, so it is reported as a receipt of
        // an unknown id instead of being stored again.
        match postcard::from_bytes::<DedupRecord>(record) {
            Ok(r) => Receipt {
                id: MessageId {
                    origin: chinwag_core::DcName::parse(r.origin)
                        .unwrap_or_else(|_| self.options.dc.clone()),
                    seq: r.origin_seq,
                },
                at_ms: r.at_ms,
                duplicate: true,
            },
            Err(e) => {
                tracing::error!(error = %e, "unreadable dedup record");
                Receipt {
                    id: MessageId {
                        origin: self.options.dc.clone(),
                        seq: 0,
                    },
                    at_ms: 0,
                    duplicate: true,
                }
            }
        }
    }

    /// Makes a committed batch visible: coordinates first, so a message committed in the
    /// same batch as its recipient's login is pushed to the new connection too.
    fn publish(&self, effects: Effects) {
        {
            let mut coords = self.shared.coordinates.write().expect("coordinates lock");
            for (user, at, added) in effects.coordinates {
                coords.apply(user, at, added);
            }
        }
        self.shared.add_depth(effects.depth_delta);
        let coords = self.shared.coordinates.read().expect("coordinates lock");
        for msg in &effects.committed {
            self.listener.committed(msg, coords.of(&msg.to));
        }
    }

    fn sweep_dedup(&mut self) {
        self.last_sweep = Instant::now();
        let horizon = crate::unix_ms().saturating_sub(
            self.options
                .dedup_window
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        );
        match self.sweep_dedup_before(horizon) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "swept expired dedup entries"),
            Err(e) => tracing::warn!(error = %e, "dedup sweep failed"),
        }
    }

    fn sweep_dedup_before(&self, horizon_ms: u64) -> Result<usize, redb::Error> {
        let mut txn = self.db.begin_write()?;
        // Losing a sweep in a crash only means sweeping again.
        txn.set_durability(Durability::None)?;
        let mut removed = 0;
        {
            let mut age = txn.open_table(schema::DEDUP_AGE)?;
            let mut dedup = txn.open_table(schema::DEDUP)?;
            let expired: Vec<Vec<u8>> = age
                .range::<&[u8]>(..horizon_ms.to_be_bytes().as_slice())?
                .take(DEDUP_SWEEP_MAX)
                .map(|entry| entry.map(|(k, _)| k.value().to_vec()))
                .collect::<Result<_, _>>()?;
            for key in expired {
                age.remove(key.as_slice())?;
                if let Some((_, dedup_key)) = schema::split_dedup_age(&key) {
                    dedup.remove(dedup_key)?;
                }
                removed += 1;
            }
        }
        txn.commit()?;
        Ok(removed)
    }
}

struct Tables<'t> {
    mailbox: redb::Table<'t, &'static [u8], &'static [u8]>,
    dedup: redb::Table<'t, &'static [u8], &'static [u8]>,
    dedup_age: redb::Table<'t, &'static [u8], ()>,
    depth: redb::Table<'t, &'static str, u64>,
    coords: redb::Table<'t, &'static [u8], ()>,
    meta: redb::Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(Self {
            mailbox: txn.open_table(schema::MAILBOX)?,
            dedup: txn.open_table(schema::DEDUP)?,
            dedup_age: txn.open_table(schema::DEDUP_AGE)?,
            depth: txn.open_table(schema::DEPTH)?,
            coords: txn.open_table(schema::COORDS)?,
            meta: txn.open_table(schema::META)?,
        })
    }

    /// Deletes acknowledged messages; returns how many were there.
    fn ack(&mut self, user: &UserId, seqs: &[u64]) -> Result<i64, redb::Error> {
        let mut removed = 0;
        for &seq in seqs {
            if self
                .mailbox
                .remove(schema::mailbox_key(user, seq).as_slice())?
                .is_some()
            {
                removed += 1;
            }
        }
        if removed > 0 {
            let depth = self.depth.get(user.as_str())?.map_or(0, |d| d.value());
            let left = depth.saturating_sub(removed);
            if left == 0 {
                self.depth.remove(user.as_str())?;
            } else {
                self.depth.insert(user.as_str(), left)?;
            }
        }
        Ok(i64::try_from(removed).unwrap_or(i64::MAX))
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
