//! fjall 3: an LSM-tree with one keyspace per table and a shared write-ahead
//! journal. One cross-keyspace `WriteBatch` per batch, committed with
//! `PersistMode::SyncAll` (fsync of the journal before `commit` returns).

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

use crate::store::{
    depth_deltas, fold_record, idem_key, mailbox_key, seq_of_mailbox_key, Msg, Result, ScanResult,
    Store,
};

pub struct FjallStore {
    db: Database,
    mailbox: Keyspace,
    idem: Keyspace,
    depth: Keyspace,
}

fn read_u64(v: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(v.try_into()?))
}

impl FjallStore {
    fn current_depth(&self, r: u32) -> Result<u64> {
        match self.depth.get(r.to_be_bytes())? {
            Some(v) => read_u64(&v),
            None => Ok(0),
        }
    }
}

impl Store for FjallStore {
    fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder(dir.join("fjall"))
            .cache_size(crate::CACHE_BYTES as u64)
            .open()?;
        let opts = || match crate::FJALL_MEMTABLE_BYTES.get().copied().flatten() {
            Some(bytes) => KeyspaceCreateOptions::default().max_memtable_size(bytes),
            None => KeyspaceCreateOptions::default(),
        };
        let mailbox = db.keyspace("mailbox", opts)?;
        let idem = db.keyspace("idem", opts)?;
        let depth = db.keyspace("depth", opts)?;
        Ok(Self {
            db,
            mailbox,
            idem,
            depth,
        })
    }

    fn append(&mut self, msgs: &[Msg]) -> Result<usize> {
        // The default batch durability is PersistMode::Buffer (write() to the OS
        // only); ask for an fsync of the journal inside commit().
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut inserted = Vec::with_capacity(msgs.len());
        for m in msgs {
            let ik = idem_key(m.sender, &m.client_id);
            // A batch cannot read its own writes; fine here because a duplicate
            // inside one batch is not part of this workload. A server would keep a
            // per-batch set (or use fjall's transactional database).
            if self.idem.contains_key(ik)? {
                continue;
            }
            batch.insert(
                &self.mailbox,
                mailbox_key(m.recipient, m.seq),
                m.record.as_slice(),
            );
            batch.insert(&self.idem, ik, m.seq.to_be_bytes());
            inserted.push(m.recipient);
        }
        // Depth counters are read-modify-write; this relies on a single writer
        // (the server would serialise appends behind one lock per store).
        for (r, n) in depth_deltas(inserted.iter().copied()) {
            let cur = self.current_depth(r)?;
            batch.insert(&self.depth, r.to_be_bytes(), (cur + n).to_be_bytes());
        }
        batch.commit()?;
        Ok(inserted.len())
    }

    fn delete(&mut self, keys: &[(u32, u64)]) -> Result<()> {
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        for &(r, seq) in keys {
            batch.remove(&self.mailbox, mailbox_key(r, seq));
        }
        for (r, n) in depth_deltas(keys.iter().map(|k| k.0)) {
            let cur = self.current_depth(r)?;
            batch.insert(
                &self.depth,
                r.to_be_bytes(),
                cur.saturating_sub(n).to_be_bytes(),
            );
        }
        batch.commit()?;
        Ok(())
    }

    fn scan(&mut self, recipient: u32) -> Result<ScanResult> {
        let snap = self.db.snapshot();
        let mut res = ScanResult {
            ordered: true,
            ..Default::default()
        };
        let mut last = None;
        let lo = mailbox_key(recipient, 0);
        let hi = mailbox_key(recipient, u64::MAX);
        for guard in snap.range(&self.mailbox, lo..=hi) {
            let (k, v) = guard.into_inner()?;
            fold_record(&mut res, &mut last, seq_of_mailbox_key(&k), &v);
        }
        res.depth = match snap.get(&self.depth, recipient.to_be_bytes())? {
            Some(v) => read_u64(&v)?,
            None => 0,
        };
        Ok(res)
    }

    fn close(self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll)?;
        // Dropping the last handle stops the background workers and releases the lock.
        drop(self.mailbox);
        drop(self.idem);
        drop(self.depth);
        drop(self.db);
        Ok(())
    }
}
