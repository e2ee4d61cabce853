//! The connections of this node, and the [`Router`] that pushes messages to them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;

use chinwag_core::{Coordinate, DcName, MessageId, NodeName, PushOutcome, Router, SharedMessage};
use futures_util::task::AtomicWaker;

/// What the router hands a connection.
pub enum Push {
    Message(SharedMessage),
    /// Messages this connection's user sent were delivered.
    Receipt(Arc<[MessageId]>),
}

/// What a connection takes from its inbox.
pub enum Delivery {
    Push(Push),
    /// A push had to be dropped because the inbox was full: the connection reads its
    /// mailbox instead. Taken before any push queued after the drop.
    Dropped,
    /// The node is shutting down: the connection closes. Taken before anything else, and
    /// again at every look.
    ShuttingDown,
}

/// One connection's pushes, bounded. A tokio channel would allocate a block of slots
/// for every connection, idle or not; this queue holds memory only while it holds pushes.
/// One task reads it, so a single waker will do: a connection waits on its inbox
/// whenever it waits for events, and registering the same waker again is a compare and
/// two atomic swaps, where a `Notify` takes and releases its lock twice.
#[derive(Default)]
struct Queue {
    state: Mutex<QueueState>,
    ready: AtomicWaker,
}

#[derive(Default)]
struct QueueState {
    pushes: VecDeque<Push>,
    dropped: bool,
    /// The connection's task has let go of its inbox.
    closed: bool,
    shutting_down: bool,
}

/// Capacity an emptied queue may keep; a burst's larger buffer is given back.
const QUEUE_KEEP: usize = 8;

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().expect("inbox lock")
    }

    /// Queues `push` unless the queue is closed or full; when full, a message (but not a
    /// receipt, which nothing depends on) leaves the drop flag raised.
    fn offer(&self, push: Push, limit: usize) -> PushOutcome {
        let mut state = self.lock();
        if state.closed {
            return PushOutcome::Gone;
        }
        if state.pushes.len() >= limit {
            if matches!(push, Push::Message(_)) {
                state.dropped = true;
                drop(state);
                self.ready.wake();
            }
            return PushOutcome::Overflowed;
        }
        state.pushes.push_back(push);
        drop(state);
        self.ready.wake();
        PushOutcome::Queued
    }

    fn shut_down(&self) {
        self.lock().shutting_down = true;
        self.ready.wake();
    }
}

/// The receiving end of a connection's pushes.
pub struct Inbox {
    queue: Arc<Queue>,
}

impl Inbox {
    pub fn try_recv(&self) -> Option<Delivery> {
        let mut state = self.queue.lock();
        if state.shutting_down {
            return Some(Delivery::ShuttingDown);
        }
        if std::mem::take(&mut state.dropped) {
            return Some(Delivery::Dropped);
        }
        let push = state.pushes.pop_front()?;
        if state.pushes.is_empty() && state.pushes.capacity() > QUEUE_KEEP {
            state.pushes = VecDeque::new();
        }
        Some(Delivery::Push(push))
    }

    /// Waits for the next delivery. Cancel-safe: nothing is taken until it is returned.
    pub async fn recv(&self) -> Delivery {
        std::future::poll_fn(|cx| {
            // Registered before the look below, so a push made after the look wakes us.
            self.queue.ready.register(cx.waker());
            self.try_recv().map_or(Poll::Pending, Poll::Ready)
        })
        .await
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.closed = true;
        state.pushes.clear();
    }
}

struct Entry {
    queue: Arc<Queue>,
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
    /// Set under the write lock of `conns`, so a connection opened as the node stops is
    /// either told by [`Registry::shut_down`] or sees this when it opens.
    shutting_down: AtomicBool,
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
            shutting_down: AtomicBool::new(false),
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
        let queue = Arc::new(Queue::default());
        let entry = Entry {
            queue: queue.clone(),
            receipts: AtomicBool::new(false),
        };
        let mut conns = self.conns.write().expect("registry lock");
        conns.insert(conn, entry);
        if self.shutting_down.load(Ordering::Relaxed) {
            queue.shut_down();
        }
        drop(conns);
        let coordinate = Coordinate {
            dc: self.dc.clone(),
            node: self.node.clone(),
            incarnation,
            conn,
        };
        (coordinate, Inbox { queue })
    }

    /// Records whether the connection at `coordinate` wants `delivered` receipts.
    pub fn set_receipts(&self, coordinate: &Coordinate, wanted: bool) {
        if let Some(entry) = self.conns.read().expect("registry lock").get(&coordinate.conn) {
            entry.receipts.store(wanted, Ordering::Relaxed);
        }
    }

    /// Tells every connection, open now or opened from now on, to close. Through the
    /// inbox each already waits on, rather than a signal of its own: a connection waits
    /// on every event, and one more thing to wait on costs it a lock every time.
    pub fn shut_down(&self) {
        let conns = self.conns.write().expect("registry lock");
        self.shutting_down.store(true, Ordering::Relaxed);
        for entry in conns.values() {
            entry.queue.shut_down();
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
        entry.queue.offer(Push::Message(msg.clone()), self.queue_len)
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
        entry.queue.offer(Push::Receipt(ids.clone()), self.queue_len)
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
        let (c, inbox) = r.open();
        assert_eq!(r.push(&c, &msg(1)), PushOutcome::Queued);
        assert_eq!(r.push(&c, &msg(2)), PushOutcome::Queued);
        assert_eq!(r.push(&c, &msg(3)), PushOutcome::Overflowed);
        assert!(matches!(inbox.try_recv(), Some(Delivery::Dropped)));
        assert!(matches!(inbox.try_recv(), Some(Delivery::Push(Push::Message(m))) if m.seq == 1));
        assert!(matches!(inbox.try_recv(), Some(Delivery::Push(Push::Message(m))) if m.seq == 2));
        assert!(inbox.try_recv().is_none());
        assert_eq!(r.push(&c, &msg(4)), PushOutcome::Queued);
    }

    #[tokio::test]
    async fn a_waiting_connection_is_woken_and_a_closed_one_is_gone() {
        let r = registry();
        let (c, inbox) = r.open();
        let waiting = tokio::spawn(async move {
            let delivery = inbox.recv().await;
            (
                matches!(delivery, Delivery::Push(Push::Message(m)) if m.seq == 7),
                inbox,
            )
        });
        tokio::task::yield_now().await;
        assert_eq!(r.push(&c, &msg(7)), PushOutcome::Queued);
        let (woken, inbox) = waiting.await.unwrap();
        assert!(woken);
        drop(inbox);
        // Still in the table until the connection's task closes it, but no longer queued.
        assert_eq!(r.push(&c, &msg(8)), PushOutcome::Gone);
    }

    #[tokio::test]
    async fn shutting_down_reaches_waiting_busy_and_later_connections_first() {
        let r = registry();
        let (_, waiting) = r.open();
        let (busy, queued) = r.open();
        assert_eq!(r.push(&busy, &msg(1)), PushOutcome::Queued);
        let waiting = tokio::spawn(async move { matches!(waiting.recv().await, Delivery::ShuttingDown) });
        tokio::task::yield_now().await;
        r.shut_down();
        assert!(waiting.await.unwrap());
        // Before the push queued earlier, and at every look: the connection closes.
        assert!(matches!(queued.try_recv(), Some(Delivery::ShuttingDown)));
        assert!(matches!(queued.try_recv(), Some(Delivery::ShuttingDown)));
        let (_, later) = r.open();
        assert!(matches!(later.try_recv(), Some(Delivery::ShuttingDown)));
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
