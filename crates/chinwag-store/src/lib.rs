//! chinwag's embedded store: one DC's mailboxes and coordinates in a single redb file.
//!
//! Writes are made durable by group commit on a dedicated thread (see [`writer`]); reads
//! are snapshot reads that never wait for the writer. Coordinates are kept durably and
//! mirrored in memory, because every delivery looks them up.
//!
//! Why redb: see ARCHITECTURE.md ("The embedded store") and
//! `tools/store-compare/README.md` for the measured comparison with fjall and SQLite.

mod schema;
mod writer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chinwag_core::{
    CommitListener, Coordinate, DcName, NewMessage, NodeName, Receipt, SharedMessage, Store,
    StoreError, UserId,
};
use redb::{Database, ReadableDatabase, ReadableTable};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

pub use writer::CommitObserver;
use writer::{CoordinateMap, Op, Writer};

/// File name of the store inside the data directory.
pub const STORE_FILE: &str = "store.redb";

#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// This DC: the origin of every message accepted here.
    pub dc: DcName,
    /// This node; its coordinates from earlier incarnations are dropped at open.
    pub node: NodeName,
    pub mailbox_max_messages: u64,
    pub commit_batch_max: usize,
    pub queue: usize,
    pub dedup_window: Duration,
}

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{path} is in use by another process (is another chinwag running on this data directory?)"
    )]
    Locked { path: PathBuf },
    #[error(
        "{path} is corrupt or truncated: {detail}. Restore it from a backup or move it aside to start empty."
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} was written by an incompatible version of chinwag (format {found}, expected {expected})"
    )]
    Format {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("cannot open {path}: {detail}")]
    Io { path: PathBuf, detail: String },
}

/// Counts for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub mailbox_depth: u64,
    pub coordinates: u64,
}

/// State shared by the writer thread and readers.
pub struct Shared {
    coordinates: RwLock<CoordinateMap>,
    mailbox_depth: AtomicU64,
}

impl Shared {
    fn add_depth(&self, delta: i64) {
        if delta >= 0 {
            self.mailbox_depth
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.mailbox_depth
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
    }
}

pub struct EmbeddedStore {
    db: Arc<Database>,
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    dc: DcName,
    incarnation: u64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, begins a new incarnation of `options.node`
    /// and drops that node's coordinates from earlier incarnations.
    pub fn open(
        dir: &Path,
        options: StoreOptions,
        listener: Arc<dyn CommitListener>,
        observer: CommitObserver,
    ) -> Result<Self, OpenError> {
        let path = dir.join(STORE_FILE);
        let db = open_database(&path)?;
        let io = |e: redb::Error| classify(&path, e);
        let (next_seq, incarnation, coordinates, depth) = recover(&db, &options).map_err(io)?;
        let shared = Arc::new(Shared {
            coordinates: RwLock::new(coordinates),
            mailbox_depth: AtomicU64::new(depth),
        });
        let db = Arc::new(db);
        let (ops, rx) = mpsc::channel(options.queue);
        let writer = Writer {
            db: db.clone(),
            shared: shared.clone(),
            options: options.clone(),
            listener,
            observer,
            next_seq,
            // Sweep after the first commit: a node restarted after a long stop has a backlog.
            last_sweep: Instant::now()
                .checked_sub(writer::DEDUP_SWEEP_EVERY)
                .unwrap_or_else(Instant::now),
        };
        // The thread ends by itself once the store is closed or dropped (its queue closes).
        std::thread::Builder::new()
            .name("chinwag-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Io {
                path: path.clone(),
                detail: format!("cannot start the writer thread: {e}"),
            })?;
        tracing::info!(path = %path.display(), incarnation, mailbox_depth = depth, "store open");
        Ok(Self {
            db,
            shared,
            ops,
            dc: options.dc,
            incarnation,
        })
    }

    /// This node's incarnation: 1 on the first start, one more on each start after.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            mailbox_depth: self.shared.mailbox_depth.load(Ordering::Relaxed),
            coordinates: self
                .shared
                .coordinates
                .read()
                .expect("coordinates lock")
                .len() as u64,
        }
    }

    /// Finishes every queued write and stops the writer. Later writes fail with
    /// [`StoreError::Closed`].
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.ops.send(Op::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
    }

    /// Queues `op` when called, not when the returned future is first polled, so that
    /// operations called one after another commit in that order.
    fn call<T: Send + 'static>(
        &self,
        op: impl FnOnce(writer::Reply<T>) -> Op,
        when_full: WhenFull,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + '_ {
        let (reply, answer) = oneshot::channel();
        let queued = self.ops.try_send(op(reply));
        async move {
            match queued {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => return Err(StoreError::Closed),
                Err(TrySendError::Full(op)) => match when_full {
                    WhenFull::Refuse => {
                        return Err(StoreError::Unavailable("store write queue is full".into()));
                    }
                    WhenFull::Wait => self.ops.send(op).await.map_err(|_| StoreError::Closed)?,
                },
            }
            answer.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn read_page(
        &self,
        user: &UserId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SharedMessage>, String> {
        let txn = self.db.begin_read().map_err(|e| e.to_string())?;
        let table = txn.open_table(schema::MAILBOX).map_err(|e| e.to_string())?;
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let lo = schema::mailbox_key(user, first);
        let hi = schema::mailbox_key(user, u64::MAX);
        let mut page = Vec::with_capacity(limit.min(256));
        for entry in table
            .range(lo.as_slice()..=hi.as_slice())
            .map_err(|e| e.to_string())?
            .take(limit)
        {
            let (key, value) = entry.map_err(|e| e.to_string())?;
            let seq = schema::mailbox_seq(key.value()).ok_or("short mailbox key")?;
            let record: schema::MessageRecord = postcard::from_bytes(value.value())
                .map_err(|e| format!("mailbox record {seq}: {e}"))?;
            page.push(Arc::new(record.into_message(user, seq, &self.dc)?));
        }
        Ok(page)
    }
}

/// What a write does when the writer's queue is full.
#[derive(Clone, Copy)]
enum WhenFull {
    /// Fail at once. Appends do this: waiting for room could let a later append from the
    /// same sender overtake this one, and a full queue means the node is overloaded, so
    /// shedding load is right; the sender retries with the same idempotency key.
    Refuse,
    /// Wait for room; used where order does not matter and giving up would leave state
    /// behind (a coordinate that is never removed).
    Wait,
}

impl Store for EmbeddedStore {
    fn append(&self, msg: NewMessage) -> impl Future<Output = Result<Receipt, StoreError>> + Send {
        self.call(|reply| Op::Append(msg, reply), WhenFull::Refuse)
    }

    async fn scan(
        &self,
        user: UserId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SharedMessage>, StoreError> {
        self.read_page(&user, after, limit)
            .map_err(StoreError::Unavailable)
    }

    fn ack(
        &self,
        user: UserId,
        seqs: Vec<u64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.call(|reply| Op::Ack(user, seqs, reply), WhenFull::Wait)
    }

    fn add_coordinate(
        &self,
        user: UserId,
        at: Coordinate,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.call(|reply| Op::AddCoordinate(user, at, reply), WhenFull::Wait)
    }

    fn remove_coordinate(
        &self,
        user: UserId,
        at: Coordinate,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.call(
            |reply| Op::RemoveCoordinate(user, at, reply),
            WhenFull::Wait,
        )
    }

    fn coordinates(&self, user: &UserId) -> Vec<Coordinate> {
        self.shared
            .coordinates
            .read()
            .expect("coordinates lock")
            .of(user)
            .to_vec()
    }
}

fn open_database(path: &Path) -> Result<Database, OpenError> {
    Database::create(path).map_err(|e| classify(path, e.into()))
}

fn classify(path: &Path, e: redb::Error) -> OpenError {
    let path = path.to_owned();
    match e {
        redb::Error::DatabaseAlreadyOpen => OpenError::Locked { path },
        redb::Error::Corrupted(detail) => OpenError::Corrupt { path, detail },
        other => {
            let detail = other.to_string();
            // redb reports files it cannot make sense of in several ways (bad magic number,
            // impossible lengths); all of them mean the file is not a usable store.
            if detail.contains("orrupt") || detail.contains("magic") || detail.contains("invalid") {
                OpenError::Corrupt { path, detail }
            } else {
                OpenError::Io { path, detail }
            }
        }
    }
}

type Recovered = (u64, u64, CoordinateMap, u64);

/// Reads the counters, begins the incarnation and drops stale coordinates, in one durable
/// transaction.
fn recover(db: &Database, options: &StoreOptions) -> Result<Recovered, redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::Immediate)?;
    let mut coordinates = CoordinateMap::default();
    let (next_seq, incarnation, depth);
    {
        let mut meta = txn.open_table(schema::META)?;
        let format = meta.get(schema::FORMAT)?.map(|v| v.value());
        match format {
            None => {
                meta.insert(schema::FORMAT, schema::FORMAT_VERSION)?;
            }
            Some(v) if v == schema::FORMAT_VERSION => {}
            Some(found) => {
                return Err(redb::Error::Corrupted(format!(
                    "store format {found}, this build reads format {}",
                    schema::FORMAT_VERSION
                )));
            }
        }
        next_seq = meta.get(schema::NEXT_SEQ)?.map_or(1, |v| v.value());
        let key = schema::incarnation_key(options.node.as_str());
        incarnation = meta.get(key.as_str())?.map_or(0, |v| v.value()) + 1;
        meta.insert(key.as_str(), incarnation)?;

        let mut coords = txn.open_table(schema::COORDS)?;
        let mut stale = Vec::new();
        for entry in coords.iter()? {
            let (key, ()) = entry.map(|(k, v)| (k.value().to_vec(), v.value()))?;
            match schema::split_coord_key(&key) {
                Some((user, at)) if at.node != options.node || at.dc != options.dc => {
                    coordinates.apply(user, at, true)
                }
                _ => stale.push(key),
            }
        }
        for key in &stale {
            coords.remove(key.as_slice())?;
        }
        if !stale.is_empty() {
            tracing::info!(
                dropped = stale.len(),
                "dropped coordinates of earlier incarnations"
            );
        }
        let depths = txn.open_table(schema::DEPTH)?;
        depth = depths
            .iter()?
            .map(|e| e.map(|(_, v)| v.value()))
            .sum::<Result<u64, _>>()?;
        // Create the remaining tables so readers never find one missing.
        txn.open_table(schema::MAILBOX)?;
        txn.open_table(schema::DEDUP)?;
        txn.open_table(schema::DEDUP_AGE)?;
    }
    txn.commit()?;
    Ok((next_seq, incarnation, coordinates, depth))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;
