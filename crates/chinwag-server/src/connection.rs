//! The driver of one client connection: it carries a [`Session`]'s outputs to the
//! WebSocket and the store, and feeds back what happens. All protocol decisions are the
//! session's; this file only does I/O.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use chinwag_core::{ClientMsgId, Coordinate, Output, Receipt, Session, SharedMessage, Store, StoreError};
use chinwag_proto::ServerFrame;
use futures_util::stream::{FuturesOrdered, FuturesUnordered};
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::time::error::Elapsed;
use tokio::time::{Instant, Sleep};

use crate::node::NodeState;
use crate::registry::{Delivery, Inbox, Push};

/// Wall-clock Unix milliseconds: what tokens and message timestamps are measured in.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// A store operation other than an append, finished.
enum Done {
    Joined(Result<(), StoreError>),
    Scanned(Result<Vec<SharedMessage>, StoreError>, usize),
    Acked(Vec<String>, Result<(), StoreError>),
}

type Pending<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Why the connection loop ended; only for the log.
#[derive(Debug)]
enum End {
    ClientClosed,
    SessionClosed,
    Shutdown,
    SlowClient,
    Transport(String),
}

pub async fn serve<S: Store>(node: Arc<NodeState<S>>, socket: Box<WebSocket>, peer: SocketAddr) {
    let (coordinate, inbox) = node.registry.open();
    let mut session = Session::new(node.limits.clone(), node.auth.clone(), coordinate.clone(), now_ms())
        .with_user_buckets(node.user_buckets.clone());
    let end = Driver {
        node: &node,
        session: &mut session,
        inbox,
        socket,
    }
    .run()
    .await;
    node.registry.close(&coordinate);
    match &end {
        End::Transport(error) => {
            tracing::debug!(user = ?session.user(), conn = coordinate.conn, %peer, %error, "connection lost")
        }
        _ => {
            tracing::debug!(user = ?session.user(), conn = coordinate.conn, %peer, ?end, "connection closed")
        }
    }
    if let Some(user) = session.user() {
        forget(&node, user.clone(), coordinate).await;
    }
}

async fn forget<S: Store>(node: &NodeState<S>, user: chinwag_core::UserId, at: Coordinate) {
    if let Err(e) = node.store.remove_coordinate(user, at).await {
        // The coordinate names a closed connection; pushes to it report `Gone` and the
        // next start of this node removes it.
        tracing::warn!(error = %e, "could not remove a coordinate");
    }
}

struct Driver<'a, S> {
    node: &'a Arc<NodeState<S>>,
    session: &'a mut Session,
    inbox: Inbox,
    socket: Box<WebSocket>,
}

/// Most events handled between two flushes of the socket. Under load, answering several
/// events with one write saves a system call and a packet each; when idle, there is only
/// ever one event ready and nothing waits.
const COALESCE_MAX: usize = 64;

type Appends = FuturesOrdered<Pending<(ClientMsgId, Result<Receipt, StoreError>)>>;
type Ops = FuturesUnordered<Pending<Done>>;

/// Something that happened to the connection.
enum Event {
    Frame(Option<Result<WsMessage, axum::Error>>),
    Appended(ClientMsgId, Result<Receipt, StoreError>),
    Done(Done),
    Delivery(Delivery),
    Timeout,
}

impl<S: Store> Driver<'_, S> {
    async fn run(mut self) -> End {
        let mut appends = Appends::new();
        let mut ops = Ops::new();
        // The session's deadline (login, ping, idle) moves later with every frame heard.
        // Re-arming a timer on every event would touch the runtime's timer wheel each
        // time; instead the timer is moved only when the deadline comes earlier, and
        // when it fires early the session finds nothing due and it is armed again.
        let timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            match self.flush_in_time(&mut appends, &mut ops).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return End::Transport(e.to_string()),
                Err(_) => {
                    self.node.metrics.slow_clients.inc();
                    return End::SlowClient;
                }
            }
            if self.session.is_closed() {
                return End::SessionClosed;
            }
            let deadline = self.session.poll_timeout().map(deadline_instant);
            if let Some(at) = deadline
                && armed.is_none_or(|armed| at + TIMER_SLACK < armed)
            {
                timer.as_mut().reset(at);
                armed = Some(at);
            }
            let timer = deadline.map(|_| timer.as_mut());
            let next = self.next_event(&mut appends, &mut ops, timer).await;
            if matches!(next, Event::Timeout) {
                armed = None;
            }
            let mut event = Some(next);
            let mut handled = 0;
            while let Some(this) = event.take() {
                if let Some(end) = self.handle(this).await {
                    return end;
                }
                handled += 1;
                // An event taken from its source must be handled: only look for another
                // while there is room to handle it.
                if handled < COALESCE_MAX && !self.session.is_closed() {
                    event = self.ready_event(&mut appends, &mut ops);
                }
            }
        }
    }

    /// Waits for the next event.
    async fn next_event(&mut self, appends: &mut Appends, ops: &mut Ops, timer: Option<Pin<&mut Sleep>>) -> Event {
        let wants_input = self.session.wants_input();
        tokio::select! {
            frame = self.socket.recv(), if wants_input => Event::Frame(frame),
            // Not polled when empty: an empty `FuturesUnordered` still registers the waker.
            Some((client_id, result)) = appends.next(), if !appends.is_empty() => Event::Appended(client_id, result),
            Some(done) = ops.next(), if !ops.is_empty() => Event::Done(done),
            delivery = self.inbox.recv() => Event::Delivery(delivery),
            () = expires(timer) => Event::Timeout,
        }
    }

    /// An event that is ready now, if any, without waiting. Store answers and pushes come
    /// first: they only ever let the client make progress.
    fn ready_event(&mut self, appends: &mut Appends, ops: &mut Ops) -> Option<Event> {
        if !appends.is_empty()
            && let Some(Some((client_id, result))) = appends.next().now_or_never()
        {
            return Some(Event::Appended(client_id, result));
        }
        if !ops.is_empty()
            && let Some(Some(done)) = ops.next().now_or_never()
        {
            return Some(Event::Done(done));
        }
        match self.inbox.try_recv() {
            // Stays in the inbox: the wait after this batch's frames are written takes it,
            // so the connection closes with nothing it has produced left unsent.
            Some(Delivery::ShuttingDown) => return None,
            Some(delivery) => return Some(Event::Delivery(delivery)),
            None => {}
        }
        if self.session.wants_input() {
            return self.socket.recv().now_or_never().map(Event::Frame);
        }
        None
    }

    /// Feeds one event to the session; `Some` ends the connection.
    async fn handle(&mut self, event: Event) -> Option<End> {
        match event {
            Event::Frame(frame) => match frame {
                Some(Ok(WsMessage::Text(text))) => self.session.on_text(text.as_str(), now_ms()),
                Some(Ok(WsMessage::Binary(_))) => {
                    self.session.on_heard(now_ms());
                    self.session.on_binary();
                }
                // The WebSocket library answers pings itself; either way the client is alive.
                Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => self.session.on_heard(now_ms()),
                Some(Ok(WsMessage::Close(_))) | None => return Some(End::ClientClosed),
                Some(Err(e)) if is_oversized(&e) => self.session.on_oversized(),
                Some(Err(e)) => return Some(End::Transport(e.to_string())),
            },
            Event::Appended(client_id, result) => {
                if matches!(&result, Ok(r) if !r.duplicate) {
                    self.node.metrics.messages_in.inc();
                }
                self.session.on_appended(&client_id, result);
            }
            Event::Done(done) => match done {
                Done::Joined(result) => {
                    if result.is_ok() {
                        self.node.metrics.logins.inc();
                    }
                    self.session.on_joined(result);
                }
                Done::Scanned(result, limit) => self.session.on_scanned(result, limit),
                Done::Acked(ids, result) => self.session.on_acked(ids, result),
            },
            Event::Delivery(Delivery::Push(Push::Message(msg))) => self.session.on_push(msg),
            Event::Delivery(Delivery::Push(Push::Receipt(ids))) => self.session.on_delivered(&ids),
            Event::Delivery(Delivery::Dropped) => self.session.on_push_dropped(),
            Event::Timeout => self.session.on_timeout(now_ms()),
            Event::Delivery(Delivery::ShuttingDown) => {
                let _ = self.close(1001, "server shutting down").await;
                return Some(End::Shutdown);
            }
        }
        None
    }

    /// [`Self::flush_outputs`] within the send timeout. A client that does not read fills
    /// its socket and then this write; rather than hold its frames, the connection is
    /// dropped. Its messages stay in the mailbox. The timer is started only if the write
    /// cannot finish at once: nearly every one can, and a timer costs a clock read and a
    /// handle to the runtime's timer for every event.
    async fn flush_in_time(
        &mut self,
        appends: &mut Appends,
        ops: &mut Ops,
    ) -> Result<Result<(), axum::Error>, Elapsed> {
        let timeout = self.node.config.limits.send_timeout;
        let mut flush = std::pin::pin!(self.flush_outputs(appends, ops));
        match std::future::poll_fn(|cx| Poll::Ready(flush.as_mut().poll(cx))).await {
            Poll::Ready(flushed) => Ok(flushed),
            Poll::Pending => tokio::time::timeout(timeout, flush).await,
        }
    }

    /// Carries out everything the session asked for, then flushes the socket once.
    async fn flush_outputs(&mut self, appends: &mut Appends, ops: &mut Ops) -> Result<(), axum::Error> {
        let mut wrote = false;
        // One `feed` await for every kind of frame, and the rare close boxed: each await
        // point's state is part of every connection's task, idle or not.
        while let Some(output) = self.session.poll_output() {
            let store = self.node.store.clone();
            let message = match output {
                Output::Frame(frame) => {
                    if let ServerFrame::Error { code, .. } = &frame {
                        self.node.metrics.error(*code);
                    }
                    text(chinwag_proto::encode_server(&frame))
                }
                Output::Deliver(msg) => {
                    self.node.metrics.messages_out.inc();
                    text(msg.encode_frame())
                }
                Output::Ping => WsMessage::Ping(Default::default()),
                Output::Close { code, reason } => return Box::pin(self.close(code, reason)).await,
                Output::Join { user } => {
                    let at = self.session.coordinate().clone();
                    self.node.registry.set_receipts(&at, self.session.wants_receipts());
                    ops.push(Box::pin(
                        async move { Done::Joined(store.add_coordinate(user, at).await) },
                    ));
                    continue;
                }
                Output::Append(new) => {
                    let client_id = new.client_id.clone();
                    appends.push_back(Box::pin(async move { (client_id, store.append(new).await) }));
                    continue;
                }
                Output::Scan { user, after, limit } => {
                    ops.push(Box::pin(async move {
                        Done::Scanned(store.scan(user, after, limit).await, limit)
                    }));
                    continue;
                }
                Output::Ack { user, seqs, ids } => {
                    ops.push(Box::pin(async move { Done::Acked(ids, store.ack(user, seqs).await) }));
                    continue;
                }
            };
            self.socket.feed(message).await?;
            wrote = true;
        }
        if wrote {
            self.socket.flush().await?;
        }
        Ok(())
    }

    async fn close(&mut self, code: u16, reason: &'static str) -> Result<(), axum::Error> {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        self.socket.send(WsMessage::Close(Some(frame))).await
    }
}

fn text(s: String) -> WsMessage {
    WsMessage::Text(Utf8Bytes::from(s))
}

fn deadline_instant(deadline_ms: u64) -> Instant {
    let wait = deadline_ms.saturating_sub(now_ms());
    Instant::now() + std::time::Duration::from_millis(wait)
}

/// How much earlier a deadline must come to move the timer: deadlines are computed in
/// milliseconds from the wall clock, so the same one varies a little between calls.
const TIMER_SLACK: std::time::Duration = std::time::Duration::from_millis(5);

async fn expires(timer: Option<Pin<&mut Sleep>>) {
    match timer {
        Some(timer) => timer.await,
        None => std::future::pending().await,
    }
}

/// Whether the transport refused a frame for exceeding the configured size.
fn is_oversized(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(Error::Capacity(_)) = err.downcast_ref::<Error>() {
            return true;
        }
        source = err.source();
    }
    false
}
