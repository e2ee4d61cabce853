//! Where the journal lives: beside the tables by default, or in a directory of its own
//! (`StoreOptions::journal_dir`). Every durable commit waits for the journal's
//! `fdatasync`; on the tables' device that sync can also wait for compaction's writes.
//! On a device of its own it waits for nothing but the journal. (On our one-disk test
//! machine, with the tables moved to a RAM disk, the tail did not change: there it is
//! set by the one core and the disk's own flush; docs/performance.md.)
//!
//! A separate directory is recorded in the tables. A journal is only empty after a clean
//! stop or a replay, so a store whose previous journal still holds records is not opened
//! with another: it would not be replayed, and the acknowledged commits only it holds
//! would be lost.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use fjall::{Keyspace, PersistMode};

use crate::{OpenError, Tables, journal, schema};

/// Locked while a store uses the journal: fjall locks only the tables' directory, and a
/// journal in a directory of its own must not be shared by two nodes.
const LOCK: &str = "journal.lock";

/// The journal's directory, given the tables' (`store`) and the configured one.
pub struct Place {
    pub dir: PathBuf,
    /// Open on [`LOCK`], locked; the kernel releases the lock when it is closed.
    pub lock: File,
    /// The separate directory the tables record, if any.
    recorded: Option<PathBuf>,
    /// The tables' directory, canonical.
    store: PathBuf,
}

impl Place {
    pub fn choose(store: &Path, configured: Option<&Path>, meta: &Keyspace) -> Result<Place, OpenError> {
        let canonical_store = canonical(store)?;
        let dir = match configured {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
                canonical(dir)?
            }
            None => canonical_store.clone(),
        };
        let recorded = meta.get(schema::JOURNAL_DIR).map_err(|e| crate::classify(store, e))?;
        let recorded = recorded.map(|bytes| PathBuf::from(OsStr::from_bytes(&bytes)));
        let previous = recorded.as_ref().unwrap_or(&canonical_store);
        if *previous != dir {
            let file = previous.join(journal::FILE);
            if holds_records(&file)? {
                return Err(OpenError::JournalElsewhere {
                    previous: file,
                    configured: dir,
                });
            }
        }
        let lock = lock(&dir)?;
        Ok(Place {
            dir,
            lock,
            recorded,
            store: canonical_store,
        })
    }

    /// Records the journal's directory once its predecessor's records are applied: only
    /// a separate one, so that a data directory copied elsewhere keeps its own journal.
    pub fn record(&self, tables: &Tables) -> Result<(), OpenError> {
        let separate = (self.dir != self.store).then_some(&self.dir);
        if separate == self.recorded.as_ref() {
            return Ok(());
        }
        let mut batch = tables.db.batch().durability(Some(PersistMode::SyncAll));
        match separate {
            Some(dir) => batch.insert(&tables.meta, schema::JOURNAL_DIR, dir.as_os_str().as_bytes()),
            None => batch.remove(&tables.meta, schema::JOURNAL_DIR),
        }
        batch.commit().map_err(|e| crate::classify(&self.store, e))
    }
}

/// Whether a journal file has anything to replay; a missing one (its device gone) has
/// not, and the watermark then tells whether acknowledged commits were lost with it.
fn holds_records(file: &Path) -> Result<bool, OpenError> {
    match std::fs::metadata(file) {
        Ok(meta) => Ok(meta.len() > 0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_error(file, e)),
    }
}

fn lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| io_error(&path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked { path: dir.to_owned() }),
        Err(TryLockError::Error(e)) => Err(io_error(&path, e)),
    }
}

fn canonical(dir: &Path) -> Result<PathBuf, OpenError> {
    std::fs::canonicalize(dir).map_err(|e| io_error(dir, e))
}

fn io_error(path: &Path, e: io::Error) -> OpenError {
    OpenError::Io {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use chinwag_core::Store;

    use crate::tests::{new, open_when_free, options, try_open, user};
    use crate::{EmbeddedStore, OpenError, STORE_DIR, journal};

    fn with_journal(dir: Option<&Path>) -> crate::StoreOptions {
        crate::StoreOptions {
            journal_dir: dir.map(Path::to_owned),
            ..options(100)
        }
    }

    async fn reopen(data: &Path, journal: Option<&Path>) -> Result<EmbeddedStore, OpenError> {
        open_when_free(|| try_open(data, with_journal(journal))).await
    }

    fn len(file: &Path) -> Option<u64> {
        std::fs::metadata(file).ok().map(|m| m.len())
    }

    /// Stores two messages (held in memory and journaled only) and drops the store
    /// without closing it, as a crash would: the journal keeps them.
    async fn crashed(data: &Path, journal: Option<&Path>, ids: &str) {
        let store = reopen(data, journal).await.unwrap();
        for i in 0..2 {
            store
                .append(new("alice", "bob", &format!("{ids}{i}"), "t"))
                .await
                .unwrap();
        }
        drop(store);
    }

    #[tokio::test]
    async fn a_journal_in_a_directory_of_its_own_brings_back_what_a_crash_left_in_it() {
        let root = tempfile::tempdir().unwrap();
        let (data, dir) = (root.path().join("data"), root.path().join("journal"));
        crashed(&data, Some(&dir), "a").await;
        assert!(
            len(&dir.join(journal::FILE)).unwrap() > 0,
            "the commits went to the journal's directory"
        );
        assert_eq!(
            len(&data.join(STORE_DIR).join(journal::FILE)),
            None,
            "and nothing beside the tables"
        );
        let store = reopen(&data, Some(&dir)).await.unwrap();
        assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap().len(), 2);
        assert_eq!(len(&dir.join(journal::FILE)), Some(0), "replayed, so emptied");
    }

    #[tokio::test]
    async fn the_journal_is_moved_only_once_the_last_one_is_empty() {
        let root = tempfile::tempdir().unwrap();
        let (data, dir, other) = (root.path().join("data"), root.path().join("j1"), root.path().join("j2"));
        crashed(&data, Some(&dir), "a").await;
        for elsewhere in [None, Some(other.as_path())] {
            match reopen(&data, elsewhere).await {
                Err(OpenError::JournalElsewhere { previous, .. }) => {
                    assert_eq!(previous, dir.canonicalize().unwrap().join(journal::FILE));
                }
                Err(e) => panic!("{elsewhere:?}: expected a refusal, got {e}"),
                Ok(_) => panic!("{elsewhere:?}: opened without the journal's commits"),
            }
        }
        // Where it was, it is replayed; once closed, the journal may go anywhere.
        reopen(&data, Some(&dir)).await.unwrap().close().await;
        let store = reopen(&data, None).await.unwrap();
        assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap().len(), 2);
        store.close().await;
        drop(store);
        crashed(&data, None, "b").await;
        let refused = reopen(&data, Some(&other)).await;
        assert!(
            matches!(refused, Err(OpenError::JournalElsewhere { .. })),
            "back beside the tables, it is checked there"
        );
        reopen(&data, None).await.unwrap().close().await;
        let store = reopen(&data, Some(&other)).await.unwrap();
        assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn two_stores_cannot_share_a_journal_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("journal");
        let _first = try_open(&root.path().join("a"), with_journal(Some(&dir))).unwrap();
        let second = try_open(&root.path().join("b"), with_journal(Some(&dir)));
        assert!(matches!(second, Err(OpenError::Locked { .. })), "{:?}", second.err());
    }
}
