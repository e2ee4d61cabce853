//! redb 4: a copy-on-write B-tree in one file. One write transaction per batch,
//! committed with `Durability::Immediate`.

use std::path::Path;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::store::{
    depth_deltas, fold_record, idem_key, mailbox_key, Msg, Result, ScanResult, Store,
};

const MAILBOX: TableDefinition<[u8; 12], &[u8]> = TableDefinition::new("mailbox");
const IDEM: TableDefinition<[u8; 20], u64> = TableDefinition::new("idem");
const DEPTH: TableDefinition<u32, u64> = TableDefinition::new("depth");

pub struct RedbStore {
    db: Database,
}

impl Store for RedbStore {
    fn open(dir: &Path) -> Result<Self> {
        let db = Database::builder()
            .set_cache_size(crate::CACHE_BYTES)
            .create(dir.join("mailbox.redb"))?;
        // Make sure the tables exist so that read transactions can open them.
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        tx.open_table(MAILBOX)?;
        tx.open_table(IDEM)?;
        tx.open_table(DEPTH)?;
        tx.commit()?;
        Ok(Self { db })
    }

    fn append(&mut self, msgs: &[Msg]) -> Result<usize> {
        let mut tx = self.db.begin_write()?;
        // Immediate is the default; set explicitly so the intent is visible.
        tx.set_durability(Durability::Immediate)?;
        let mut inserted = Vec::with_capacity(msgs.len());
        {
            let mut mailbox = tx.open_table(MAILBOX)?;
            let mut idem = tx.open_table(IDEM)?;
            let mut depth = tx.open_table(DEPTH)?;
            for m in msgs {
                let ik = idem_key(m.sender, &m.client_id);
                if idem.get(ik)?.is_some() {
                    continue;
                }
                mailbox.insert(mailbox_key(m.recipient, m.seq), m.record.as_slice())?;
                idem.insert(ik, m.seq)?;
                inserted.push(m.recipient);
            }
            for (r, n) in depth_deltas(inserted.iter().copied()) {
                let cur = depth.get(r)?.map(|g| g.value()).unwrap_or(0);
                depth.insert(r, cur + n)?;
            }
        }
        tx.commit()?;
        Ok(inserted.len())
    }

    fn delete(&mut self, keys: &[(u32, u64)]) -> Result<()> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        {
            let mut mailbox = tx.open_table(MAILBOX)?;
            let mut depth = tx.open_table(DEPTH)?;
            let mut removed = Vec::with_capacity(keys.len());
            for &(r, seq) in keys {
                if mailbox.remove(mailbox_key(r, seq))?.is_some() {
                    removed.push(r);
                }
            }
            for (r, n) in depth_deltas(removed.into_iter()) {
                let cur = depth.get(r)?.map(|g| g.value()).unwrap_or(0);
                depth.insert(r, cur.saturating_sub(n))?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn scan(&mut self, recipient: u32) -> Result<ScanResult> {
        let tx = self.db.begin_read()?;
        let mailbox = tx.open_table(MAILBOX)?;
        let depth = tx.open_table(DEPTH)?;
        let mut res = ScanResult {
            ordered: true,
            ..Default::default()
        };
        let mut last = None;
        let lo = mailbox_key(recipient, 0);
        let hi = mailbox_key(recipient, u64::MAX);
        for item in mailbox.range(lo..=hi)? {
            let (k, v) = item?;
            let seq = u64::from_be_bytes(k.value()[4..].try_into()?);
            fold_record(&mut res, &mut last, seq, v.value());
        }
        res.depth = depth.get(recipient)?.map(|g| g.value()).unwrap_or(0);
        Ok(res)
    }

    fn close(self) -> Result<()> {
        self.db.close()?;
        Ok(())
    }
}
