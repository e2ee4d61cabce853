//! The client session: protocol v1 as a sans-IO state machine.
//!
//! A [`Session`] is fed what happened — a text frame arrived, a store operation finished, a
//! message was pushed, time passed — and answers with [`Output`]s for its driver to carry
//! out: frames to write, store operations to start, the connection to close. It owns no
//! socket, no task and no clock, which is what lets the same logic run under the tokio
//! server, a deterministic simulation and property tests.
//!
//! # Delivery
//! The session delivers its user's mailbox in seq order and keeps a `cursor`: the highest
//! seq it has delivered. It never delivers a seq at or below the cursor, which is the whole
//! duplicate-suppression story on one connection, whichever way a message arrives.
//!
//! It is either *live* — caught up with the mailbox, taking pushed messages as they come —
//! or *catching up*, reading the mailbox from the cursor in pages. It falls back to catching
//! up whenever it cannot take a push in order: at login, while a page is outstanding, when
//! its window of unacknowledged messages is full, or when the router reports that a push
//! was dropped. Pushes are only ever an optimisation over reading the mailbox, so dropping
//! one loses nothing.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::sync::Arc;

use chinwag_proto::{ClientFrame, ErrorCode, Limits, PROTOCOL_VERSION, ServerFrame};

use crate::auth::{AuthError, Authenticate};
use crate::ids::{ClientMsgId, Coordinate, DeviceId, MessageId, UserId};
use crate::message::{DeviceSeq, NewMessage, Receipt, SharedMessage};
use crate::ratelimit::{TokenBucket, UserBuckets};
use crate::store::StoreError;

/// Per-connection limits. Validated by the server's config before a session sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest client frame; enforced by the transport, announced here.
    pub max_frame_bytes: usize,
    pub max_text_bytes: usize,
    /// Most ids in one `ack` frame.
    pub max_ack_ids: usize,
    /// Most messages delivered and not yet acknowledged on this connection.
    pub max_inflight: usize,
    /// Most sends waiting for the store; beyond this the driver stops reading the socket.
    pub max_pending_sends: usize,
    /// Most pushes held while a mailbox page is being read.
    pub push_buffer: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
    pub login_timeout_ms: u64,
    /// A logged-in client not heard from for this long is pinged...
    pub ping_interval_ms: u64,
    /// ...and closed once it has not been heard from for this long.
    pub idle_timeout_ms: u64,
    /// Sends per second for one user across all its connections on a node (with
    /// [`Session::with_user_buckets`]).
    pub user_rate_per_sec: u32,
    pub user_burst: u32,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_text_bytes: 16 * 1024,
            max_ack_ids: 1024,
            max_inflight: 1024,
            max_pending_sends: 256,
            push_buffer: 1024,
            rate_per_sec: 100,
            burst: 200,
            login_timeout_ms: 10_000,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 75_000,
            user_rate_per_sec: 200,
            user_burst: 400,
        }
    }
}

impl SessionLimits {
    fn announce(&self) -> Limits {
        Limits {
            max_frame_bytes: self.max_frame_bytes,
            max_text_bytes: self.max_text_bytes,
            max_ack_ids: self.max_ack_ids,
            max_inflight: self.max_inflight,
            rate_per_sec: self.rate_per_sec,
            burst: self.burst,
        }
    }
}

/// What the session asks its driver to do. Operations that take time are answered by the
/// matching `on_*` method.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Write this frame.
    Frame(ServerFrame),
    /// Write this message as a `message` frame (kept apart from `Frame` so the driver can
    /// encode it without copying the text).
    Deliver(SharedMessage),
    /// Close the connection with this WebSocket close code, after writing what came before.
    Close { code: u16, reason: &'static str },
    /// Make the connection routable for `user` (register it, store its coordinate), then
    /// call [`Session::on_joined`].
    Join { user: UserId },
    /// Append durably, then call [`Session::on_appended`]. Results must be fed back in the
    /// order the appends were asked for.
    Append(NewMessage),
    /// Send a WebSocket ping: the client has been quiet for a while.
    Ping,
    /// Read `user`'s mailbox after `after`, then call [`Session::on_scanned`].
    Scan { user: UserId, after: u64, limit: usize },
    /// Delete these messages from `user`'s mailbox, then call [`Session::on_acked`].
    Ack {
        user: UserId,
        seqs: Vec<u64>,
        ids: Vec<String>,
    },
}

#[derive(Debug)]
enum State {
    AwaitingLogin { deadline_ms: u64 },
    Open(Box<Open>),
    Closed,
}

#[derive(Debug)]
struct Open {
    user: UserId,
    joined: bool,
    /// Highest mailbox seq delivered on this connection.
    cursor: u64,
    /// Delivered, not yet acknowledged: id → seq.
    inflight: HashMap<MessageId, u64>,
    live: bool,
    scanning: bool,
    /// Pushes that arrived while a page was outstanding, in arrival (= seq) order.
    held: Vec<SharedMessage>,
    /// `held` overflowed during this page; the pushes it dropped must be read back.
    held_overflowed: bool,
    /// The client asked for `delivered` receipts at login.
    receipts: bool,
    /// The device named at login, whose sends may be numbered.
    device: Option<DeviceId>,
}

/// One client connection's protocol state.
pub struct Session {
    limits: Arc<SessionLimits>,
    auth: Arc<dyn Authenticate>,
    coordinate: Coordinate,
    bucket: TokenBucket,
    users: Option<Arc<UserBuckets>>,
    pending_sends: usize,
    state: State,
    /// When the client last sent anything at all, and whether it has been pinged since.
    last_heard_ms: u64,
    pinged: bool,
    out: VecDeque<Output>,
}

impl Session {
    pub fn new(limits: Arc<SessionLimits>, auth: Arc<dyn Authenticate>, coordinate: Coordinate, now_ms: u64) -> Self {
        let bucket = TokenBucket::new(limits.rate_per_sec, limits.burst, now_ms);
        let deadline_ms = now_ms.saturating_add(limits.login_timeout_ms);
        Self {
            limits,
            auth,
            coordinate,
            bucket,
            users: None,
            pending_sends: 0,
            state: State::AwaitingLogin { deadline_ms },
            last_heard_ms: now_ms,
            pinged: false,
            out: VecDeque::new(),
        }
    }

    /// Limits sends per user as well as per connection, with buckets shared by every
    /// session of the node.
    pub fn with_user_buckets(mut self, users: Arc<UserBuckets>) -> Self {
        self.users = Some(users);
        self
    }

    /// The next thing for the driver to do.
    pub fn poll_output(&mut self) -> Option<Output> {
        let output = self.out.pop_front();
        if output.is_none() {
            // Outputs are large and come in bursts: an idle session holds no queue (it
            // would be most of its memory), at the price of one allocation per burst.
            self.out = VecDeque::new();
        }
        output
    }

    /// Whether the client asked at login for `delivered` receipts. Routers may skip
    /// receipts for connections that did not: the session would drop them anyway.
    pub fn wants_receipts(&self) -> bool {
        matches!(&self.state, State::Open(open) if open.receipts)
    }

    /// When [`Session::on_timeout`] must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::AwaitingLogin { deadline_ms } => Some(deadline_ms),
            State::Open(_) if self.pinged => Some(self.last_heard_ms.saturating_add(self.limits.idle_timeout_ms)),
            State::Open(_) => Some(self.last_heard_ms.saturating_add(self.limits.ping_interval_ms)),
            State::Closed => None,
        }
    }

    /// Whether the driver should read the next client frame now. False while the
    /// connection is being made routable and while too many sends await the store: the
    /// socket then applies backpressure to the client instead of the server queueing.
    pub fn wants_input(&self) -> bool {
        match &self.state {
            State::AwaitingLogin { .. } => true,
            State::Open(open) => open.joined && self.pending_sends < self.limits.max_pending_sends,
            State::Closed => false,
        }
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&UserId> {
        match &self.state {
            State::Open(open) => Some(&open.user),
            _ => None,
        }
    }

    pub fn coordinate(&self) -> &Coordinate {
        &self.coordinate
    }

    /// Number of delivered, unacknowledged messages.
    pub fn inflight(&self) -> usize {
        match &self.state {
            State::Open(open) => open.inflight.len(),
            _ => 0,
        }
    }

    pub fn on_timeout(&mut self, now_ms: u64) {
        match self.state {
            State::AwaitingLogin { deadline_ms } if now_ms >= deadline_ms => {
                self.fail(ErrorCode::LoginTimeout, "no login within the login timeout".into());
            }
            State::Open(_) => {
                let quiet_ms = now_ms.saturating_sub(self.last_heard_ms);
                if quiet_ms >= self.limits.idle_timeout_ms {
                    let detail = format!("nothing heard from the client for {} ms", quiet_ms);
                    self.fail(ErrorCode::IdleTimeout, detail);
                } else if quiet_ms >= self.limits.ping_interval_ms && !self.pinged {
                    self.pinged = true;
                    self.out.push_back(Output::Ping);
                }
            }
            _ => {}
        }
    }

    /// Anything at all arrived from the client (a frame of any kind, a ping, a pong).
    pub fn on_heard(&mut self, now_ms: u64) {
        self.last_heard_ms = self.last_heard_ms.max(now_ms);
        self.pinged = false;
    }

    /// A text frame arrived.
    pub fn on_text(&mut self, text: &str, now_ms: u64) {
        if self.is_closed() {
            return;
        }
        self.on_heard(now_ms);
        let frame = match chinwag_proto::decode_client(text) {
            Ok(frame) => frame,
            Err(e) => return self.error(e.code, e.detail, None),
        };
        // Acks are exempt from the rate limit: they only ever shrink server state, and
        // throttling them would make a fast reader look abusive.
        if !matches!(frame, ClientFrame::Ack { .. })
            && let Err(retry_after_ms) = self.bucket.take(now_ms)
        {
            let client_id = match &frame {
                ClientFrame::Send { client_id, .. } => Some(client_id.clone()),
                _ => None,
            };
            self.out.push_back(Output::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message: format!(
                    "over {} frames/s (burst {}); frame dropped",
                    self.limits.rate_per_sec, self.limits.burst
                ),
                client_id,
                retry_after_ms: Some(retry_after_ms),
            }));
            return;
        }
        match frame {
            ClientFrame::Login {
                token,
                receipts,
                device,
            } => self.login(&token, receipts, device, now_ms),
            ClientFrame::Ping { nonce } => self.out.push_back(Output::Frame(ServerFrame::Pong { nonce })),
            ClientFrame::Send {
                to,
                client_id,
                text,
                seq,
            } => self.send(to, client_id, text, seq, now_ms),
            ClientFrame::Ack { ids } => self.ack(ids),
        }
    }

    /// A binary WebSocket message arrived; protocol v1 is text only.
    pub fn on_binary(&mut self) {
        self.error(ErrorCode::BinaryFrame, "protocol v1 uses text frames only".into(), None);
    }

    /// The transport refused a frame larger than `max_frame_bytes`.
    pub fn on_oversized(&mut self) {
        let limit = self.limits.max_frame_bytes;
        self.fail(ErrorCode::FrameTooLarge, format!("frames are limited to {limit} bytes"));
    }

    fn login(&mut self, token: &str, receipts: bool, device: Option<String>, now_ms: u64) {
        if !matches!(self.state, State::AwaitingLogin { .. }) {
            return self.error(ErrorCode::AlreadyAuthenticated, "already logged in".into(), None);
        }
        // Checked before the token, so a bad name costs no signature check; the
        // connection may log in again.
        let device = match device.as_deref().map(DeviceId::parse).transpose() {
            Ok(device) => device,
            Err(e) => return self.error(ErrorCode::BadDevice, format!("device {e}"), None),
        };
        let user = match self.auth.authenticate(token, now_ms) {
            Ok(user) => user,
            Err(AuthError::Expired) => {
                return self.fail(ErrorCode::TokenExpired, "token expired".into());
            }
            Err(AuthError::Invalid(why)) => return self.fail(ErrorCode::BadToken, why),
        };
        self.out.push_back(Output::Join { user: user.clone() });
        self.state = State::Open(Box::new(Open {
            user,
            joined: false,
            cursor: 0,
            inflight: HashMap::new(),
            live: false,
            // Pushes are held from now on: the first page is as good as outstanding.
            scanning: true,
            held: Vec::new(),
            held_overflowed: false,
            receipts,
            device,
        }));
    }

    /// The connection is routable (or could not be made so).
    pub fn on_joined(&mut self, result: Result<(), StoreError>) {
        let State::Open(open) = &mut self.state else {
            return;
        };
        if let Err(e) = result {
            return self.fail_unavailable(e);
        }
        open.joined = true;
        let welcome = ServerFrame::Welcome {
            protocol: PROTOCOL_VERSION,
            user: open.user.to_string(),
            dc: self.coordinate.dc.to_string(),
            node: self.coordinate.node.to_string(),
            connection: self.coordinate.connection_label(),
            limits: self.limits.announce(),
        };
        self.out.push_back(Output::Frame(welcome));
        open.scanning = false;
        self.request_page();
    }

    fn send(&mut self, to: String, client_id: String, text: String, seq: Option<u64>, now_ms: u64) {
        let State::Open(open) = &self.state else {
            return self.error(ErrorCode::Unauthenticated, "log in first".into(), Some(client_id));
        };
        let from = open.user.clone();
        let seq = match (seq, &open.device) {
            (None, _) => None,
            (Some(0), _) => return self.error(ErrorCode::BadSeq, "seq starts at 1".into(), Some(client_id)),
            (Some(_), None) => {
                let detail = "a numbered send needs a device named at login".into();
                return self.error(ErrorCode::BadSeq, detail, Some(client_id));
            }
            (Some(seq), Some(device)) => Some(DeviceSeq {
                device: device.clone(),
                seq,
            }),
        };
        let client_msg_id = match ClientMsgId::parse(&client_id) {
            Ok(id) => id,
            Err(e) => {
                let detail = format!("client_id {e}");
                return self.error(ErrorCode::BadClientId, detail, Some(client_id));
            }
        };
        let to = match UserId::parse(&to) {
            Ok(to) => to,
            Err(e) => {
                return self.error(ErrorCode::BadRecipient, format!("recipient {e}"), Some(client_id));
            }
        };
        if text.len() > self.limits.max_text_bytes {
            let detail = format!(
                "text is {} bytes; the limit is {}",
                text.len(),
                self.limits.max_text_bytes
            );
            return self.error(ErrorCode::TextTooLarge, detail, Some(client_id));
        }
        if let Some(users) = &self.users
            && let Err(retry_after_ms) = users.take(&from, now_ms)
        {
            let message = format!(
                "user over {} sends/s across its connections (burst {}); not sent",
                self.limits.user_rate_per_sec, self.limits.user_burst
            );
            self.out.push_back(Output::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                message,
                client_id: Some(client_id),
                retry_after_ms: Some(retry_after_ms),
            }));
            return;
        }
        self.pending_sends += 1;
        self.out.push_back(Output::Append(NewMessage {
            from,
            to,
            client_id: client_msg_id,
            text,
            at_ms: now_ms,
            seq,
        }));
    }

    /// An append asked for by [`Output::Append`] finished.
    pub fn on_appended(&mut self, client_id: &ClientMsgId, result: Result<Receipt, StoreError>) {
        debug_assert!(self.pending_sends > 0, "append result without a pending append");
        self.pending_sends = self.pending_sends.saturating_sub(1);
        if self.is_closed() {
            return;
        }
        let frame = match result {
            Ok(receipt) => ServerFrame::Sent {
                client_id: client_id.to_string(),
                id: receipt.id.to_string(),
                at: receipt.at_ms,
            },
            Err(e) => {
                let code = match e {
                    StoreError::MailboxFull { .. } => ErrorCode::MailboxFull,
                    StoreError::SeqTooOld { .. } => ErrorCode::SeqTooOld,
                    StoreError::Unavailable(_) | StoreError::Closed => ErrorCode::Unavailable,
                };
                ServerFrame::Error {
                    code,
                    message: format!("message not accepted: {e}"),
                    client_id: Some(client_id.to_string()),
                    retry_after_ms: None,
                }
            }
        };
        self.out.push_back(Output::Frame(frame));
    }

    fn ack(&mut self, ids: Vec<String>) {
        let max = self.limits.max_ack_ids;
        let State::Open(open) = &mut self.state else {
            return self.error(ErrorCode::Unauthenticated, "log in first".into(), None);
        };
        if ids.len() > max {
            let detail = format!("{} ids in one ack; the limit is {max}", ids.len());
            return self.error(ErrorCode::TooManyIds, detail, None);
        }
        // Ids this connection never delivered are acknowledged trivially: they are not
        // ours to delete, or are gone already.
        let seqs: Vec<u64> = ids
            .iter()
            .filter_map(|id| MessageId::parse(id))
            .filter_map(|id| open.inflight.remove(&id))
            .collect();
        let user = open.user.clone();
        if seqs.is_empty() {
            self.out.push_back(Output::Frame(ServerFrame::Acked { ids }));
        } else {
            self.out.push_back(Output::Ack { user, seqs, ids });
        }
        // The window may have opened up.
        self.request_page();
    }

    /// An [`Output::Ack`] finished.
    pub fn on_acked(&mut self, ids: Vec<String>, result: Result<(), StoreError>) {
        if self.is_closed() {
            return;
        }
        let frame = match result {
            Ok(()) => ServerFrame::Acked { ids },
            // The messages stay in the mailbox and come back on the next connection.
            Err(e) => ServerFrame::Error {
                code: ErrorCode::Unavailable,
                message: format!("acknowledgement not stored: {e}"),
                client_id: None,
                retry_after_ms: None,
            },
        };
        self.out.push_back(Output::Frame(frame));
    }

    /// Messages this user sent were delivered (see [`ServerFrame::Delivered`]).
    pub fn on_delivered(&mut self, ids: &[MessageId]) {
        if let State::Open(open) = &self.state
            && open.joined
            && self.wants_receipts()
        {
            let ids = ids.iter().map(ToString::to_string).collect();
            self.out.push_back(Output::Frame(ServerFrame::Delivered { ids }));
        }
    }

    /// The router had to drop a push to this connection. Drivers call this before handing
    /// over any push that was queued after the drop.
    pub fn on_push_dropped(&mut self) {
        let State::Open(open) = &mut self.state else {
            return;
        };
        // Something past the cursor never reached us: everything from the cursor on must
        // come from the mailbox.
        open.live = false;
        open.held.clear();
        open.held_overflowed = open.scanning;
        self.request_page();
    }

    /// The router pushed a committed message for this user.
    pub fn on_push(&mut self, msg: SharedMessage) {
        let State::Open(open) = &mut self.state else {
            return;
        };
        // A coordinate that outlived its connection can name a connection number now held
        // by someone else (a node that started again from an empty store numbers its
        // connections afresh). The message stays in its recipient's mailbox.
        if msg.to != open.user {
            return tracing::warn!(to = %msg.to, id = %msg.id, "a push for another user ignored");
        }
        if msg.seq <= open.cursor {
            return;
        }
        if open.scanning {
            if open.held.len() < self.limits.push_buffer {
                open.held.push(msg);
            } else {
                open.held_overflowed = true;
            }
            return;
        }
        if !open.live {
            // The next page will read it from the mailbox, in order.
            return self.request_page();
        }
        if open.inflight.len() >= self.limits.max_inflight {
            open.live = false;
            return;
        }
        deliver(open, &mut self.out, msg);
    }

    /// A page asked for by [`Output::Scan`] arrived.
    pub fn on_scanned(&mut self, result: Result<Vec<SharedMessage>, StoreError>, limit: usize) {
        let State::Open(open) = &mut self.state else {
            return;
        };
        open.scanning = false;
        let page = match result {
            Ok(page) => page,
            Err(e) => return self.fail_unavailable(e),
        };
        let exhausted = page.len() < limit && !open.held_overflowed;
        for msg in page {
            debug_assert!(msg.seq > open.cursor, "scan returned a seq at or below the cursor");
            if msg.seq > open.cursor {
                deliver(open, &mut self.out, msg);
            }
        }
        let held = std::mem::take(&mut open.held);
        open.held_overflowed = false;
        if exhausted {
            open.live = true;
            for msg in held {
                self.on_push(msg);
            }
        } else {
            // Everything held lies past the cursor and is in the mailbox: read it in order.
            self.request_page();
        }
    }

    fn request_page(&mut self) {
        let State::Open(open) = &mut self.state else {
            return;
        };
        let room = self.limits.max_inflight.saturating_sub(open.inflight.len());
        if !open.joined || open.live || open.scanning || room == 0 {
            return;
        }
        open.scanning = true;
        self.out.push_back(Output::Scan {
            user: open.user.clone(),
            after: open.cursor,
            limit: room,
        });
    }

    fn error(&mut self, code: ErrorCode, message: String, client_id: Option<String>) {
        self.out.push_back(Output::Frame(ServerFrame::Error {
            code,
            message,
            client_id,
            retry_after_ms: None,
        }));
    }

    /// Reports an error that ends the connection.
    fn fail(&mut self, code: ErrorCode, message: String) {
        if self.is_closed() {
            return;
        }
        let close = code.close_code().expect("fail() is only used with closing codes");
        self.error(code, message, None);
        self.out.push_back(Output::Close {
            code: close,
            reason: code.as_str(),
        });
        self.state = State::Closed;
    }

    fn fail_unavailable(&mut self, e: StoreError) {
        self.error(ErrorCode::Unavailable, format!("mailbox unavailable: {e}"), None);
        // 1011: "internal error"; the client should reconnect later.
        self.out.push_back(Output::Close {
            code: 1011,
            reason: ErrorCode::Unavailable.as_str(),
        });
        self.state = State::Closed;
    }
}

fn deliver(open: &mut Open, out: &mut VecDeque<Output>, msg: SharedMessage) {
    debug_assert!(msg.seq > open.cursor);
    debug_assert_eq!(msg.to, open.user, "message delivered to the wrong user");
    open.cursor = msg.seq;
    open.inflight.insert(msg.id.clone(), msg.seq);
    out.push_back(Output::Deliver(msg));
}

#[cfg(test)]
mod tests;
