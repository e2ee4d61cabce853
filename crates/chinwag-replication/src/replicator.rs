//! The replication state machine of one DC.
//!
//! It is fed link events, messages from peers, confirmations that the store applied what
//! it was given, and clock ticks; it answers with [`Action`]s: messages to send, entries
//! for the store to apply, log prefixes the store may drop. It owns no socket, timer or
//! store; it reads log entries through the [`Log`] trait.
//!
//! # The rules
//! - **Push.** A new entry of this DC's own stream goes at once to every connected peer.
//! - **Apply in order.** Entries of a stream are applied strictly in seq order, each once.
//!   Entries that arrive early are held (a bounded number) and the gap is asked for
//!   (`Need`); duplicates are ignored.
//! - **Anti-entropy.** Every tick, peers exchange version vectors (`Digest`, only when
//!   changed, plus a keepalive). What a peer lacks is sent from the log; what was sent and
//!   not confirmed within the retransmit time is sent again.
//! - **Relay.** A DC also sends other DCs' streams to a peer that reports it cannot hear
//!   their origin, or that has lagged behind on them for a while, so two DCs cut off from
//!   each other still converge through a third.
//! - **Truncate.** A log prefix is dropped once every configured peer has applied it, or
//!   once it is longer than `max_log_entries`: a peer that far behind catches up from a
//!   snapshot instead, so a peer that is heard from but never applies cannot fill the disk.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chinwag_core::DcName;

use crate::stream::{StreamId, VersionVector};
use crate::wire::{MAX_BATCH_ENTRIES, Wire};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub me: DcName,
    /// This DC's own stream.
    pub stream: StreamId,
    pub peers: Vec<DcName>,
    /// Anti-entropy period.
    pub tick_ms: u64,
    /// A digest is sent to each peer at least this often, even if nothing changed.
    pub keepalive_ms: u64,
    /// A peer not heard from for this long is unreachable.
    pub peer_timeout_ms: u64,
    /// Entries sent and not confirmed after this long are sent again.
    pub retransmit_ms: u64,
    /// A peer behind on another DC's stream for this long gets it relayed by us.
    pub relay_after_ms: u64,
    /// Most unconfirmed entries per peer and stream.
    pub window_entries: u64,
    pub max_batch_entries: usize,
    pub max_batch_bytes: usize,
    /// Most early entries held per stream while a gap is repaired.
    pub max_held: usize,
    /// A peer not heard from for this long is treated as decommissioned: logs are no
    /// longer kept for it, and if it returns it is sent a snapshot.
    pub decommission_after_ms: u64,
    /// Most entries kept of each stream's log, whoever still lacks them.
    pub max_log_entries: u64,
    /// A snapshot that did not make a peer catch up is sent again after this long.
    pub snapshot_retry_ms: u64,
    /// Push new entries to every peer at once. Off only to study anti-entropy alone.
    pub eager_push: bool,
    /// Classic gossip: each tick, exchange digests with this many peers chosen at random
    /// (from `gossip_seed`) instead of all, and relay anything a contacted peer lacks.
    /// `None` (every peer, every tick) suits a handful of DCs; gossip scales to many.
    pub fanout: Option<usize>,
    pub gossip_seed: u64,
}

impl Config {
    /// Timings for DCs on a WAN (hundreds of milliseconds apart).
    pub fn wan(me: DcName, stream: StreamId, peers: Vec<DcName>) -> Self {
        Self {
            me,
            stream,
            peers,
            tick_ms: 100,
            keepalive_ms: 1_000,
            peer_timeout_ms: 3_000,
            retransmit_ms: 500,
            relay_after_ms: 1_000,
            window_entries: 8_192,
            max_batch_entries: 256,
            max_batch_bytes: 1024 * 1024,
            max_held: 8_192,
            decommission_after_ms: 24 * 3600 * 1000,
            max_log_entries: 10_000_000,
            snapshot_retry_ms: 30_000,
            eager_push: true,
            fanout: None,
            gossip_seed: 0,
        }
    }
}

/// Read access to the entries this DC holds, of its own stream and relayed ones.
pub trait Log {
    /// Entries of `stream` from `from` on, in order, as many as fit the limits (at least
    /// one if any). Empty if the log does not hold `from` (not yet, or truncated).
    fn read(&self, stream: &StreamId, from: u64, max_entries: usize, max_bytes: usize) -> Vec<Vec<u8>>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send {
        to: DcName,
        msg: Wire,
    },
    /// Apply these entries, numbered from `first`, then call [`Replicator::on_applied`].
    Apply {
        stream: StreamId,
        first: u64,
        entries: Vec<Vec<u8>>,
    },
    /// Every peer has applied `stream` through `through`; the log may drop that prefix.
    Truncate {
        stream: StreamId,
        through: u64,
    },
    /// `to` needs entries our log no longer holds: send it a snapshot of our whole state
    /// (`Wire::Snapshot` parts).
    SendSnapshot {
        to: DcName,
    },
    /// `dc` has been silent for `decommission_after`: its users' coordinates are no longer
    /// believed (it may be gone for good; if it returns, it announces them again).
    Forget {
        dc: DcName,
    },
    /// A part of a snapshot from `from`. When `last`, merge everything received, then
    /// call [`Replicator::on_snapshot_merged`].
    MergeSnapshot {
        from: DcName,
        applied: VersionVector,
        items: Vec<Vec<u8>>,
        last: bool,
    },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    through: u64,
    at_ms: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Peer {
    connected: bool,
    last_heard_ms: Option<u64>,
    /// What the peer has applied, as far as we know.
    known: VersionVector,
    /// The stream the peer writes now, from its `Hello`: the one stream never sent to it.
    stream: Option<StreamId>,
    pub(crate) sent: BTreeMap<StreamId, Sent>,
    unreachable: BTreeSet<DcName>,
    /// Per stream: since when the peer has been behind, and the seq it was behind on.
    pub(crate) lagging_since: BTreeMap<StreamId, (u64, u64)>,
    last_digest: Option<(VersionVector, Vec<DcName>)>,
    last_digest_ms: u64,
    /// The peer sent us entries we already had: it does not know what we have.
    digest_due: bool,
    need_sent_ms: BTreeMap<StreamId, u64>,
    entries_sent: u64,
    entries_received: u64,
    /// We cannot serve what it lacks from our log any more.
    behind_log: bool,
    /// When we learned of it (start, or its first link): the clock for decommissioning
    /// a peer never heard from.
    since_ms: u64,
    snapshot_sent_ms: Option<u64>,
    /// `Forget` was emitted for this silence.
    forgotten: bool,
    /// What its last digest said of its mailboxes.
    mailbox_depth: Option<u64>,
}

impl Peer {
    /// A peer learned of at `now_ms` (at start, or on its first link), not yet heard.
    fn since(now_ms: u64) -> Self {
        Peer {
            since_ms: now_ms,
            ..Peer::default()
        }
    }
}

/// A peer as shown by `/v1/cluster`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub dc: DcName,
    pub connected: bool,
    pub reachable: bool,
    pub last_heard_ms_ago: Option<u64>,
    pub applied: VersionVector,
    /// Entries we have applied that the peer has not.
    pub lag_entries: u64,
    pub entries_sent: u64,
    pub entries_received: u64,
    /// The peer needs entries our log no longer holds.
    pub behind_log: bool,
    /// Silent for longer than `decommission_after`: logs are no longer kept for it.
    pub decommissioned: bool,
    /// Messages waiting in its mailboxes, as its last digest said.
    pub mailbox_depth: Option<u64>,
    /// The DCs it said, in its last digest, it cannot hear.
    pub unreachable: Vec<DcName>,
}

pub struct Replicator {
    cfg: Config,
    applied: VersionVector,
    /// Handed to the store, not yet confirmed: through which seq, per stream.
    pub(crate) applying: BTreeMap<StreamId, u64>,
    pub(crate) held: BTreeMap<StreamId, BTreeMap<u64, Vec<u8>>>,
    truncated: VersionVector,
    pub(crate) peers: BTreeMap<DcName, Peer>,
    out: VecDeque<Action>,
    now_ms: u64,
    ticks: u64,
    /// This DC's mailbox depth, told to peers in digests.
    mailbox_depth: u64,
}

impl Replicator {
    /// `applied` is what the store has durably applied, this DC's own stream included;
    /// `truncated` how far each log has been truncated.
    pub fn new(cfg: Config, applied: VersionVector, truncated: VersionVector, now_ms: u64) -> Self {
        let peers = cfg
            .peers
            .iter()
            .filter(|p| **p != cfg.me)
            .map(|p| (p.clone(), Peer::since(now_ms)))
            .collect();
        Self {
            cfg,
            applied,
            applying: BTreeMap::new(),
            held: BTreeMap::new(),
            truncated,
            peers,
            out: VecDeque::new(),
            now_ms,
            ticks: 0,
            mailbox_depth: 0,
        }
    }

    /// What the next digests will say of this DC's mailboxes. A change does not by itself
    /// send a digest: it rides on those sent anyway (at least every keepalive).
    pub fn set_mailbox_depth(&mut self, depth: u64) {
        self.mailbox_depth = depth;
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    pub fn applied(&self) -> &VersionVector {
        &self.applied
    }

    /// How far each log has been truncated.
    pub fn truncated(&self) -> &VersionVector {
        &self.truncated
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// A DC not in the configuration linked to us (it holds a cluster certificate): it
    /// joins the cluster.
    pub fn add_peer(&mut self, peer: &DcName, now_ms: u64) {
        if *peer != self.cfg.me && !self.peers.contains_key(peer) {
            self.peers.insert(peer.clone(), Peer::since(now_ms));
        }
    }

    pub fn knows(&self, peer: &DcName) -> bool {
        self.peers.contains_key(peer)
    }

    /// A link to `peer` is up: introduce ourselves.
    pub fn on_connected(&mut self, peer: &DcName, now_ms: u64) {
        self.now_ms = now_ms;
        let hello = Wire::Hello {
            dc: self.cfg.me.clone(),
            stream: self.cfg.stream.clone(),
            applied: self.applied.clone(),
        };
        let Some(p) = self.peers.get_mut(peer) else { return };
        p.connected = true;
        p.sent.clear();
        p.last_digest = None;
        self.send(peer, hello);
    }

    pub fn on_disconnected(&mut self, peer: &DcName) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.connected = false;
            p.sent.clear();
        }
    }

    /// A message from `from` (already authenticated as that DC by the transport).
    pub fn on_message(&mut self, from: &DcName, msg: Wire, now_ms: u64, log: &impl Log) {
        self.now_ms = now_ms;
        let Some(peer) = self.peers.get_mut(from) else { return };
        peer.last_heard_ms = Some(now_ms);
        peer.forgotten = false;
        match msg {
            Wire::Hello { stream, applied, .. } => {
                // A new link's greeting replaces what we knew: a DC that lost its data and
                // started again empty has applied less than it once told us.
                peer.known = applied;
                peer.stream = Some(stream);
                peer.sent.clear();
                self.sync_peer(from, log);
            }
            Wire::Digest {
                applied,
                unreachable,
                mailbox_depth,
            } => {
                peer.mailbox_depth = Some(mailbox_depth);
                // Push-pull gossip: a contact that has what we lack hears our digest back
                // at once, so it can send it.
                if self.cfg.fanout.is_some() && !self.applied.covers(&applied) {
                    peer.digest_due = true;
                }
                peer.known.merge(&applied);
                peer.unreachable = unreachable.into_iter().collect();
                self.note_lag(from);
                self.sync_peer(from, log);
                if self.cfg.fanout.is_some() && self.peers[from].digest_due {
                    let unreachable = self.unreachable();
                    self.maybe_digest(from, &unreachable);
                }
            }
            Wire::Entries { stream, first, entries } => {
                let last = first + entries.len() as u64 - 1;
                peer.known.advance(&stream, last);
                peer.entries_received += entries.len() as u64;
                self.receive(from, stream, first, entries);
            }
            Wire::Need { stream, from: seq } => {
                if let Some(sent) = peer.sent.get_mut(&stream) {
                    sent.through = sent.through.min(seq - 1);
                }
                self.sync_stream(from, &stream, log);
            }
            Wire::Snapshot { applied, items, last } => {
                self.out.push_back(Action::MergeSnapshot {
                    from: from.clone(),
                    applied,
                    items,
                    last,
                });
            }
        }
    }

    /// A snapshot was merged: we have now applied `applied` (at least).
    pub fn on_snapshot_merged(&mut self, applied: &VersionVector, log: &impl Log) {
        self.applied.merge(applied);
        // Logs do not hold what the snapshot covered.
        self.truncated.merge(applied);
        let streams: Vec<StreamId> = self.held.keys().cloned().collect();
        for stream in streams {
            self.apply_held(&stream);
        }
        for peer in self.peers.values_mut() {
            peer.digest_due = true;
        }
        let names: Vec<DcName> = self.peers.keys().cloned().collect();
        for name in names {
            self.sync_peer(&name, log);
        }
    }

    /// This DC's own stream now reaches `through` (durably): push it.
    pub fn on_local(&mut self, through: u64, log: &impl Log) {
        let own = self.cfg.stream.clone();
        self.applied.advance(&own, through);
        if !self.cfg.eager_push {
            return;
        }
        let peers: Vec<DcName> = self.peers.keys().cloned().collect();
        for peer in peers {
            self.sync_stream(&peer, &own, log);
        }
    }

    /// The store durably applied `stream` through `through`.
    pub fn on_applied(&mut self, stream: &StreamId, through: u64, log: &impl Log) {
        self.applied.advance(stream, through);
        if self.applying.get(stream).is_some_and(|&a| a <= through) {
            self.applying.remove(stream);
        }
        self.apply_held(stream);
        if !self.cfg.eager_push {
            return;
        }
        // Relay at once to peers that cannot hear the origin.
        let relay_to: Vec<DcName> = self
            .peers
            .iter()
            .filter(|(name, p)| **name != stream.dc && p.connected && p.unreachable.contains(&stream.dc))
            .map(|(name, _)| name.clone())
            .collect();
        for peer in relay_to {
            self.sync_stream(&peer, stream, log);
        }
    }

    pub fn on_tick(&mut self, now_ms: u64, log: &impl Log) {
        self.now_ms = now_ms;
        self.ticks += 1;
        let unreachable = self.unreachable();
        let names: Vec<DcName> = match self.cfg.fanout {
            Some(k) => self.gossip_contacts(k),
            None => self.peers.keys().cloned().collect(),
        };
        for name in &names {
            if !self.peers[name].connected {
                continue;
            }
            // A peer we cannot hear only gets the keepalive: resending into a partition
            // costs bandwidth and achieves nothing. Hearing it again resumes the flow.
            if unreachable.contains(name) {
                self.maybe_digest(name, &unreachable);
                continue;
            }
            let peer = self.peers.get_mut(name).expect("listed");
            // Sent and never confirmed: assume lost, send again.
            let retransmit = self.cfg.retransmit_ms;
            for (stream, sent) in peer.sent.iter_mut() {
                let known = peer.known.get(stream);
                if sent.through > known && now_ms.saturating_sub(sent.at_ms) >= retransmit {
                    sent.through = known;
                }
            }
            self.sync_peer(name, log);
            if self.cfg.fanout.is_some() {
                // A gossip contact always hears our digest this round.
                self.peers.get_mut(name).expect("listed").digest_due = true;
            }
            self.maybe_digest(name, &unreachable);
        }
        self.truncate();
        self.forget_silent();
    }

    fn forget_silent(&mut self) {
        let silent: Vec<DcName> = self
            .peers
            .iter()
            .filter(|(_, p)| !p.forgotten && p.last_heard_ms.is_some() && self.decommissioned(p))
            .map(|(name, _)| name.clone())
            .collect();
        for dc in silent {
            self.peers.get_mut(&dc).expect("listed").forgotten = true;
            self.out.push_back(Action::Forget { dc });
        }
    }

    /// This tick's gossip contacts: `k` distinct peers, picked by a generator seeded from
    /// the configuration, our name and the tick, so runs are reproducible.
    fn gossip_contacts(&self, k: usize) -> Vec<DcName> {
        let names: Vec<&DcName> = self.peers.keys().collect();
        let mut state = self.cfg.gossip_seed ^ self.ticks.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in self.cfg.me.as_str().bytes() {
            state = (state ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        let mut picked: Vec<DcName> = Vec::with_capacity(k);
        let mut tries = 0;
        while picked.len() < k.min(names.len()) && tries < 16 * k + 16 {
            // splitmix64
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let candidate = names[(z % names.len() as u64) as usize];
            if !picked.contains(candidate) {
                picked.push(candidate.clone());
            }
            tries += 1;
        }
        picked
    }

    /// DCs we cannot currently hear.
    pub fn unreachable(&self) -> Vec<DcName> {
        self.peers
            .iter()
            .filter(|(_, p)| !self.is_reachable(p))
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn is_reachable(&self, p: &Peer) -> bool {
        p.connected
            && p.last_heard_ms
                .is_some_and(|t| self.now_ms.saturating_sub(t) < self.cfg.peer_timeout_ms)
    }

    pub fn status(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .map(|(dc, p)| PeerStatus {
                dc: dc.clone(),
                connected: p.connected,
                reachable: self.is_reachable(p),
                last_heard_ms_ago: p.last_heard_ms.map(|t| self.now_ms.saturating_sub(t)),
                applied: p.known.clone(),
                lag_entries: self.applied.lead_over(&p.known),
                entries_sent: p.entries_sent,
                entries_received: p.entries_received,
                behind_log: p.behind_log,
                decommissioned: self.decommissioned(p),
                mailbox_depth: p.mailbox_depth,
                unreachable: p.unreachable.iter().cloned().collect(),
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn out_for_test(&mut self, to: DcName, msg: Wire) {
        self.send(&to, msg);
    }

    fn send(&mut self, to: &DcName, msg: Wire) {
        self.out.push_back(Action::Send { to: to.clone(), msg });
    }

    fn maybe_digest(&mut self, name: &DcName, unreachable: &[DcName]) {
        let keepalive = self.cfg.keepalive_ms;
        // Gossip contacts relay everything anyway; naming every silent DC would only grow
        // the digest with the cluster.
        let unreachable = if self.cfg.fanout.is_some() {
            &[][..]
        } else {
            unreachable
        };
        let current = (self.applied.clone(), unreachable.to_vec());
        let peer = self.peers.get_mut(name).expect("listed");
        let changed = peer.last_digest.as_ref() != Some(&current);
        // The keepalive also repairs a lost digest: without it a peer could go on resending
        // what we already have, never learning that we have it.
        if changed || peer.digest_due || self.now_ms.saturating_sub(peer.last_digest_ms) >= keepalive {
            peer.last_digest = Some(current.clone());
            peer.last_digest_ms = self.now_ms;
            peer.digest_due = false;
            let (applied, unreachable) = current;
            let mailbox_depth = self.mailbox_depth;
            self.send(
                name,
                Wire::Digest {
                    applied,
                    unreachable,
                    mailbox_depth,
                },
            );
        }
    }

    /// Remembers since when a peer has been behind us on each stream.
    fn note_lag(&mut self, name: &DcName) {
        let now = self.now_ms;
        let peer = self.peers.get_mut(name).expect("listed");
        for (stream, seq) in self.applied.iter() {
            let known = peer.known.get(stream);
            // Caught up with what it lacked back then: in-flight entries are not lag.
            if peer
                .lagging_since
                .get(stream)
                .is_some_and(|&(_, target)| known >= target)
            {
                peer.lagging_since.remove(stream);
            }
            if known < seq {
                peer.lagging_since.entry(stream.clone()).or_insert((now, seq));
            }
        }
    }

    /// Whether we should send `stream` to `peer` at all.
    fn should_send(&self, name: &DcName, peer: &Peer, stream: &StreamId) -> bool {
        // Its own stream, but not one of its earlier epochs: those it may have lost.
        if peer.stream.as_ref().map_or(stream.dc == *name, |own| own == stream) {
            return false;
        }
        if self.cfg.fanout.is_some() {
            return true;
        }
        if *stream == self.cfg.stream || peer.unreachable.contains(&stream.dc) {
            return true;
        }
        peer.lagging_since
            .get(stream)
            .is_some_and(|&(since, _)| self.now_ms.saturating_sub(since) >= self.cfg.relay_after_ms)
    }

    fn sync_peer(&mut self, name: &DcName, log: &impl Log) {
        let streams: Vec<StreamId> = self.applied.streams().cloned().collect();
        for stream in streams {
            self.sync_stream(name, &stream, log);
        }
    }

    /// Sends `peer` what it lacks of `stream`, within the window.
    fn sync_stream(&mut self, name: &DcName, stream: &StreamId, log: &impl Log) {
        let mine = self.applied.get(stream);
        loop {
            let Some(peer) = self.peers.get(name) else { return };
            if !peer.connected || !self.should_send(name, peer, stream) {
                return;
            }
            let known = peer.known.get(stream);
            let base = known.max(peer.sent.get(stream).map_or(0, |s| s.through));
            if base >= mine || base - known >= self.cfg.window_entries {
                return;
            }
            // Only what is durably applied: the log may already hold entries being applied.
            let max = self
                .cfg
                .max_batch_entries
                .min(MAX_BATCH_ENTRIES)
                .min((mine - base) as usize);
            let entries = log.read(stream, base + 1, max, self.cfg.max_batch_bytes);
            let now = self.now_ms;
            let retry = self.cfg.snapshot_retry_ms;
            let peer = self.peers.get_mut(name).expect("checked");
            if entries.is_empty() {
                peer.behind_log = base < self.truncated.get(stream);
                let recently = peer.snapshot_sent_ms.is_some_and(|t| now.saturating_sub(t) < retry);
                if peer.behind_log && !recently {
                    peer.snapshot_sent_ms = Some(now);
                    self.out.push_back(Action::SendSnapshot { to: name.clone() });
                }
                return;
            }
            let n = entries.len() as u64;
            assert!(base + n <= mine, "the log returned more entries than asked for");
            peer.sent.insert(
                stream.clone(),
                Sent {
                    through: base + n,
                    at_ms: self.now_ms,
                },
            );
            peer.entries_sent += n;
            let msg = Wire::Entries {
                stream: stream.clone(),
                first: base + 1,
                entries,
            };
            self.send(name, msg);
        }
    }

    fn next_expected(&self, stream: &StreamId) -> u64 {
        self.applied
            .get(stream)
            .max(self.applying.get(stream).copied().unwrap_or(0))
            + 1
    }

    fn receive(&mut self, from: &DcName, stream: StreamId, first: u64, entries: Vec<Vec<u8>>) {
        if stream == self.cfg.stream {
            // Our own entries relayed back to us: we are their source.
            return;
        }
        let next = self.next_expected(&stream);
        let last = first + entries.len() as u64 - 1;
        if last < next {
            if let Some(peer) = self.peers.get_mut(from) {
                peer.digest_due = true;
            }
            return;
        }
        if first > next {
            self.hold(&stream, first, entries);
            self.ask_for(from, stream, next);
            return;
        }
        let skip = (next - first) as usize;
        let entries: Vec<Vec<u8>> = entries.into_iter().skip(skip).collect();
        self.applying.insert(stream.clone(), last);
        self.out.push_back(Action::Apply {
            stream: stream.clone(),
            first: next,
            entries,
        });
        self.apply_held(&stream);
    }

    fn hold(&mut self, stream: &StreamId, first: u64, entries: Vec<Vec<u8>>) {
        let max = self.cfg.max_held;
        let held = self.held.entry(stream.clone()).or_default();
        for (i, entry) in entries.into_iter().enumerate() {
            if held.len() >= max {
                // The rest comes again through repair.
                break;
            }
            held.insert(first + i as u64, entry);
        }
    }

    fn ask_for(&mut self, from: &DcName, stream: StreamId, next: u64) {
        let now = self.now_ms;
        let retransmit = self.cfg.retransmit_ms;
        let Some(peer) = self.peers.get_mut(from) else { return };
        let recently = peer
            .need_sent_ms
            .get(&stream)
            .is_some_and(|&t| now.saturating_sub(t) < retransmit);
        if !recently {
            peer.need_sent_ms.insert(stream.clone(), now);
            self.send(from, Wire::Need { stream, from: next });
        }
    }

    /// Hands held entries that are now next in line to the store.
    fn apply_held(&mut self, stream: &StreamId) {
        let next = self.next_expected(stream);
        let Some(held) = self.held.get_mut(stream) else { return };
        // Drop what is no longer needed.
        while held.first_key_value().is_some_and(|(&seq, _)| seq < next) {
            held.pop_first();
        }
        let mut run = Vec::new();
        let mut seq = next;
        while let Some(entry) = held.remove(&seq) {
            run.push(entry);
            seq += 1;
        }
        if held.is_empty() {
            self.held.remove(stream);
        }
        if !run.is_empty() {
            self.applying.insert(stream.clone(), seq - 1);
            self.out.push_back(Action::Apply {
                stream: stream.clone(),
                first: next,
                entries: run,
            });
        }
    }

    /// Whether a peer has been silent so long that we stop keeping logs for it.
    fn decommissioned(&self, p: &Peer) -> bool {
        let heard = p.last_heard_ms.unwrap_or(p.since_ms).max(p.since_ms);
        self.now_ms.saturating_sub(heard) >= self.cfg.decommission_after_ms
    }

    fn truncate(&mut self) {
        let mut actions = Vec::new();
        for (stream, mine) in self.applied.iter() {
            let safe = self
                .peers
                .values()
                .filter(|p| !self.decommissioned(p))
                .map(|p| p.known.get(stream))
                .min()
                .unwrap_or(mine)
                .min(mine)
                .max(mine.saturating_sub(self.cfg.max_log_entries));
            if safe > self.truncated.get(stream) {
                actions.push((stream.clone(), safe));
            }
        }
        for (stream, through) in actions {
            self.truncated.advance(&stream, through);
            self.out.push_back(Action::Truncate { stream, through });
        }
    }
}
