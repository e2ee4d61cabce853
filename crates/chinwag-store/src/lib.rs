//! chinwag's embedded store: one DC's mailboxes and coordinates in a fjall database (an
//! LSM tree) inside the data directory, behind the store's own write-ahead journal.
//!
//! Writes are made durable by group commit on a dedicated thread (see [`writer`]) that
//! syncs the journal, not fjall; new messages stay in memory and the journal until a
//! checkpoint finds them still unacknowledged (see [`journal`]). Reads are snapshot reads
//! that never wait for a commit. Coordinates are kept
//! durably and mirrored in memory, because every delivery looks them up.
//!
//! Why fjall: see ARCHITECTURE.md ("The embedded store") and
//! `tools/store-compare/README.md` for the measured comparison with redb and SQLite.

mod batch;
mod coords;
mod deferred;
use deferred::Deferred;
mod engine;
mod expiry;
mod held;
mod highest;
mod journal;
mod numbered;
mod place;
mod sched;
mod schema;
mod snapshot;
mod watermark;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chinwag_core::{
    CommitListener, Coordinate, DcName, Epoch, NewMessage, NodeName, Receipt, SharedMessage, Store, StoreError, UserId,
};
use chinwag_replication::{StreamId, VersionVector};
use fjall::compaction::Leveled;
use fjall::config::{PartitioningPolicy, PinningPolicy};
use fjall::{AbstractTree, Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot, watch};

use coords::CoordinateMap;
pub use engine::{EngineStats, KeyspaceStats};
pub use schema::Entry;
pub use writer::{CommitObserver, CommitStats, Syncs};
use writer::{Op, Writer};

/// Directory of the store inside the data directory.
pub const STORE_DIR: &str = "store";

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
    /// Keep this DC's stream of changes and apply other DCs' streams (multi-DC mode).
    pub replicate: bool,
    pub memory: StoreMemory,
    /// The journal's directory; `None` keeps it beside the tables. Best on a device of
    /// its own (see [`place`]).
    pub journal_dir: Option<PathBuf>,
}

/// What the store may hold in memory. Writes gather in one in-memory table per keyspace
/// until it reaches `memtable_bytes` and is written out; reads go through a block cache.
/// RSS under a steady load is roughly the busy keyspaces' memtables (mailbox and dedup;
/// up to two each while one is being written out) plus the cache; while fjall's worker is
/// busy with a compaction, up to about 12 times `memtable_bytes` per busy keyspace (see
/// `Tables::seal_full`).
///
/// New messages are held in memory (and the journal) until a checkpoint, which runs once
/// the journal reaches `checkpoint_bytes` or one held message, recipient or changed
/// mailbox depth per KiB of it is held: by the sizes of a message and a map entry, at
/// most about a quarter of `checkpoint_bytes` of RSS (an estimate; RSS while messages are
/// held was not isolated). Idempotency records are written out in bulk whenever as many
/// have gathered (one per KiB of `checkpoint_bytes`), by a thread of their own, and the
/// writer keeps taking more meanwhile; the journal's own limit bounds them all, since each
/// one is in it too. The same size bounds the journal replayed at a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMemory {
    pub memtable_bytes: u64,
    pub cache_bytes: u64,
    pub checkpoint_bytes: u64,
}

impl StoreMemory {
    /// Held messages, recipients and changed depths at which a checkpoint is due; also
    /// the idempotency records written out at once.
    fn held_max(&self) -> usize {
        usize::try_from(self.checkpoint_bytes / 1024)
            .unwrap_or(usize::MAX)
            .max(1)
    }

    /// Journal size at which commits fail: checkpoints are failing, and neither the
    /// journal nor the held messages may grow without bound.
    fn journal_max(&self) -> u64 {
        self.checkpoint_bytes.saturating_mul(4)
    }
}

impl Default for StoreMemory {
    fn default() -> Self {
        Self {
            // Small enough that writing one out stalls commits briefly (the latency
            // tail); larger ones trade that for fewer compactions (docs/performance.md).
            memtable_bytes: 4 * 1024 * 1024,
            cache_bytes: 32 * 1024 * 1024,
            checkpoint_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The writer thread's name. The kernel keeps its first 15 bytes (`chinwag-store-w`),
/// which is what `top -H` and `/proc` show.
const WRITER_THREAD: &str = "chinwag-store-writer";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path} is in use by another process (is another chinwag running on this data directory?)")]
    Locked { path: PathBuf },
    #[error("{path} is corrupt or truncated: {detail}. Restore it from a backup or move it aside to start empty.")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path} was written by an incompatible version of chinwag (format {found}, expected {expected})")]
    Format { path: PathBuf, found: u64, expected: u64 },
    #[error("cannot open {path}: {detail}")]
    Io { path: PathBuf, detail: String },
    #[error(
        "the journal of the last run, {previous}, still holds commits, but the journal is now configured in {configured}; start once with the journal where it was (it is replayed and emptied at open, and at every clean stop), then move it"
    )]
    JournalElsewhere { previous: PathBuf, configured: PathBuf },
}

/// Counts for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub mailbox_depth: u64,
    pub coordinates: u64,
    /// Users online in each DC, as far as this store knows.
    pub online_users: std::collections::BTreeMap<DcName, u64>,
    /// Messages that arrived from other DCs' streams since start.
    pub replicated_in: u64,
}

/// State shared by the writer thread and readers.
pub struct Shared {
    coordinates: RwLock<CoordinateMap>,
    mailbox_depth: AtomicU64,
    replicated_in: AtomicU64,
    /// New messages not yet written to fjall (see [`journal`]). Changed only by the
    /// writer, just after each commit reaches fjall.
    held: RwLock<held::Held>,
    journal_bytes: AtomicU64,
    /// Idempotency records held in memory (see [`deferred`]).
    held_receipts: AtomicUsize,
    /// Devices' windows in memory, and the receipts in them (see [`numbered`]).
    windows: AtomicUsize,
    window_receipts: AtomicUsize,
    /// The error of the last commit, if it failed; cleared by the next one that succeeds.
    failure: Mutex<Option<String>>,
}

impl Shared {
    fn set_failure(&self, failure: Option<String>) {
        *self.failure.lock().expect("failure lock") = failure;
    }

    fn add_depth(&self, delta: i128) {
        let amount = u64::try_from(delta.unsigned_abs()).unwrap_or(u64::MAX);
        if delta >= 0 {
            self.mailbox_depth.fetch_add(amount, Ordering::Relaxed);
        } else {
            self.mailbox_depth.fetch_sub(amount, Ordering::Relaxed);
        }
    }
}

/// Cap on the journal. Journals are replayed at open and are only freed once every
/// keyspace has flushed what they hold; the small keyspaces (depth, meta, coordinates)
/// fill slowly, so without a cap the journal — and the time to reopen after a crash —
/// would grow to fjall's default of 512 MiB.
const MAX_JOURNAL_BYTES: u64 = 128 * 1024 * 1024;

/// How far past its limit a memtable may grow while an earlier one waits to be written.
const MEMTABLE_STRETCH: u64 = 8;

/// The smallest memtable size any store was ever created with. In a format-2 store fjall
/// still seals at the creation size; sealing at this size or below keeps the store's own
/// trigger first, so fjall's never floods its queue.
const FORMAT_2_MEMTABLE_MAX: u64 = 4 * 1024 * 1024;

/// When the writer seals a memtable (see `Tables::seal_full`).
#[derive(Debug, Clone, Copy)]
pub struct Sealing {
    /// Size at which a memtable is sealed.
    limit: u64,
    /// Whether a memtable may grow to [`MEMTABLE_STRETCH`] times the limit while one
    /// sealed memtable waits: only where fjall's own trigger is off.
    stretch: bool,
}

impl Sealing {
    /// As configured, where fjall's own trigger is off; in a store where it is still on
    /// (format 2), no stretching and no larger than any store was created with.
    fn for_store(configured: u64, own_rotation: bool) -> Sealing {
        if own_rotation || configured <= FORMAT_2_MEMTABLE_MAX {
            return Sealing {
                limit: configured,
                stretch: own_rotation,
            };
        }
        tracing::warn!(
            configured_mib = configured / (1024 * 1024),
            used_mib = FORMAT_2_MEMTABLE_MAX / (1024 * 1024),
            "this store was created before chinwag sealed its own memtables; store.memtable_mib is capped for it"
        );
        Sealing {
            limit: FORMAT_2_MEMTABLE_MAX,
            stretch: false,
        }
    }
}

/// The database and its keyspaces (each is a cheap, shared handle).
#[derive(Clone)]
pub struct Tables {
    db: Database,
    mailbox: Keyspace,
    dedup: Keyspace,
    depth: Keyspace,
    coords: Keyspace,
    meta: Keyspace,
    log: Keyspace,
    streams: Keyspace,
    ids: Keyspace,
    gone: Keyspace,
    seqs: Keyspace,
    seq_receipts: Keyspace,
}

impl Tables {
    fn open(db: Database) -> Result<Self, fjall::Error> {
        // Filters past level 0 are split into small partitions found through a pinned
        // index. Unsplit, a level-1 or level-2 table's filter is one block of megabytes,
        // too large to stay in the block cache, so once the idempotency records of a few
        // minutes at full load reach level 2, every new message's duplicate check read
        // and checksummed such a block from the file (docs/performance.md).
        //
        // fjall's own memtable rotation is put out of reach (`u64::MAX`); the writer
        // rotates instead, see `seal_full`.
        let options = || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(u64::MAX)
                .filter_block_partitioning_policy(PartitioningPolicy::new([false, true]))
        };
        let ks = |name| db.keyspace(name, options);
        // Idempotency records arrive under random keys and stay a whole window, so
        // every level-0 table overlaps all of the level below it and compaction rewrites
        // each record many times. A small level 1 (4 tables of 8 MiB) and a ratio of 4
        // between levels rewrite each record fewer times than fjall's defaults (64 MiB
        // tables, ratio 10): 29 % less compaction CPU over 20 million messages
        // (docs/performance.md), for one or two more levels to probe per duplicate check.
        let dedup_options = || {
            options()
                .filter_block_partitioning_policy(PartitioningPolicy::new([false, false, true]))
                .filter_block_pinning_policy(PinningPolicy::new([true, true, false]))
                .compaction_strategy(Arc::new(
                    Leveled::default()
                        .with_l0_threshold(4)
                        .with_table_target_size(8 * 1024 * 1024)
                        .with_level_ratio_policy(vec![4.0]),
                ))
        };
        Ok(Self {
            mailbox: ks(schema::MAILBOX)?,
            dedup: db.keyspace(schema::DEDUP, dedup_options)?,
            depth: ks(schema::DEPTH)?,
            coords: ks(schema::COORDS)?,
            meta: ks(schema::META)?,
            log: ks(schema::LOG)?,
            streams: ks(schema::STREAMS)?,
            ids: ks(schema::IDS)?,
            gone: ks(schema::GONE)?,
            seqs: ks(schema::SEQS)?,
            seq_receipts: ks(schema::SEQ_RECEIPTS)?,
            db,
        })
    }

    fn get(&self, keyspace: journal::Ks) -> &Keyspace {
        use journal::Ks;
        match keyspace {
            Ks::Mailbox => &self.mailbox,
            Ks::Dedup => &self.dedup,
            Ks::Depth => &self.depth,
            Ks::Coords => &self.coords,
            Ks::Meta => &self.meta,
            Ks::Log => &self.log,
            Ks::Streams => &self.streams,
            Ks::Ids => &self.ids,
            Ks::Gone => &self.gone,
            Ks::Seqs => &self.seqs,
            Ks::SeqReceipts => &self.seq_receipts,
        }
    }

    fn all(&self) -> [&Keyspace; 11] {
        journal::Ks::ALL.map(|keyspace| self.get(keyspace))
    }

    /// Seals every memtable that has reached its limit (`sealing`), to be written out.
    ///
    /// fjall would do this itself, but by a request to its worker thread on every commit
    /// while a memtable is full, over a bounded queue that the worker also writes to when
    /// it rotates. Under steady load a long compaction lets those requests fill the queue,
    /// and the worker then waits forever on itself: no memtable is ever written out again,
    /// and memory and the journal grow until the process is killed (fjall 3.1, see
    /// fjall-rs/fjall#323; measured in docs/performance.md). Called by the writer after
    /// each commit, this asks once per full memtable, and since fjall holds writes while
    /// a keyspace has four memtables waiting, that queue never holds more than a few
    /// requests per keyspace.
    ///
    /// With `stretch`, while one sealed memtable waits for that thread (busy with a
    /// compaction), the next may grow to [`MEMTABLE_STRETCH`] times the limit before it
    /// is sealed too. Sealing at once added 150–200 ms to the p99 at saturation
    /// (docs/performance.md); most likely fjall's holds of all writes, 100 ms at a time,
    /// while a keyspace has four waiting (read from its code, not traced). A keyspace's
    /// memtables then hold at most about 12 times the limit (one of 8, three of 1, and the
    /// one filling). Only where fjall's own trigger is off: elsewhere an oversized
    /// memtable is exactly what makes fjall flood its queue.
    ///
    /// Runs after every commit: most keyspaces are below the limit, so their size is
    /// checked first and the count of waiting memtables only when it matters.
    fn seal_full(&self, sealing: Sealing) -> Result<(), fjall::Error> {
        for keyspace in self.all() {
            let size = keyspace.tree.active_memtable().size();
            if size < sealing.limit {
                continue;
            }
            let stretched = sealing.stretch && keyspace.sealed_memtable_count() == 1;
            if !stretched || size >= sealing.limit.saturating_mul(MEMTABLE_STRETCH) {
                keyspace.rotate_memtable()?;
            }
        }
        Ok(())
    }
}

pub struct EmbeddedStore {
    tables: Tables,
    shared: Arc<Shared>,
    ops: mpsc::Sender<Op>,
    dc: DcName,
    incarnation: u64,
    stream: StreamId,
    log_head: watch::Receiver<u64>,
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
        let path = dir.join(STORE_DIR);
        let fail = |e: fjall::Error| classify(&path, e);
        let db = Database::builder(&path)
            .max_journaling_size(MAX_JOURNAL_BYTES)
            .cache_size(options.memory.cache_bytes)
            .with_compaction_filter_factories(expiry::filters(options.dedup_window))
            .open()
            .map_err(fail)?;
        let tables = Tables::open(db).map_err(fail)?;
        let refused = |e: Recovery| match e {
            Recovery::Storage(e) => fail(e),
            Recovery::Damaged(detail) => OpenError::Corrupt {
                path: path.clone(),
                detail,
            },
            Recovery::Format(found) => OpenError::Format {
                path: path.clone(),
                found,
                expected: schema::FORMAT_VERSION,
            },
        };
        upgrade_format(&tables).map_err(refused)?;
        let place = place::Place::choose(&path, options.journal_dir.as_deref(), &tables.meta)?;
        let journal = replay(&path, &place.dir, &tables, options.memory.journal_max())?;
        let folded = numbered::fold(&tables.seqs, &tables.seq_receipts, &tables.db, &options.dc).map_err(fail)?;
        if folded > 0 {
            tracing::info!(
                folded,
                "merged the journal's receipts of numbered sends into their windows"
            );
        }
        place.record(&tables)?;
        let recovered = recover(&tables, &options).map_err(refused)?;
        let watermark = check_watermark(&path, recovered.commits)?;
        let depth_total = recovered.depths.values().sum();
        let shared = Arc::new(Shared {
            coordinates: RwLock::new(recovered.coordinates),
            mailbox_depth: AtomicU64::new(depth_total),
            replicated_in: AtomicU64::new(0),
            held: RwLock::new(held::Held::at(recovered.commits)),
            journal_bytes: AtomicU64::new(0),
            held_receipts: AtomicUsize::new(0),
            windows: AtomicUsize::new(0),
            window_receipts: AtomicUsize::new(0),
            failure: Mutex::new(None),
        });
        let (ops, rx) = mpsc::channel(options.queue);
        let (log_head_tx, log_head) = watch::channel(recovered.log_seq);
        let stream = StreamId::new(options.dc.clone(), recovered.epoch);
        let writer = Writer {
            tables: tables.clone(),
            shared: shared.clone(),
            options: options.clone(),
            listener,
            observer,
            stream: stream.clone(),
            next_seq: recovered.next_seq,
            log_seq: recovered.log_seq,
            streams: recovered.streams.into_iter().collect(),
            log_head: log_head_tx,
            commits: recovered.commits,
            watermark,
            depths: recovered.depths.into_iter().collect(),
            sealing: Sealing::for_store(options.memory.memtable_bytes, recovered.own_rotation),
            truncating: Default::default(),
            journal,
            _journal_lock: place.lock,
            buffer: Vec::new(),
            retry_checkpoint_at: None,
            highest: highest::Highest::new(highest::MAX_SENDERS),
            numbered: numbered::Windows::new(options.dc.clone()),
            deferred: Deferred::new(tables.dedup.clone(), options.memory.held_max()).map_err(|e| OpenError::Io {
                path: path.clone(),
                detail: format!("cannot start the thread writing idempotency records: {e}"),
            })?,
            fjall: writer::FjallState {
                commits: recovered.commits,
                synced_at: std::time::Instant::now(),
                failing: false,
            },
        };
        // The thread ends by itself once the store is closed or dropped (its queue closes).
        std::thread::Builder::new()
            .name(WRITER_THREAD.into())
            .spawn(move || writer.run(rx))
            .map_err(|e| OpenError::Io {
                path: path.clone(),
                detail: format!("cannot start the writer thread: {e}"),
            })?;
        let incarnation = recovered.incarnation;
        tracing::info!(path = %path.display(), incarnation, mailbox_depth = depth_total, "store open");
        Ok(Self {
            tables,
            shared,
            ops,
            dc: options.dc,
            incarnation,
            stream,
            log_head,
        })
    }

    /// This node's incarnation: 1 on the first start, one more on each start after.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Messages waiting in all mailboxes.
    pub fn mailbox_depth(&self) -> u64 {
        self.shared.mailbox_depth.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> StoreStats {
        let coordinates = self.shared.coordinates.read().expect("coordinates lock");
        StoreStats {
            mailbox_depth: self.shared.mailbox_depth.load(Ordering::Relaxed),
            coordinates: coordinates.len() as u64,
            online_users: coordinates.users_by_dc(),
            replicated_in: self.shared.replicated_in.load(Ordering::Relaxed),
        }
    }

    /// What the storage engine is doing: its queues of memtables, level-0 runs and
    /// compactions, and this store's own queue of writes.
    pub fn engine_stats(&self) -> EngineStats {
        let db = &self.tables.db;
        EngineStats {
            keyspaces: self.tables.all().into_iter().map(KeyspaceStats::of).collect(),
            journals: engine::count(db.journal_count()),
            journal_bytes: self.shared.journal_bytes.load(Ordering::Relaxed),
            held_messages: engine::count(self.shared.held.read().expect("held lock").len()),
            held_receipts: engine::count(self.shared.held_receipts.load(Ordering::Relaxed)),
            device_windows: engine::count(self.shared.windows.load(Ordering::Relaxed)),
            window_receipts: engine::count(self.shared.window_receipts.load(Ordering::Relaxed)),
            flushes_queued: engine::count(db.outstanding_flushes()),
            compactions_running: engine::count(db.active_compactions()),
            compactions_completed: engine::count(db.compactions_completed()),
            compaction_micros: u64::try_from(db.time_compacting().as_micros()).unwrap_or(u64::MAX),
            writer_queue: engine::count(self.ops.max_capacity() - self.ops.capacity()),
        }
    }

    /// Waits until every operation queued before this call is committed and the writer
    /// is done with what follows a commit (a checkpoint among it): then, until the next
    /// write, the files do not change but for fjall's background work. For tests that
    /// copy the files as a crash would leave them.
    pub async fn settle(&self) {
        let (done, settled) = oneshot::channel();
        if self.ops.send(Op::Settle(done)).await.is_ok() {
            let _ = settled.await;
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

    /// This DC's own stream.
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// How far each stream is durably applied (this DC's own included), and how far each
    /// log has been truncated.
    pub fn replication_state(&self) -> Result<(VersionVector, VersionVector), StoreError> {
        let mut applied = VersionVector::default();
        let mut truncated = VersionVector::default();
        applied.advance(&self.stream, *self.log_head.borrow());
        for entry in self.tables.streams.iter() {
            let (key, value) = entry.into_inner().map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let (Some(stream), Ok(state)) = (
                schema::split_stream_key(&key),
                postcard::from_bytes::<schema::StreamState>(&value),
            ) else {
                continue;
            };
            if stream != self.stream {
                applied.advance(&stream, state.applied);
            }
            truncated.advance(&stream, state.truncated);
        }
        Ok((applied, truncated))
    }

    /// Follows the head of this DC's own stream.
    pub fn log_head(&self) -> watch::Receiver<u64> {
        self.log_head.clone()
    }

    /// Applies entries of another DC's stream, numbered from `first`, and returns how far
    /// that stream is applied afterwards. Entries already applied are skipped; entries
    /// after a gap are not applied.
    /// Like appends, ingests take their place in the commit order when called.
    pub fn ingest(
        &self,
        stream: StreamId,
        first: u64,
        entries: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send + use<> {
        self.call(
            request(|reply| Op::Ingest(stream, first, entries, reply)),
            WhenFull::Wait,
        )
    }

    /// A consistent snapshot of the whole replicated state — every mailbox, coordinate and
    /// tombstone — and what it reflects, for a DC that needs entries no log holds any more.
    /// Reads a point-in-time view; does not block writers.
    pub fn snapshot(&self) -> Result<(VersionVector, Vec<Vec<u8>>), StoreError> {
        let (snap, held) = self.consistent_view()?;
        snapshot::build(&self.tables, &snap, held, &self.stream).map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Merges a snapshot from another DC (see [`EmbeddedStore::snapshot`]) and returns
    /// what this store has applied afterwards.
    pub fn merge_snapshot(
        &self,
        applied: VersionVector,
        items: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<VersionVector, StoreError>> + Send + use<> {
        self.call(
            request(|reply| Op::MergeSnapshot(applied, items, reply)),
            WhenFull::Wait,
        )
    }

    /// Forgets the coordinates of DC `dc` (it has been silent too long to be believed).
    /// Queued when called, like an ingest, so that coordinates the DC announces after it
    /// returns are applied after this, not wiped by it.
    pub fn forget_coordinates(&self, dc: DcName) -> impl Future<Output = Result<(), StoreError>> + Send + use<> {
        self.call(request(|reply| Op::ForgetCoordinates(dc, reply)), WhenFull::Wait)
    }

    /// Drops the log of `stream` through `through` (every peer has it). Answers once the
    /// store has taken the request; a long prefix then goes over several commits.
    pub fn truncate(
        &self,
        stream: StreamId,
        through: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + use<> {
        self.call(request(|reply| Op::Truncate(stream, through, reply)), WhenFull::Wait)
    }

    /// Queues `op` when called, not when the returned future is first polled, so that
    /// operations called one after another commit in that order.
    fn call<T: Send + 'static>(
        &self,
        (op, answer): (Op, Answer<T>),
        when_full: WhenFull,
    ) -> impl Future<Output = Result<T, StoreError>> + Send + use<T> {
        let queued = self.ops.try_send(op);
        let ops = self.ops.clone();
        async move {
            match queued {
                Ok(()) => {}
                Err(TrySendError::Closed(_)) => return Err(StoreError::Closed),
                Err(TrySendError::Full(op)) => match when_full {
                    WhenFull::Refuse => {
                        return Err(StoreError::Unavailable("store write queue is full".into()));
                    }
                    WhenFull::Wait => ops.send(op).await.map_err(|_| StoreError::Closed)?,
                },
            }
            answer.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn read_page(&self, user: &UserId, after: u64, limit: usize) -> Result<Vec<SharedMessage>, String> {
        let Some(first) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        let range = schema::mailbox_key(user, first)..=schema::mailbox_key(user, u64::MAX);
        // One view for the whole page: batches are atomic, so a page never shows a later
        // message without the earlier ones committed before it. A message a checkpoint is
        // moving to fjall may be in both; the page takes it once.
        let (snapshot, mut page) = self.view(|held| {
            held.range(user, first)
                .take(limit)
                .map(|msg| (msg.seq, msg.clone()))
                .collect::<BTreeMap<_, _>>()
        });
        for entry in snapshot.range(&self.tables.mailbox, range).take(limit) {
            let (key, value) = entry.into_inner().map_err(|e| e.to_string())?;
            let seq = schema::key_seq(&key).ok_or("short mailbox key")?;
            if page.contains_key(&seq) {
                continue;
            }
            let record: schema::MessageRecord =
                postcard::from_bytes(&value).map_err(|e| format!("mailbox record {seq}: {e}"))?;
            page.insert(seq, Arc::new(record.into_message(user, seq, &self.dc)?));
        }
        Ok(page.into_values().take(limit).collect())
    }

    /// What `read` takes from the held messages, then a fjall snapshot. In that order, a
    /// message a checkpoint moves to fjall meanwhile is seen in one or both; a commit
    /// whose fjall part is seen but whose held messages are not yet is harmless for a
    /// page (they are pushed right after).
    fn view<T>(&self, read: impl FnOnce(&held::Held) -> T) -> (fjall::Snapshot, T) {
        let held = read(&self.shared.held.read().expect("held lock"));
        (self.tables.db.snapshot(), held)
    }

    /// The held messages and a fjall snapshot of one and the same commit, as a replication
    /// snapshot needs (a message missing from it would read as acknowledged). The writer
    /// updates the held messages just after each commit reaches fjall, so this retries
    /// while the two differ; that is microseconds, or while fjall holds writes.
    fn consistent_view(&self) -> Result<(fjall::Snapshot, held::Held), StoreError> {
        let started = std::time::Instant::now();
        loop {
            let held = self.shared.held.read().expect("held lock").clone();
            let snap = self.tables.db.snapshot();
            let commits = snap
                .get(&self.tables.meta, schema::COMMITS)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .and_then(|v| schema::decode_u64(&v))
                .unwrap_or(0);
            if commits == held.commits() {
                return Ok((snap, held));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(StoreError::Unavailable("the store is too busy for a snapshot".into()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

type Answer<T> = oneshot::Receiver<Result<T, StoreError>>;

/// An operation and the channel its answer will come back on.
fn request<T>(op: impl FnOnce(writer::Reply<T>) -> Op) -> (Op, Answer<T>) {
    let (reply, answer) = oneshot::channel();
    (op(reply), answer)
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
    fn failure(&self) -> Option<String> {
        self.shared.failure.lock().expect("failure lock").clone()
    }

    fn append(&self, msg: NewMessage) -> impl Future<Output = Result<Receipt, StoreError>> + Send {
        self.call(request(|reply| Op::Append(msg, reply)), WhenFull::Refuse)
    }

    async fn scan(&self, user: UserId, after: u64, limit: usize) -> Result<Vec<SharedMessage>, StoreError> {
        self.read_page(&user, after, limit).map_err(StoreError::Unavailable)
    }

    fn ack(&self, user: UserId, seqs: Vec<u64>) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.call(request(|reply| Op::Ack(user, seqs, reply)), WhenFull::Wait)
    }

    fn add_coordinate(&self, user: UserId, at: Coordinate) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.call(request(|reply| Op::AddCoordinate(user, at, reply)), WhenFull::Wait)
    }

    fn remove_coordinate(&self, user: UserId, at: Coordinate) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.call(request(|reply| Op::RemoveCoordinate(user, at, reply)), WhenFull::Wait)
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

fn classify(path: &Path, e: fjall::Error) -> OpenError {
    let path = path.to_owned();
    let detail = e.to_string();
    match e {
        fjall::Error::Locked => OpenError::Locked { path },
        fjall::Error::Io(_) => OpenError::Io { path, detail },
        // Everything else fjall reports at open (a journal that cannot be replayed, bad
        // checksums, unknown tags or versions, unrecoverable state) means the files are
        // not a usable store.
        _ => OpenError::Corrupt { path, detail },
    }
}

/// Applies what the journal holds to fjall (see [`journal`]), syncs fjall and empties
/// the journal. Refuses a journal that ends before a commit fjall has seen: fjall only
/// sees a durable commit once the journal holds it, so it was truncated or damaged.
/// With nothing in the journal and its start already recorded, there is nothing to do.
fn replay(path: &Path, dir: &Path, tables: &Tables, max_len: u64) -> Result<journal::Journal, OpenError> {
    let journal_path = dir.join(journal::FILE);
    let io = |e: std::io::Error| OpenError::Io {
        path: journal_path.clone(),
        detail: e.to_string(),
    };
    let corrupt = |detail: String| OpenError::Corrupt {
        path: journal_path.clone(),
        detail,
    };
    let (mut journal, contents) = journal::Journal::open(dir, max_len).map_err(io)?;
    let counter = |key| {
        read_u64(&tables.meta, key).map_err(|e| match e {
            Recovery::Storage(e) => classify(path, e),
            _ => corrupt(format!("meta {key} is not a counter")),
        })
    };
    let seen = counter(schema::COMMITS)?.unwrap_or(0);
    let checkpoint = counter(schema::CHECKPOINT_COMMITS)?;
    if contents.is_empty() && checkpoint == Some(seen) {
        return Ok(journal);
    }
    let mut batch = tables.db.batch().durability(Some(PersistMode::SyncAll));
    let mut commits = checkpoint.unwrap_or(seen);
    let mut records = 0;
    for (n, payload) in contents.records().enumerate() {
        records += 1;
        let changes = journal::changes(payload).ok_or_else(|| corrupt(format!("record {n} is malformed")))?;
        for change in changes {
            let keyspace = tables.get(change.keyspace);
            match change.value {
                Some(value) => {
                    if change.keyspace == journal::Ks::Meta && change.key == schema::COMMITS.as_bytes() {
                        commits = schema::decode_u64(value).unwrap_or(commits);
                    }
                    batch.insert(keyspace, change.key, value);
                }
                None => batch.remove(keyspace, change.key),
            }
        }
    }
    if seen > commits {
        return Err(corrupt(format!(
            "it ends at commit {commits} but the tables hold commit {seen}: the journal was truncated or damaged"
        )));
    }
    batch.insert(&tables.meta, schema::CHECKPOINT_COMMITS, schema::encode_u64(commits));
    batch.commit().map_err(|e| classify(path, e))?;
    journal.clear().map_err(io)?;
    if records > 0 {
        tracing::info!(records, "replayed the journal");
    }
    Ok(journal)
}

/// Opens the watermark and refuses a store whose journal has fewer commits than were
/// acknowledged.
fn check_watermark(path: &Path, commits: u64) -> Result<watermark::Watermark, OpenError> {
    let io = |e: std::io::Error| OpenError::Io {
        path: path.join(watermark::FILE),
        detail: e.to_string(),
    };
    let (mark, reading) = watermark::Watermark::open(path).map_err(io)?;
    let corrupt = |detail: String| OpenError::Corrupt {
        path: path.to_owned(),
        detail,
    };
    match reading {
        watermark::Reading::Commits(acknowledged) if acknowledged > commits => Err(corrupt(format!(
            "the journal holds {commits} commits but {acknowledged} were made durable: files were truncated or damaged"
        ))),
        watermark::Reading::Damaged => Err(corrupt(format!("{} is damaged", watermark::FILE))),
        // Absent: a new store, or one from before watermarks; nothing to compare.
        _ => Ok(mark),
    }
}

enum Recovery {
    Storage(fjall::Error),
    Damaged(String),
    Format(u64),
}

impl From<fjall::Error> for Recovery {
    fn from(e: fjall::Error) -> Self {
        Recovery::Storage(e)
    }
}

struct Recovered {
    next_seq: u64,
    log_seq: u64,
    epoch: Epoch,
    streams: HashMap<StreamId, schema::StreamState>,
    commits: u64,
    incarnation: u64,
    coordinates: CoordinateMap,
    depths: HashMap<UserId, u64>,
    /// fjall's own memtable rotation is off in this store (see `Tables::seal_full`).
    own_rotation: bool,
}

fn read_u64(ks: &Keyspace, key: &str) -> Result<Option<u64>, Recovery> {
    match ks.get(key)? {
        None => Ok(None),
        Some(v) => schema::decode_u64(&v)
            .map(Some)
            .ok_or_else(|| Recovery::Damaged(format!("meta {key} is not a counter"))),
    }
}

/// Refuses a store of a newer format, and marks one of an older format this build
/// upgrades in place as the current one, durably, before replay and [`numbered::fold`]
/// write to it in the current layout: a crash between those writes and the mark would
/// otherwise leave a store an older build opens without seeing what it cannot read.
fn upgrade_format(t: &Tables) -> Result<(), Recovery> {
    match read_u64(&t.meta, schema::FORMAT)? {
        Some(schema::FORMAT_OWN_ROTATION | schema::FORMAT_NO_SEQS | schema::FORMAT_WHOLE_WINDOWS) => {
            let mut batch = t.db.batch().durability(Some(PersistMode::SyncAll));
            batch.insert(&t.meta, schema::FORMAT, schema::encode_u64(schema::FORMAT_VERSION));
            Ok(batch.commit()?)
        }
        Some(found) if found > schema::FORMAT_VERSION => Err(Recovery::Format(found)),
        _ => Ok(()),
    }
}

/// Reads the counters, begins the incarnation and drops stale coordinates, in one durable
/// batch.
fn recover(t: &Tables, options: &StoreOptions) -> Result<Recovered, Recovery> {
    let mut batch = t.db.batch().durability(Some(PersistMode::SyncAll));
    let own_rotation = match read_u64(&t.meta, schema::FORMAT)? {
        None => {
            batch.insert(&t.meta, schema::FORMAT, schema::encode_u64(schema::FORMAT_VERSION));
            true
        }
        // Formats upgraded in place were marked by `upgrade_format` already.
        Some(schema::FORMAT_VERSION) => true,
        Some(schema::FORMAT_FJALL_ROTATION) => read_u64(&t.meta, schema::OWN_ROTATION)?.is_some(),
        Some(found) => return Err(Recovery::Format(found)),
    };
    let next_seq = read_u64(&t.meta, schema::NEXT_SEQ)?.unwrap_or(1);
    let mut log_seq = read_u64(&t.meta, schema::LOG_SEQ)?.unwrap_or(0);
    let commits = read_u64(&t.meta, schema::COMMITS)?.unwrap_or(0);
    let epoch = match read_u64(&t.meta, schema::EPOCH)? {
        Some(e) => Epoch(u32::try_from(e).map_err(|_| Recovery::Damaged("epoch out of range".into()))?),
        None => {
            // A new store: its creation time names its stream.
            let e = u32::try_from(unix_ms() / 1000).unwrap_or(u32::MAX).max(1);
            batch.insert(&t.meta, schema::EPOCH, schema::encode_u64(u64::from(e)));
            Epoch(e)
        }
    };
    let own = StreamId::new(options.dc.clone(), epoch);
    let key = schema::incarnation_key(options.node.as_str());
    let incarnation = read_u64(&t.meta, &key)?.unwrap_or(0) + 1;
    batch.insert(&t.meta, key.as_str(), schema::encode_u64(incarnation));

    let mut coordinates = CoordinateMap::default();
    let mut stale = 0;
    for entry in t.coords.iter() {
        let key = entry.key()?;
        match schema::split_coord_key(&key) {
            Some((user, at)) if at.node != options.node || at.dc != options.dc => coordinates.apply(user, at, true),
            stale_coordinate => {
                batch.remove(&t.coords, key);
                stale += 1;
                // Other DCs must forget it too.
                if let (Some((user, at)), true) = (stale_coordinate, options.replicate) {
                    log_seq += 1;
                    batch.insert(
                        &t.log,
                        schema::entry_key(&own, log_seq),
                        schema::Entry::Offline { user, at }.encode(),
                    );
                }
            }
        }
    }
    batch.insert(&t.meta, schema::LOG_SEQ, schema::encode_u64(log_seq));
    let mut streams = HashMap::new();
    for entry in t.streams.iter() {
        let (key, value) = entry.into_inner()?;
        let stream = schema::split_stream_key(&key);
        let state = postcard::from_bytes::<schema::StreamState>(&value).ok();
        match (stream, state) {
            (Some(stream), Some(state)) => drop(streams.insert(stream, state)),
            _ => return Err(Recovery::Damaged("unreadable stream state".into())),
        }
    }
    if stale > 0 {
        tracing::info!(dropped = stale, "dropped coordinates of earlier incarnations");
    }
    let mut depths = HashMap::new();
    for entry in t.depth.iter() {
        let (key, value) = entry.into_inner()?;
        let user = std::str::from_utf8(&key).ok().and_then(|u| UserId::parse(u).ok());
        let depth = schema::decode_u64(&value);
        match (user, depth) {
            (Some(user), Some(depth)) => drop(depths.insert(user, depth)),
            _ => return Err(Recovery::Damaged("unreadable mailbox depth entry".into())),
        }
    }
    batch.commit()?;
    Ok(Recovered {
        next_seq,
        log_seq,
        epoch,
        streams,
        commits,
        incarnation,
        coordinates,
        depths,
        own_rotation,
    })
}

impl chinwag_replication::Log for EmbeddedStore {
    fn read(&self, stream: &StreamId, from: u64, max_entries: usize, max_bytes: usize) -> Vec<Vec<u8>> {
        let lo = schema::entry_key(stream, from);
        let hi = schema::entry_key(stream, u64::MAX);
        let mut out = Vec::new();
        let mut bytes = 0;
        for (expected, entry) in (from..).zip(self.tables.log.range(lo..=hi).take(max_entries)) {
            let Ok((key, value)) = entry.into_inner() else { break };
            // Only a gap-free run starting at `from`.
            if schema::key_seq(&key) != Some(expected) || (!out.is_empty() && bytes + value.len() > max_bytes) {
                break;
            }
            bytes += value.len();
            out.push(value.to_vec());
        }
        out
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod numbered_tests;

#[cfg(test)]
mod repl_tests;

#[cfg(test)]
mod model_tests;
