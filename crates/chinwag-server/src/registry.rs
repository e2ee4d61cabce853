//! The connections of this node, and the [`Router`] that pushes messages to them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chinwag_core::{Coordinate, DcName, MessageId, NodeName, PushOutcome, Router, SharedMessage};
use tokio::sync::{Notify, mpsc};

/// What a connection's task holds to receive pushes.
/// What the router hands a connection.
pub enum Push {
    Message(SharedMessage),
    /// Messages this connection's user sent were delivered. Boxed to keep `Push` two words:
    /// every connection's queue is allocated in blocks of slots of this size.
    Receipt(Box<Arc<[MessageId]>>),
}

pub struct Inbox {
    pub messages: mpsc::Receiver<Push>,
    pub signal: Arc<DropSignal>,
}

/// Set when a push to a connection had to be dropped because its queue was full; the
/// connection then reads its mailbox instead. `notify` wakes it even if no further push
/// ever comes.
#[derive(Default)]
pub struct DropSignal {
    dropped: AtomicBool,
    pub notify: Notify,
}

impl DropSignal {
    /// Takes the flag. A push dequeued after a drop always sees the flag: the router sets
    /// it before queueing anything else.
    pub fn take(&self) -> bool {
        self.dropped.swap(false, Ordering::AcqRel)
    }

    fn raise(&self) {
        self.dropped.store(true, Ordering::Release);
        self.notify.notify_one();
    }
}

struct Entry {
    queue: mpsc::Sender<Push>,
    signal: Arc<DropSignal>,
    /// The client asked for `delivered` receipts: only then is a receipt worth a wake-up.
    receipts: AtomicBool,
}

/// This node's connection table: coordinate → push queue.
pub struct Registry {
    dc: DcName,
    node: NodeName,
    /// Set once the store has begun this node's incarnation, before any connection opens.
    incarnation: AtomicU64,
    next_conn: AtomicU64,
    queue_len: usize,
    conns: RwLock<HashMap<u64, Entry>>,
}

impl Registry {
    pub fn new(dc: DcName, node: NodeName, queue_len: usize) -> Self {
        assert!(queue_len > 0);
        Self {
            dc,
            node,
            incarnation: AtomicU64::new(0),
            next_conn: AtomicU64::new(1),
            queue_len,
            conns: RwLock::new(HashMap::new()),
        }
    }

    pub fn set_incarnation(&self, incarnation: u64) {
        assert!(incarnation > 0, "incarnations start at 1");
        self.incarnation.store(incarnation, Ordering::Release);
    }

    fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Adds a connection and returns its coordinate and inbox. The coordinate is routable
    /// as soon as this returns; the store learns of it separately, at login.
    pub fn open(&self) -> (Coordinate, Inbox) {
        let incarnation = self.incarnation();
        assert!(incarnation > 0, "connection opened before the node's incarnation began");
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (queue, messages) = mpsc::channel(self.queue_len);
        let signal = Arc::new(DropSignal::default());
        let entry = Entry {
            queue,
            signal: signal.clone(),
            receipts: AtomicBool::new(false),
        };
        self.conns.write().expect("registry lock").insert(conn, entry);
        let coordinate = Coordinate {
            dc: self.dc.clone(),
            node: self.node.clone(),
            incarnation,
            conn,
        };
        (coordinate, Inbox { messages, signal })
    }

    /// Records whether the connection at `coordinate` wants `delivered` receipts.
    pub fn set_receipts(&self, coordinate: &Coordinate, wanted: bool) {
        if let Some(entry) = self.conns.read().expect("registry lock").get(&coordinate.conn) {
            entry.receipts.store(wanted, Ordering::Relaxed);
        }
    }

    pub fn close(&self, coordinate: &Coordinate) {
        self.conns.write().expect("registry lock").remove(&coordinate.conn);
    }

    pub fn len(&self) -> usize {
        self.conns.read().expect("registry lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_mine(&self, c: &Coordinate) -> bool {
        c.dc == self.dc && c.node == self.node
    }
}

impl Router for Registry {
    fn push(&self, to: &Coordinate, msg: &SharedMessage) -> PushOutcome {
        if !self.is_mine(to) {
            return PushOutcome::Unroutable;
        }
        if to.incarnation != self.incarnation() {
            return PushOutcome::Gone;
        }
        let conns = self.conns.read().expect("registry lock");
        let Some(entry) = conns.get(&to.conn) else {
            return PushOutcome::Gone;
        };
        match entry.queue.try_send(Push::Message(msg.clone())) {
            Ok(()) => PushOutcome::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                entry.signal.raise();
                PushOutcome::Overflowed
            }
            Err(mpsc::error::TrySendError::Closed(_)) => PushOutcome::Gone,
        }
    }

    fn push_receipt(&self, to: &Coordinate, ids: &Arc<[MessageId]>) -> PushOutcome {
        if !self.is_mine(to) {
            return PushOutcome::Unroutable;
        }
        let conns = self.conns.read().expect("registry lock");
        let Some(entry) = conns.get(&to.conn).filter(|_| to.incarnation == self.incarnation()) else {
            return PushOutcome::Gone;
        };
        if !entry.receipts.load(Ordering::Relaxed) {
            // Not asked for: delivered to no one, like a receipt that finds no connection.
            return PushOutcome::Gone;
        }
        // A receipt that does not fit is dropped: unlike a message, nothing depends on it.
        match entry.queue.try_send(Push::Receipt(Box::new(ids.clone()))) {
            Ok(()) => PushOutcome::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => PushOutcome::Overflowed,
            Err(mpsc::error::TrySendError::Closed(_)) => PushOutcome::Gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use chinwag_core::{ClientMsgId, Message, UserId};

    use super::*;

    fn msg(seq: u64) -> SharedMessage {
        Arc::new(Message {
            id: MessageId {
                origin: DcName::parse("local").unwrap(),
                epoch: chinwag_core::Epoch(1),
                seq,
            },
            seq,
            from: UserId::parse("a").unwrap(),
            to: UserId::parse("b").unwrap(),
            client_id: ClientMsgId::parse("c").unwrap(),
            text: String::new(),
            at_ms: 0,
        })
    }

    fn registry() -> Registry {
        let r = Registry::new(DcName::parse("local").unwrap(), NodeName::parse("n1").unwrap(), 2);
        r.set_incarnation(3);
        r
    }

    #[test]
    fn pushes_queue_then_overflow_with_a_signal() {
        let r = registry();
        let (c, mut inbox) = r.open();
        assert_eq!(r.push(&c, &msg(1)), PushOutcome::Queued);
        assert_eq!(r.push(&c, &msg(2)), PushOutcome::Queued);
        assert_eq!(r.push(&c, &msg(3)), PushOutcome::Overflowed);
        assert!(inbox.signal.take());
        assert!(!inbox.signal.take());
        assert!(matches!(inbox.messages.try_recv().unwrap(), Push::Message(m) if m.seq == 1));
    }

    #[test]
    fn stale_and_foreign_coordinates_are_not_delivered() {
        let r = registry();
        let (c, _inbox) = r.open();
        let old = Coordinate {
            incarnation: 2,
            ..c.clone()
        };
        assert_eq!(r.push(&old, &msg(1)), PushOutcome::Gone);
        let elsewhere = Coordinate {
            dc: DcName::parse("west").unwrap(),
            ..c.clone()
        };
        assert_eq!(r.push(&elsewhere, &msg(1)), PushOutcome::Unroutable);
        r.close(&c);
        assert_eq!(r.push(&c, &msg(1)), PushOutcome::Gone);
        assert!(r.is_empty());
    }
}
