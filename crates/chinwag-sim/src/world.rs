//! One simulated cluster: N DCs, each with the real store (on tmpfs), the real replicator
//! and real client sessions, joined by a simulated network, driven by one event queue in
//! virtual time.
//!
//! Determinism: every random choice comes from one seeded [`Rng`]; maps are ordered;
//! store operations are awaited one at a time, so the store's writer thread sees the same
//! operations in the same order on every run. Wall-clock time enters only as a constant
//! offset (so the store's idempotency window is "now"), and the trace leaves it out.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chinwag_core::{
    AuthError, Authenticate, ClientMsgId, Coordinate, DcName, Delivery, NodeName, Output, PushOutcome, Router, Session,
    SessionLimits, SharedMessage, Store, UserId,
};

use chinwag_proto::{ClientFrame, ServerFrame};
use chinwag_replication::{Action, Config as ReplConfig, Replicator, StreamId, Wire};
use chinwag_store::{EmbeddedStore, StoreOptions};

use crate::history::{Delivered, History};
use crate::net::{Net, NetConfig};
use crate::rng::Rng;

pub const DC_NAMES: [&str; 5] = ["east", "west", "south", "north", "centre"];

/// Which faults a run injects while the workload runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub loss_per_mille: u64,
    pub dup_per_mille: u64,
    pub jitter_ms: u64,
    pub partitions: bool,
    pub clogs: bool,
    pub crashes: bool,
    /// DCs 0 and 1 cannot talk for the whole run (everything between them is relayed).
    pub split_pair: bool,
}

impl Faults {
    pub fn all() -> Self {
        Self {
            loss_per_mille: 20,
            dup_per_mille: 10,
            jitter_ms: 50,
            partitions: true,
            clogs: true,
            crashes: true,
            split_pair: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub dcs: usize,
    pub latency_ms: u64,
    pub interval_ms: u64,
    pub faults: Faults,
    pub users: usize,
    pub sends: usize,
    /// Sends, churn and faults happen in `[0, workload_ms)`.
    pub workload_ms: u64,
    /// Time after the final heal for everything to be delivered.
    pub settle_ms: u64,
}

impl Scenario {
    pub fn new(dcs: usize, latency_ms: u64, interval_ms: u64, faults: Faults) -> Self {
        Self {
            dcs,
            latency_ms,
            interval_ms,
            faults,
            users: 12,
            sends: 120,
            workload_ms: 20_000,
            settle_ms: 20_000,
        }
    }
}

#[derive(Debug, Clone)]
enum Event {
    Deliver {
        from: usize,
        to: usize,
        msg: Wire,
    },
    Tick(usize),
    Login {
        device: usize,
        dc: usize,
    },
    Logout {
        device: usize,
    },
    Send {
        device: usize,
        to: usize,
    },
    /// The device sends an earlier message again with the same client id (and number), as
    /// a client does when it never saw the answer (a lost acknowledgement).
    Retry {
        device: usize,
        send: Outgoing,
    },
    Crash(usize),
    Restart(usize),
    Cut {
        from: usize,
        to: usize,
    },
    Heal {
        from: usize,
        to: usize,
    },
    Clog {
        from: usize,
        to: usize,
    },
    Unclog {
        from: usize,
        to: usize,
    },
    HealAll,
    FinalLogins,
}

/// Accepts `user:<id>` tokens: the simulation studies delivery, not authentication.
struct SimAuth;

impl Authenticate for SimAuth {
    fn authenticate(&self, token: &str, _: u64) -> Result<UserId, AuthError> {
        let user = token
            .strip_prefix("user:")
            .ok_or_else(|| AuthError::Invalid("not a sim token".into()))?;
        UserId::parse(user).map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

type Pushes = Arc<Mutex<Vec<(Coordinate, SharedMessage)>>>;

/// Routes like a node's registry would, into a list the world delivers from.
struct SimRouter(Pushes);

impl Router for SimRouter {
    fn push(&self, to: &Coordinate, msg: &SharedMessage) -> PushOutcome {
        self.0.lock().expect("pushes").push((to.clone(), msg.clone()));
        PushOutcome::Queued
    }
}

struct Conn {
    session: Session,
    device: usize,
}

struct Dc {
    name: DcName,
    dir: tempfile::TempDir,
    store: Option<EmbeddedStore>,
    repl: Option<Replicator>,
    pushes: Pushes,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    incarnation: u64,
    head_seen: u64,
    snapshot_parts: BTreeMap<DcName, Vec<Vec<u8>>>,
}

struct Device {
    user: usize,
    conn: Option<(usize, u64)>,
    /// Sent, not yet accepted: retried with the same client id on the next connection.
    pending: Vec<Outgoing>,
    /// Whether the device names itself at login and numbers its sends; if so, how many
    /// it has numbered.
    numbered: Option<u64>,
}

/// One send as the device keeps it until it is accepted.
#[derive(Debug, Clone)]
struct Outgoing {
    client_id: String,
    to: usize,
    text: String,
    seq: Option<u64>,
}

pub struct World {
    pub sc: Scenario,
    rt: tokio::runtime::Runtime,
    pub now: u64,
    base_ms: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: BTreeMap<u64, Event>,
    dcs: Vec<Dc>,
    net: Net,
    pub rng: Rng,
    devices: Vec<Device>,
    users: Vec<UserId>,
    limits: Arc<SessionLimits>,
    pub history: History,
    pub last_heal_ms: u64,
    next_client_id: u64,
    /// Pushes handed to sessions and not yet delivered: (connection, message).
    pushed: std::collections::BTreeSet<(u64, chinwag_core::MessageId)>,
}

/// The name of DC number `i`.
pub fn dc_name(i: usize) -> String {
    DC_NAMES.get(i).map_or_else(|| format!("dc{i}"), |s| (*s).to_owned())
}

/// A connection's name across DCs.
fn conn_key(dc: usize, conn: u64) -> u64 {
    conn + ((dc as u64) << 40)
}

impl World {
    pub fn new(sc: Scenario, seed: u64) -> anyhow::Result<World> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let base_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis() as u64;
        let net = Net::new(NetConfig {
            latency_ms: sc.latency_ms,
            jitter_ms: sc.faults.jitter_ms,
            loss_per_mille: sc.faults.loss_per_mille,
            dup_per_mille: sc.faults.dup_per_mille,
        });
        let limits = Arc::new(SessionLimits {
            rate_per_sec: 100_000,
            burst: 100_000,
            ..SessionLimits::default()
        });
        let users: Vec<UserId> = (0..sc.users)
            .map(|i| UserId::parse(&format!("u{i}")).expect("valid"))
            .collect();
        // Every user has a phone; every third also a laptop. Every other device numbers its
        // sends.
        let devices = (0..sc.users)
            .flat_map(|u| std::iter::repeat_n(u, if u % 3 == 0 { 2 } else { 1 }))
            .enumerate()
            .map(|(i, user)| Device {
                user,
                conn: None,
                pending: Vec::new(),
                numbered: (i % 2 == 1).then_some(0),
            })
            .collect();
        let mut world = World {
            history: History::new(sc.users),
            sc,
            rt,
            now: 0,
            base_ms,
            seq: 0,
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            dcs: Vec::new(),
            net,
            rng: Rng::new(seed),
            devices,
            users,
            limits,
            last_heal_ms: 0,
            next_client_id: 0,
            pushed: Default::default(),
        };
        for i in 0..world.sc.dcs {
            let name = DcName::parse(&dc_name(i)).expect("valid");
            let dir = tempfile::Builder::new().prefix("chinwag-sim-").tempdir_in(tmpfs())?;
            world.dcs.push(Dc {
                name,
                dir,
                store: None,
                repl: None,
                pushes: Arc::default(),
                conns: BTreeMap::new(),
                next_conn: 1,
                incarnation: 0,
                head_seen: 0,
                snapshot_parts: BTreeMap::new(),
            });
        }
        for dc in 0..world.sc.dcs {
            world.open_dc(dc)?;
        }
        // The split pair never hears each other, not even a first hello.
        if world.sc.faults.split_pair && world.sc.dcs > 2 {
            world.net.cut(0, 1);
            world.net.cut(1, 0);
        }
        for dc in 0..world.sc.dcs {
            world.connect_links(dc);
            let phase = world.rng.below(world.sc.interval_ms);
            world.at(phase, Event::Tick(dc));
        }
        Ok(world)
    }

    fn at(&mut self, delay: u64, event: Event) {
        self.seq += 1;
        self.events.insert(self.seq, event);
        self.queue.push(Reverse((self.now + delay, self.seq)));
    }

    /// The clock sessions see: wall time at the start, advanced by virtual time.
    fn wall_ms(&self) -> u64 {
        self.base_ms + self.now
    }

    fn dc_names(&self) -> Vec<DcName> {
        self.dcs.iter().map(|d| d.name.clone()).collect()
    }

    fn open_dc(&mut self, dc: usize) -> anyhow::Result<()> {
        let names = self.dc_names();
        let d = &mut self.dcs[dc];
        let options = StoreOptions {
            dc: d.name.clone(),
            node: NodeName::parse("n1").expect("valid"),
            mailbox_max_messages: 100_000,
            commit_batch_max: 1024,
            queue: 65_536,
            dedup_window: Duration::from_secs(3600),
            replicate: true,
            memory: chinwag_store::StoreMemory::default(),
            journal_dir: None,
        };
        let listener = Arc::new(Delivery::new(SimRouter(d.pushes.clone())));
        let store = EmbeddedStore::open(d.dir.path(), options, listener, Box::new(|_| {}))?;
        let (applied, truncated) = store.replication_state()?;
        let mut cfg = ReplConfig::wan(d.name.clone(), store.stream().clone(), names);
        cfg.tick_ms = self.sc.interval_ms;
        cfg.keepalive_ms = 10 * self.sc.interval_ms;
        cfg.peer_timeout_ms = 30 * self.sc.interval_ms;
        cfg.retransmit_ms = 2 * self.sc.latency_ms + 2 * self.sc.faults.jitter_ms + self.sc.interval_ms;
        cfg.relay_after_ms = 2 * cfg.retransmit_ms;
        d.head_seen = *store.log_head().borrow();
        d.incarnation = store.incarnation();
        d.repl = Some(Replicator::new(cfg, applied, truncated, self.now));
        d.store = Some(store);
        self.history
            .trace(self.now, format!("open {} incarnation {}", d.name, d.incarnation));
        Ok(())
    }

    /// Links are up between every pair of running DCs (the network decides what passes).
    fn connect_links(&mut self, dc: usize) {
        for other in 0..self.dcs.len() {
            if other == dc || self.dcs[other].repl.is_none() {
                continue;
            }
            let (a, b) = (self.dcs[dc].name.clone(), self.dcs[other].name.clone());
            let now = self.now;
            if let Some(r) = self.dcs[dc].repl.as_mut() {
                r.on_connected(&b, now);
            }
            if let Some(r) = self.dcs[other].repl.as_mut() {
                r.on_connected(&a, now);
            }
            self.drain_repl(dc);
            self.drain_repl(other);
        }
    }

    // ---------------------------------------------------------------- the event loop

    pub fn run_until(&mut self, t: u64) {
        while let Some(Reverse((time, id))) = self.queue.peek().copied() {
            if time > t {
                break;
            }
            self.queue.pop();
            self.now = time;
            let event = self.events.remove(&id).expect("scheduled");
            self.handle(event);
        }
        self.now = t;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { from, to, msg } => self.deliver_wire(from, to, msg),
            Event::Tick(dc) => {
                let d = &mut self.dcs[dc];
                if let (Some(r), Some(store)) = (d.repl.as_mut(), d.store.as_ref()) {
                    r.on_tick(self.now, store);
                }
                self.drain_repl(dc);
                let interval = self.sc.interval_ms;
                self.at(interval, Event::Tick(dc));
            }
            Event::Login { device, dc } => self.login(device, dc),
            Event::Logout { device } => self.logout(device),
            Event::Send { device, to } => self.send(device, to),
            Event::Retry { device, send } => self.submit(device, &send),
            Event::Crash(dc) => self.crash(dc),
            Event::Restart(dc) => {
                if self.dcs[dc].store.is_none() {
                    self.open_dc(dc).expect("reopen a crashed DC's store");
                    self.connect_links(dc);
                }
            }
            Event::Cut { from, to } => self.net.cut(from, to),
            Event::Heal { from, to } => self.net.heal(from, to),
            Event::Clog { from, to } => self.net.clog(from, to),
            Event::Unclog { from, to } => {
                for msg in self.net.unclog(from, to) {
                    let delay = self.net.delay(&mut self.rng);
                    self.at(delay, Event::Deliver { from, to, msg });
                }
            }
            Event::HealAll => self.heal_all(),
            Event::FinalLogins => self.final_logins(),
        }
    }

    fn deliver_wire(&mut self, from: usize, to: usize, msg: Wire) {
        let from_name = self.dcs[from].name.clone();
        let d = &mut self.dcs[to];
        let (Some(r), Some(store)) = (d.repl.as_mut(), d.store.as_ref()) else {
            return;
        };
        r.on_message(&from_name, msg, self.now, store);
        self.drain_repl(to);
    }

    /// Carries out a DC's replication actions until there are none.
    fn drain_repl(&mut self, dc: usize) {
        loop {
            let Some(action) = self.dcs[dc].repl.as_mut().and_then(|r| r.poll_action()) else {
                return;
            };
            match action {
                Action::Send { to, msg } => {
                    let to = self.dcs.iter().position(|d| d.name == to).expect("known DC");
                    for (delay, msg) in self.net.transmit(&mut self.rng, dc, to, msg) {
                        self.at(delay, Event::Deliver { from: dc, to, msg });
                    }
                }
                Action::Apply { stream, first, entries } => {
                    let store = self.dcs[dc].store.as_ref().expect("running");
                    let result = self.rt.block_on(store.ingest(stream.clone(), first, entries));
                    match result {
                        Ok(through) => {
                            let d = &mut self.dcs[dc];
                            d.repl.as_mut().expect("running").on_applied(
                                &stream,
                                through,
                                d.store.as_ref().expect("running"),
                            );
                        }
                        Err(e) => self
                            .history
                            .trace(self.now, format!("{} ingest failed: {e}", self.dcs[dc].name)),
                    }
                    self.after_store(dc);
                    self.history
                        .note_applied(self.now, dc, &stream, self.applied_everywhere(&stream));
                }
                Action::Truncate { stream, through } => {
                    let truncate = self.dcs[dc].store.as_ref().expect("running").truncate(stream, through);
                    self.expect_done(dc, truncate);
                }
                Action::SendSnapshot { to } => self.send_snapshot(dc, to),
                Action::MergeSnapshot {
                    from,
                    applied,
                    items,
                    last,
                } => {
                    let d = &mut self.dcs[dc];
                    d.snapshot_parts.entry(from.clone()).or_default().extend(items);
                    if last {
                        let items = d.snapshot_parts.remove(&from).unwrap_or_default();
                        let store = d.store.as_ref().expect("running");
                        if let Ok(merged) = self.rt.block_on(store.merge_snapshot(applied, items)) {
                            let d = &mut self.dcs[dc];
                            d.repl
                                .as_mut()
                                .expect("running")
                                .on_snapshot_merged(&merged, d.store.as_ref().expect("running"));
                        }
                        self.history
                            .trace(self.now, format!("{} merged a snapshot from {from}", self.dcs[dc].name));
                        self.after_store(dc);
                    }
                }
                Action::Forget { dc: gone } => {
                    let forget = self.dcs[dc].store.as_ref().expect("running").forget_coordinates(gone);
                    self.expect_done(dc, forget);
                }
            }
        }
    }

    /// Waits for a store request that answers nothing but success or failure; a failure
    /// goes into the trace, for the checker's verdict to be read against.
    fn expect_done(&mut self, dc: usize, request: impl Future<Output = Result<(), chinwag_core::StoreError>>) {
        if let Err(e) = self.rt.block_on(request) {
            let name = &self.dcs[dc].name;
            self.history
                .trace(self.now, format!("{name}: a store request failed: {e}"));
        }
    }

    fn send_snapshot(&mut self, dc: usize, to: DcName) {
        let store = self.dcs[dc].store.as_ref().expect("running");
        let Ok((applied, items)) = store.snapshot() else { return };
        let to_index = self.dcs.iter().position(|d| d.name == to).expect("known DC");
        self.history
            .trace(self.now, format!("{} sends a snapshot to {to}", self.dcs[dc].name));
        let msg = Wire::Snapshot {
            applied,
            items,
            last: true,
        };
        for (delay, msg) in self.net.transmit(&mut self.rng, dc, to_index, msg) {
            self.at(
                delay,
                Event::Deliver {
                    from: dc,
                    to: to_index,
                    msg,
                },
            );
        }
    }

    /// The lowest seq of `stream` applied by every running DC.
    fn applied_everywhere(&self, stream: &StreamId) -> u64 {
        self.dcs
            .iter()
            .filter_map(|d| d.repl.as_ref())
            .map(|r| r.applied().get(stream))
            .min()
            .unwrap_or(0)
    }

    /// After any store operation: hand pushes to sessions, and tell the replicator about
    /// new local entries.
    fn after_store(&mut self, dc: usize) {
        let pushes = std::mem::take(&mut *self.dcs[dc].pushes.lock().expect("pushes"));
        let mut woken = Vec::new();
        for (coordinate, msg) in pushes {
            let d = &mut self.dcs[dc];
            let mine = coordinate.dc == d.name && coordinate.incarnation == d.incarnation;
            if let Some(conn) = d.conns.get_mut(&coordinate.conn).filter(|_| mine) {
                self.pushed.insert((conn_key(dc, coordinate.conn), msg.id.clone()));
                conn.session.on_push(msg);
                woken.push(coordinate.conn);
            }
        }
        let d = &mut self.dcs[dc];
        if let Some(store) = d.store.as_ref() {
            let head = *store.log_head().borrow();
            if head != d.head_seen {
                d.head_seen = head;
                d.repl.as_mut().expect("running").on_local(head, store);
                self.drain_repl(dc);
            }
        }
        self.history
            .check_coordinates(self.now, &self.dcs.iter().map(|d| d.store.as_ref()).collect::<Vec<_>>());
        for conn in woken {
            self.pump(dc, conn);
        }
    }

    // ---------------------------------------------------------------- clients

    fn login(&mut self, device: usize, dc: usize) {
        if self.devices[device].conn.is_some() || self.dcs[dc].store.is_none() {
            return;
        }
        let now = self.wall_ms();
        let d = &mut self.dcs[dc];
        let conn = d.next_conn;
        d.next_conn += 1;
        let coordinate = Coordinate {
            dc: d.name.clone(),
            node: NodeName::parse("n1").expect("valid"),
            incarnation: d.incarnation,
            conn,
        };
        let mut session = Session::new(self.limits.clone(), Arc::new(SimAuth), coordinate, now);
        let user = &self.users[self.devices[device].user];
        session.on_text(
            &chinwag_proto::encode_client(&ClientFrame::Login {
                token: format!("user:{user}"),
                receipts: false,
                device: self.devices[device].numbered.map(|_| format!("d{device}")),
            }),
            now,
        );
        d.conns.insert(conn, Conn { session, device });
        self.devices[device].conn = Some((dc, conn));
        self.history.trace(
            self.now,
            format!("{user} device {device} logs into {}", self.dcs[dc].name),
        );
        self.pump(dc, conn);
        // Retry what was never accepted, with the same client ids.
        let pending = self.devices[device].pending.clone();
        for send in &pending {
            self.submit(device, send);
        }
    }

    fn logout(&mut self, device: usize) {
        let Some((dc, conn)) = self.devices[device].conn.take() else {
            return;
        };
        let Some(c) = self.dcs[dc].conns.remove(&conn) else {
            return;
        };
        if let (Some(user), Some(store)) = (c.session.user(), self.dcs[dc].store.as_ref()) {
            let _ = self
                .rt
                .block_on(store.remove_coordinate(user.clone(), c.session.coordinate().clone()));
        }
        self.history
            .trace(self.now, format!("device {device} logs out of {}", self.dcs[dc].name));
        self.after_store(dc);
    }

    fn send(&mut self, device: usize, to: usize) {
        self.next_client_id += 1;
        let client_id = format!("k{}", self.next_client_id);
        let text = format!("m{}", self.next_client_id);
        let from = self.devices[device].user;
        self.history.attempted(&self.users[from], &client_id, to);
        let numbered = &mut self.devices[device].numbered;
        let seq = numbered.as_mut().map(|n| {
            *n += 1;
            *n
        });
        let send = Outgoing {
            client_id,
            to,
            text,
            seq,
        };
        self.devices[device].pending.push(send.clone());
        self.submit(device, &send);
        if self.rng.chance(200) {
            let delay = self.rng.below(2_000);
            self.at(delay, Event::Retry { device, send });
        }
    }

    fn submit(&mut self, device: usize, send: &Outgoing) {
        let Some((dc, conn)) = self.devices[device].conn else {
            return;
        };
        let frame = ClientFrame::Send {
            to: self.users[send.to].to_string(),
            client_id: send.client_id.clone(),
            text: send.text.clone(),
            seq: send.seq,
        };
        let now = self.wall_ms();
        if let Some(c) = self.dcs[dc].conns.get_mut(&conn) {
            c.session.on_text(&chinwag_proto::encode_client(&frame), now);
        }
        self.pump(dc, conn);
    }

    /// Carries out a session's outputs (and those of sessions they wake) until idle.
    fn pump(&mut self, dc: usize, conn: u64) {
        let mut work = VecDeque::from([conn]);
        while let Some(conn) = work.pop_front() {
            while let Some((device, out)) = self.dcs[dc]
                .conns
                .get_mut(&conn)
                .and_then(|c| Some((c.device, c.session.poll_output()?)))
            {
                self.carry_out(dc, conn, device, out, &mut work);
            }
        }
    }

    fn carry_out(&mut self, dc: usize, conn: u64, device: usize, out: Output, work: &mut VecDeque<u64>) {
        let Some(store) = self.dcs[dc].store.as_ref() else {
            return;
        };
        let now = self.wall_ms();
        match out {
            Output::Frame(frame) => self.client_frame(dc, conn, device, frame),
            Output::Deliver(msg) => {
                let user = self.devices[device].user;
                let applied: Vec<Option<&chinwag_replication::VersionVector>> =
                    self.dcs.iter().map(|d| d.repl.as_ref().map(|r| r.applied())).collect();
                let via_push = self.pushed.remove(&(conn_key(dc, conn), msg.id.clone()));
                let at = Delivered {
                    dc,
                    conn: conn_key(dc, conn),
                    user,
                    via_push,
                };
                self.history.delivered(self.now, at, &msg, &applied);
                // The app acknowledges everything it gets, at once.
                let ack = ClientFrame::Ack {
                    ids: vec![msg.id.to_string()],
                };
                if let Some(c) = self.dcs[dc].conns.get_mut(&conn) {
                    c.session.on_text(&chinwag_proto::encode_client(&ack), now);
                }
            }
            // The sim never calls `on_timeout`: its clients are never idle long enough.
            Output::Ping => {}
            Output::Close { .. } => {
                self.dcs[dc].conns.remove(&conn);
                self.devices[device].conn = None;
            }
            Output::Join { user } => {
                let at = self.dcs[dc].conns[&conn].session.coordinate().clone();
                let result = self.rt.block_on(store.add_coordinate(user.clone(), at.clone()));
                self.history.joined(self.now, &user, at);
                self.dcs[dc]
                    .conns
                    .get_mut(&conn)
                    .expect("open")
                    .session
                    .on_joined(result);
                self.after_store(dc);
            }
            Output::Append(new) => {
                let client_id: ClientMsgId = new.client_id.clone();
                let to = new.to.clone();
                let knew = store.coordinates(&to);
                let elsewhere = self.live_elsewhere(&to, dc);
                let store = self.dcs[dc].store.as_ref().expect("running");
                let result = self.rt.block_on(store.append(new));
                if let Ok(receipt) = &result
                    && !receipt.duplicate
                {
                    self.history.accepted_at(self.now, dc, &receipt.id, &elsewhere, &knew);
                }
                self.dcs[dc]
                    .conns
                    .get_mut(&conn)
                    .expect("open")
                    .session
                    .on_appended(&client_id, result);
                self.after_store(dc);
            }
            Output::Scan { user, after, limit } => {
                let result = self.rt.block_on(store.scan(user, after, limit));
                self.dcs[dc]
                    .conns
                    .get_mut(&conn)
                    .expect("open")
                    .session
                    .on_scanned(result, limit);
            }
            Output::Ack { user, seqs, ids } => {
                let result = self.rt.block_on(store.ack(user.clone(), seqs));
                let head = *store.log_head().borrow();
                self.history.acked(store.stream().clone(), &ids, head);
                self.dcs[dc]
                    .conns
                    .get_mut(&conn)
                    .expect("open")
                    .session
                    .on_acked(ids, result);
                self.after_store(dc);
            }
        }
        if self.dcs[dc].conns.contains_key(&conn) && !work.contains(&conn) {
            work.push_back(conn);
        }
    }

    /// Coordinates of `user`'s logged-in connections in DCs other than `dc`.
    fn live_elsewhere(&self, user: &UserId, dc: usize) -> Vec<Coordinate> {
        self.dcs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != dc)
            .flat_map(|(_, d)| d.conns.values())
            .filter(|c| c.session.user() == Some(user))
            .map(|c| c.session.coordinate().clone())
            .collect()
    }

    /// Coordinates of every logged-in connection, per user (sorted), for the checker.
    pub fn live_coordinates(&self) -> Vec<Vec<Coordinate>> {
        self.users
            .iter()
            .map(|u| {
                let mut live: Vec<Coordinate> = self
                    .dcs
                    .iter()
                    .flat_map(|d| d.conns.values())
                    .filter(|c| c.session.user() == Some(u))
                    .map(|c| c.session.coordinate().clone())
                    .collect();
                live.sort();
                live
            })
            .collect()
    }

    fn client_frame(&mut self, dc: usize, _conn: u64, device: usize, frame: ServerFrame) {
        match frame {
            ServerFrame::Sent { client_id, id, .. } => {
                let user = self.devices[device].user;
                self.devices[device].pending.retain(|send| send.client_id != client_id);
                self.history.sent(self.now, dc, user, &client_id, &id);
            }
            ServerFrame::Error { code, client_id, .. } => {
                self.history
                    .trace(self.now, format!("device {device} error {code} for {client_id:?}"));
            }
            _ => {}
        }
    }

    fn crash(&mut self, dc: usize) {
        let d = &mut self.dcs[dc];
        if d.store.is_none() {
            return;
        }
        // Everything in memory goes: sessions, replication state, snapshot parts.
        d.store = None;
        d.repl = None;
        d.snapshot_parts.clear();
        d.pushes.lock().expect("pushes").clear();
        let conns: Vec<u64> = d.conns.keys().copied().collect();
        d.conns.clear();
        for device in &mut self.devices {
            if device.conn.is_some_and(|(c, n)| c == dc && conns.contains(&n)) {
                device.conn = None;
            }
        }
        let name = self.dcs[dc].name.clone();
        for other in &mut self.dcs {
            if let Some(r) = other.repl.as_mut() {
                r.on_disconnected(&name);
            }
        }
        self.history.trace(self.now, format!("crash {name}"));
        // The store's files stay; the writer thread lets go of them once its queue closes.
        std::thread::sleep(Duration::from_millis(5));
    }

    fn heal_all(&mut self) {
        self.last_heal_ms = self.now;
        for ((from, to), held) in self.net.heal_all() {
            for msg in held {
                let delay = self.net.delay(&mut self.rng);
                self.at(delay, Event::Deliver { from, to, msg });
            }
        }
        if self.sc.faults.split_pair && self.sc.dcs > 2 {
            self.net.cut(0, 1);
            self.net.cut(1, 0);
        }
        for dc in 0..self.dcs.len() {
            if self.dcs[dc].store.is_none() {
                self.at(0, Event::Restart(dc));
            }
        }
        self.history.trace(self.now, "heal all".into());
    }

    /// Every user with no device online logs one in, so every message has somewhere to go.
    fn final_logins(&mut self) {
        let mut online = vec![false; self.users.len()];
        for d in &self.devices {
            if d.conn.is_some() {
                online[d.user] = true;
            }
        }
        for device in 0..self.devices.len() {
            let user = self.devices[device].user;
            if !online[user] {
                online[user] = true;
                let dc = self.rng.below(self.dcs.len() as u64) as usize;
                self.login(device, dc);
            }
        }
    }

    // ---------------------------------------------------------------- workload & faults

    /// Schedules the workload, the faults and the final phase.
    pub fn plan(&mut self) {
        let sc = self.sc.clone();
        let w = sc.workload_ms;
        for device in 0..self.devices.len() {
            let dc = self.rng.below(sc.dcs as u64) as usize;
            let when = self.rng.below(w / 4);
            self.at(when, Event::Login { device, dc });
        }
        for _ in 0..sc.sends {
            let device = self.rng.below(self.devices.len() as u64) as usize;
            let to = self.rng.below(sc.users as u64) as usize;
            let when = self.rng.below(w);
            self.at(when, Event::Send { device, to });
        }
        // Churn: logouts, and moves to another DC.
        for _ in 0..self.devices.len() {
            let device = self.rng.below(self.devices.len() as u64) as usize;
            let when = w / 4 + self.rng.below(w / 2);
            self.at(when, Event::Logout { device });
            let dc = self.rng.below(sc.dcs as u64) as usize;
            let back = when + 1 + self.rng.below(w / 4);
            self.at(back, Event::Login { device, dc });
        }
        self.plan_faults();
        self.at(w, Event::HealAll);
        self.at(w + 1, Event::FinalLogins);
    }

    fn plan_faults(&mut self) {
        let f = self.sc.faults;
        let (n, w) = (self.sc.dcs as u64, self.sc.workload_ms);
        let pair = |rng: &mut Rng| {
            let a = rng.below(n) as usize;
            let b = (a + 1 + rng.below(n - 1) as usize) % n as usize;
            (a, b)
        };
        if f.partitions && n > 1 {
            for _ in 0..3 {
                let (a, b) = pair(&mut self.rng);
                let start = self.rng.below(w * 3 / 4);
                let end = start + 500 + self.rng.below(w / 4);
                let one_way = self.rng.chance(500);
                self.at(start, Event::Cut { from: a, to: b });
                if !one_way {
                    self.at(start, Event::Cut { from: b, to: a });
                    self.at(end.min(w), Event::Heal { from: b, to: a });
                }
                self.at(end.min(w), Event::Heal { from: a, to: b });
            }
        }
        if f.clogs && n > 1 {
            for _ in 0..3 {
                let (a, b) = pair(&mut self.rng);
                let start = self.rng.below(w * 3 / 4);
                self.at(start, Event::Clog { from: a, to: b });
                let end = (start + 300 + self.rng.below(w / 4)).min(w);
                self.at(end, Event::Unclog { from: a, to: b });
            }
        }
        if f.crashes {
            for _ in 0..2 {
                let dc = self.rng.below(n) as usize;
                let start = self.rng.below(w * 3 / 4);
                self.at(start, Event::Crash(dc));
                let end = (start + 200 + self.rng.below(w / 4)).min(w);
                self.at(end, Event::Restart(dc));
            }
        }
    }

    /// Runs the whole scenario.
    pub fn run(&mut self) {
        self.plan();
        let end = self.sc.workload_ms + self.sc.settle_ms;
        self.run_until(end);
    }

    /// The coordinates each running DC's store holds, per user (for the checker).
    pub fn coordinate_views(&self) -> Vec<Vec<Vec<Coordinate>>> {
        self.dcs
            .iter()
            .filter_map(|d| d.store.as_ref())
            .map(|s| {
                self.users
                    .iter()
                    .map(|u| {
                        let mut c = s.coordinates(u);
                        c.sort();
                        c
                    })
                    .collect()
            })
            .collect()
    }

    /// Per running DC: the ids in its mailboxes, and what it has applied.
    pub fn mailboxes(&self) -> Vec<(std::collections::BTreeSet<String>, chinwag_replication::VersionVector)> {
        self.dcs
            .iter()
            .filter_map(|d| Some((d.store.as_ref()?, d.repl.as_ref()?)))
            .map(|(store, repl)| {
                let ids = self
                    .users
                    .iter()
                    .flat_map(|u| {
                        self.rt
                            .block_on(store.scan(u.clone(), 0, 1_000_000))
                            .unwrap_or_default()
                    })
                    .map(|m| m.id.to_string())
                    .collect();
                (ids, repl.applied().clone())
            })
            .collect()
    }

    /// Bytes put on each directed link so far.
    pub fn bytes(&self) -> &BTreeMap<(usize, usize), u64> {
        &self.net.bytes
    }

    /// Whether the DCs are all running and agree on what they have applied.
    pub fn converged(&self) -> bool {
        let mut views = self.dcs.iter().map(|d| d.repl.as_ref().map(|r| r.applied().clone()));
        let Some(Some(first)) = views.next() else { return false };
        views.all(|v| v.as_ref() == Some(&first))
    }

    pub fn dc_count(&self) -> usize {
        self.dcs.len()
    }
}

/// Stores live in memory-backed files when the machine has them: the simulation measures
/// the protocol, not the disk.
fn tmpfs() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}
