//! Message routing: from a committed message and its recipient's coordinates to the
//! connections that should see it now.

use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use crate::ids::{Coordinate, MessageId, UserId};
use crate::message::SharedMessage;
use crate::store::CommitListener;

/// What became of one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued for the connection (or handed to the next hop toward it).
    Queued,
    /// The connection's queue is full. The connection has been told to catch up from the
    /// mailbox instead, so nothing is lost.
    Overflowed,
    /// The coordinate names a connection this router does not have (it just closed, or
    /// the coordinate is stale). The message stays in the mailbox.
    Gone,
    /// The coordinate is somewhere this router cannot reach.
    Unroutable,
}

/// Pushes messages toward coordinates without ever blocking: a push that cannot be queued
/// at once is dropped, because the message is already durable in the mailbox and the
/// connection will fetch it from there.
pub trait Router: Send + Sync + 'static {
    fn push(&self, to: &Coordinate, msg: &SharedMessage) -> PushOutcome;

    /// Tells the connection at `to` that these messages it sent were delivered. Receipts
    /// are best effort: one that cannot be queued at once is dropped.
    fn push_receipt(&self, to: &Coordinate, ids: &Arc<[MessageId]>) -> PushOutcome {
        let _ = (to, ids);
        PushOutcome::Unroutable
    }
}

/// Counts of push outcomes, for metrics.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    pub queued: AtomicU64,
    pub overflowed: AtomicU64,
    pub gone: AtomicU64,
    pub unroutable: AtomicU64,
    /// Delivery receipts queued for senders' connections.
    pub receipts: AtomicU64,
}

/// The messaging core's half of "store, then deliver": every committed message is pushed
/// to every coordinate its recipient has. Plugged into the store as its
/// [`CommitListener`].
pub struct Delivery<R> {
    router: R,
    stats: std::sync::Arc<DeliveryStats>,
}

impl<R: Router> Delivery<R> {
    pub fn new(router: R) -> Self {
        Self {
            router,
            stats: Default::default(),
        }
    }

    pub fn stats(&self) -> std::sync::Arc<DeliveryStats> {
        self.stats.clone()
    }

    pub fn router(&self) -> &R {
        &self.router
    }
}

impl<R: Router> CommitListener for Delivery<R> {
    fn committed(&self, msg: &SharedMessage, online: &[Coordinate]) {
        for coordinate in online {
            let counter = match self.router.push(coordinate, msg) {
                PushOutcome::Queued => &self.stats.queued,
                PushOutcome::Overflowed => &self.stats.overflowed,
                PushOutcome::Gone => &self.stats.gone,
                PushOutcome::Unroutable => &self.stats.unroutable,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn delivered(&self, _from: &UserId, ids: &[MessageId], online: &[Coordinate]) {
        if online.is_empty() {
            return;
        }
        let ids: Arc<[MessageId]> = ids.into();
        for coordinate in online {
            if self.router.push_receipt(coordinate, &ids) == PushOutcome::Queued {
                self.stats.receipts.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl<R: Router> Router for std::sync::Arc<R> {
    fn push(&self, to: &Coordinate, msg: &SharedMessage) -> PushOutcome {
        (**self).push(to, msg)
    }

    fn push_receipt(&self, to: &Coordinate, ids: &Arc<[MessageId]>) -> PushOutcome {
        (**self).push_receipt(to, ids)
    }
}
