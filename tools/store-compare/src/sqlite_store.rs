//! SQLite (bundled) through rusqlite: WAL journal, synchronous=FULL, one
//! `BEGIN IMMEDIATE ... COMMIT` per batch. With WAL + FULL the WAL file is
//! fsynced on every commit, so a commit that returned survives a power loss.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::store::{fold_record, Msg, Result, ScanResult, Store};

pub struct SqliteStore {
    conn: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS mailbox (
    recipient INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    record    BLOB    NOT NULL,
    PRIMARY KEY (recipient, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idem (
    sender    INTEGER NOT NULL,
    client_id BLOB    NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (sender, client_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS depth (
    recipient INTEGER PRIMARY KEY,
    n         INTEGER NOT NULL
);
";

impl Store for SqliteStore {
    fn open(dir: &Path) -> Result<Self> {
        let conn = Connection::open(dir.join("mailbox.sqlite"))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!("journal_mode is {mode}, expected wal").into());
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        // Negative = KiB.
        conn.pragma_update(None, "cache_size", -((crate::CACHE_BYTES / 1024) as i64))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
    }

    fn append(&mut self, msgs: &[Msg]) -> Result<usize> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut inserted = 0;
        {
            let mut ins_idem = tx.prepare_cached(
                "INSERT OR IGNORE INTO idem (sender, client_id, seq) VALUES (?1, ?2, ?3)",
            )?;
            let mut ins_mail = tx.prepare_cached(
                "INSERT INTO mailbox (recipient, seq, record) VALUES (?1, ?2, ?3)",
            )?;
            let mut bump = tx.prepare_cached(
                "INSERT INTO depth (recipient, n) VALUES (?1, ?2)
                 ON CONFLICT (recipient) DO UPDATE SET n = n + excluded.n",
            )?;
            let mut recipients = Vec::with_capacity(msgs.len());
            for m in msgs {
                // The idempotency insert doubles as the duplicate check.
                if ins_idem.execute(params![m.sender, &m.client_id[..], m.seq as i64])? == 0 {
                    continue;
                }
                ins_mail.execute(params![m.recipient, m.seq as i64, &m.record[..]])?;
                recipients.push(m.recipient);
                inserted += 1;
            }
            for (r, n) in crate::store::depth_deltas(recipients.into_iter()) {
                bump.execute(params![r, n as i64])?;
            }
        }
        tx.commit()?;
        Ok(inserted)
    }

    fn delete(&mut self, keys: &[(u32, u64)]) -> Result<()> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut del =
                tx.prepare_cached("DELETE FROM mailbox WHERE recipient = ?1 AND seq = ?2")?;
            let mut dec =
                tx.prepare_cached("UPDATE depth SET n = max(n - ?2, 0) WHERE recipient = ?1")?;
            let mut removed = Vec::with_capacity(keys.len());
            for &(r, seq) in keys {
                if del.execute(params![r, seq as i64])? == 1 {
                    removed.push(r);
                }
            }
            for (r, n) in crate::store::depth_deltas(removed.into_iter()) {
                dec.execute(params![r, n as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn scan(&mut self, recipient: u32) -> Result<ScanResult> {
        // A read transaction so the mailbox and the counter come from one snapshot.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let mut res = ScanResult {
            ordered: true,
            ..Default::default()
        };
        {
            let mut sel = tx.prepare_cached(
                "SELECT seq, record FROM mailbox WHERE recipient = ?1 ORDER BY seq",
            )?;
            let mut rows = sel.query(params![recipient])?;
            let mut last = None;
            while let Some(row) = rows.next()? {
                let seq: i64 = row.get(0)?;
                let rec = row.get_ref(1)?.as_blob()?;
                fold_record(&mut res, &mut last, seq as u64, rec);
            }
            let mut get_depth = tx.prepare_cached("SELECT n FROM depth WHERE recipient = ?1")?;
            let d: Option<i64> = get_depth
                .query_row(params![recipient], |r| r.get(0))
                .optional()?;
            res.depth = d.unwrap_or(0) as u64;
        }
        tx.commit()?;
        Ok(res)
    }

    fn close(self) -> Result<()> {
        // The last connection to close checkpoints the WAL into the database file.
        self.conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }
}
