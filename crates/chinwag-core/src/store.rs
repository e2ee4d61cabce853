//! The one interface the messaging core has to storage.
//!
//! The core is written as if there were a single, central store. Whether the
//! implementation is an embedded file, a DC-local cluster, or a store whose writes also feed
//! replication to other DCs is invisible from here; that is what lets multi-DC operation be
//! added without touching the messaging code.

use std::future::Future;

use crate::ids::{Coordinate, MessageId, UserId};
use crate::message::{NewMessage, Receipt, SharedMessage};

/// Why a store operation failed. Every variant means nothing was changed: an operation
/// either commits completely or not at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The recipient's mailbox holds its configured maximum of unacknowledged messages.
    #[error("mailbox of {user} is full ({limit} messages)")]
    MailboxFull { user: UserId, limit: u64 },
    /// The storage medium failed (I/O error, disk full). Retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store has been shut down.
    #[error("store is closed")]
    Closed,
    /// A numbered send too far below the highest its device has sent for the store to
    /// tell whether it was accepted (see [`crate::DeviceSeq`]).
    #[error(
        "seq {seq} is {window} or more below {highest}, the highest this device sent; the store no longer knows whether it was accepted"
    )]
    SeqTooOld { seq: u64, highest: u64, window: u64 },
}

/// Storage of mailboxes and coordinates.
///
/// # Contract
/// - `append` returns only once the message is durable. It assigns the message a mailbox
///   `seq` greater than any seq assigned before, and is idempotent on `(from, client_id)`,
///   or for a numbered send on `(from, device, seq)`: a repeat returns the first receipt
///   with `duplicate = true` and stores nothing.
/// - An append takes its place in the commit order when `append` is *called*, not when
///   its future is first polled: appends called one after another commit in that order.
///   This is what keeps one sender's pipelined messages in order.
/// - After an append commits and before it returns, the store hands the message to its
///   [`CommitListener`], together with the recipient's coordinates, in commit (seq)
///   order. Listener calls for one store never overlap.
/// - `scan` reads a consistent snapshot: if it returns a message with seq `s`, every
///   message of that mailbox committed before it with a seq below `s` and not yet acknowledged
///   is returned too (or lies before `after`).
/// - `ack` deletes messages for good; a deleted message is never returned again.
pub trait Store: Send + Sync + 'static {
    fn append(&self, msg: NewMessage) -> impl Future<Output = Result<Receipt, StoreError>> + Send;

    /// Messages of `user`'s mailbox with seq greater than `after`, oldest first, at most
    /// `limit` of them.
    fn scan(
        &self,
        user: UserId,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<SharedMessage>, StoreError>> + Send;

    /// Removes the messages with these seqs from `user`'s mailbox. Seqs that are not there
    /// (already acknowledged, or never existed) are ignored.
    fn ack(&self, user: UserId, seqs: Vec<u64>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that `user` is online at `at`.
    fn add_coordinate(&self, user: UserId, at: Coordinate) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets one coordinate of `user`; a no-op if it is not there.
    fn remove_coordinate(&self, user: UserId, at: Coordinate) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Where `user` is online right now. Served from memory: it sits on the delivery path
    /// of every message.
    fn coordinates(&self, user: &UserId) -> Vec<Coordinate>;

    /// Why the store cannot currently write, if it cannot (a full disk, an I/O error):
    /// what a health check reports.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Receives every message the store commits, in commit order, with the coordinates of its
/// recipient at that moment. This is how "store, then deliver" is wired without the store
/// knowing about connections: the messaging core implements it with a [`crate::Router`].
pub trait CommitListener: Send + Sync + 'static {
    fn committed(&self, msg: &SharedMessage, online: &[Coordinate]);

    /// A device of each message's recipient acknowledged these messages of `from` (here,
    /// or in another DC whose acknowledgement this store has now applied); `online` is
    /// where `from` is connected. For delivery receipts, which are best effort.
    fn delivered(&self, from: &UserId, ids: &[MessageId], online: &[Coordinate]) {
        let _ = (from, ids, online);
    }
}
