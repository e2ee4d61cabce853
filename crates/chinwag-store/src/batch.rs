//! One commit group's writes: a fjall write batch and the journal record that makes it
//! durable, built together so that they cannot disagree.

use fjall::OwnedWriteBatch;

use crate::Tables;
use crate::journal::{Ks, Record};
use crate::schema::MessageRecord;

pub struct Batch {
    tables: Tables,
    pub fjall: OwnedWriteBatch,
    pub record: Record,
}

impl Batch {
    /// A batch whose journal record is built in `buffer` (see [`Record::reusing`]).
    pub fn new(tables: &Tables, buffer: Vec<u8>) -> Self {
        Self {
            fjall: tables.db.batch(),
            tables: tables.clone(),
            record: Record::reusing(buffer),
        }
    }

    pub fn insert(&mut self, keyspace: Ks, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let (key, value) = (key.as_ref(), value.as_ref());
        self.record.push(keyspace, key, Some(value));
        self.fjall.insert(self.tables.get(keyspace), key, value);
    }

    pub fn remove(&mut self, keyspace: Ks, key: impl AsRef<[u8]>) {
        let key = key.as_ref();
        self.record.push(keyspace, key, None);
        self.fjall.remove(self.tables.get(keyspace), key);
    }

    /// A write fjall receives later, in bulk (see [`crate::deferred`]).
    pub fn journal_only(&mut self, keyspace: Ks, key: &[u8], value: Option<&[u8]>) {
        self.record.push(keyspace, key, value);
    }

    /// [`Batch::journal_only`] of a value encoded straight into the record, without a
    /// buffer of its own: one per message for its receipt.
    pub fn journal_only_encoded(&mut self, keyspace: Ks, key: &[u8], value: &impl serde::Serialize) {
        self.record.push_encoded(keyspace, key, value);
    }

    /// A new message, journaled but kept out of fjall until a checkpoint finds it still
    /// unacknowledged (the writer keeps it in memory meanwhile).
    pub fn insert_held(&mut self, mailbox_key: &[u8], record: &MessageRecord) {
        self.record.push_encoded(Ks::Mailbox, mailbox_key, record);
    }

    /// Deletes a message that never reached fjall.
    pub fn remove_held(&mut self, mailbox_key: &[u8]) {
        self.record.push(Ks::Mailbox, mailbox_key, None);
    }
}
