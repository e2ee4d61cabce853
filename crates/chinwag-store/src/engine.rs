//! What the storage engine is doing underneath the store: memtables waiting to be
//! written out, level-0 runs waiting to be compacted, compactions and journals. These
//! are the queues that hold writes when they grow (fjall holds all writes while a
//! keyspace has four sealed memtables, and slows them from 20 level-0 runs), so
//! operators see them as metrics before a node slows down.

use fjall::{AbstractTree, Keyspace};

/// One keyspace of the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceStats {
    pub name: String,
    /// Bytes in the memtable that takes writes.
    pub memtable_bytes: u64,
    /// Sealed memtables waiting to be written to a table file.
    pub sealed_memtables: u64,
    /// Sorted runs in level 0, waiting to be compacted into level 1.
    pub level0_runs: u64,
    /// Table files in all levels.
    pub tables: u64,
    /// Bytes of table files on disk.
    pub disk_bytes: u64,
}

impl KeyspaceStats {
    pub(crate) fn of(keyspace: &Keyspace) -> Self {
        let tree = &keyspace.tree;
        Self {
            name: keyspace.name().to_string(),
            memtable_bytes: tree.active_memtable().size(),
            sealed_memtables: count(tree.sealed_memtable_count()),
            level0_runs: count(tree.l0_run_count()),
            tables: count(tree.table_count()),
            disk_bytes: tree.disk_space(),
        }
    }
}

/// The engine as a whole, read by [`crate::EmbeddedStore::engine_stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub keyspaces: Vec<KeyspaceStats>,
    /// fjall's journal files; all but the newest wait for memtables to be written out.
    pub journals: u64,
    /// Bytes in the store's own journal (`crate::journal`), replayed at open and emptied at
    /// each checkpoint.
    pub journal_bytes: u64,
    /// New messages held in memory, not yet written to fjall.
    pub held_messages: u64,
    /// Idempotency records held in memory, not yet written to fjall.
    pub held_receipts: u64,
    /// Devices' windows of numbered sends in memory, and the receipts in them.
    pub device_windows: u64,
    pub window_receipts: u64,
    /// Sealed memtables queued for the engine's flush workers, over all keyspaces.
    pub flushes_queued: u64,
    pub compactions_running: u64,
    pub compactions_completed: u64,
    /// Time spent compacting since the store opened, in microseconds.
    pub compaction_micros: u64,
    /// Operations queued for the store's writer thread, not yet committed.
    pub writer_queue: u64,
}

pub(crate) fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
