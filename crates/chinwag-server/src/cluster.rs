//! The multi-DC layer of a node: the gateway's links, the replication state machine and
//! the store, driven together by one task.
//!
//! Nothing here touches the messaging code. The store already writes every local change
//! to this DC's stream and applies other DCs' entries like any other write, pushing
//! arriving messages to online recipients through the same commit listener; this task only
//! moves entries between the store and the peers.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chinwag_core::{DcName, StoreError};
use chinwag_gateway::{Counters, Event, GatewayConfig, LinkHandle, TlsFiles};
use chinwag_replication::{Action, Config as ReplConfig, PeerStatus, Replicator, StreamId, VersionVector, Wire, wire};
use chinwag_store::EmbeddedStore;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;

use crate::metrics::Snapshot;
use tokio::sync::{mpsc, watch};

use crate::config::ClusterConfig;
use crate::connection::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster credentials: {0}")]
    Tls(#[from] chinwag_gateway::TlsError),
    #[error("cannot listen for peer gateways on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What `/v1/cluster` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterStatus {
    pub dc: String,
    pub stream: String,
    pub gateway: Option<String>,
    pub applied: BTreeMap<String, u64>,
    /// How far each stream's log has been dropped because every live peer has it.
    pub truncated: BTreeMap<String, u64>,
    pub peers: Vec<PeerView>,
    /// Every DC this one knows, itself first: what the cluster map draws.
    pub dcs: Vec<DcView>,
    /// Every pair of DCs, as far as this DC can tell: the map's lines.
    pub links: Vec<LinkView>,
}

/// The replication link between two DCs, seen from this one. For links this DC is on,
/// what it observes itself; between two peers, what their digests said.
#[derive(Debug, Clone, Serialize)]
pub struct LinkView {
    pub a: String,
    pub b: String,
    /// `Some(false)` if either end cannot hear the other; `None` if this DC cannot hear
    /// one of them and so does not know.
    pub up: Option<bool>,
    /// Entries one end has applied that the other has not, the larger of both ways.
    pub lag_entries: u64,
}

/// One DC on the cluster map.
#[derive(Debug, Clone, Serialize)]
pub struct DcView {
    pub dc: String,
    /// This DC itself, or a peer it hears from.
    pub up: bool,
    pub online_users: u64,
    /// Messages waiting in its mailboxes: this DC's own count, or what a peer last said.
    pub mailbox_depth: Option<u64>,
    /// Entries this DC has that the peer has not (none for this DC itself).
    pub lag_entries: Option<u64>,
}

impl ClusterStatus {
    /// Fills in [`ClusterStatus::dcs`] from the peers and this node's figures.
    pub fn with_dcs(mut self, snapshot: &Snapshot) -> Self {
        let online = |dc: &str| snapshot.online_users.get(dc).copied().unwrap_or(0);
        let me = DcView {
            dc: self.dc.clone(),
            up: true,
            online_users: online(&self.dc),
            mailbox_depth: Some(snapshot.mailbox_depth),
            lag_entries: None,
        };
        let peers = self.peers.iter().map(|p| DcView {
            dc: p.dc.clone(),
            up: p.reachable,
            online_users: online(&p.dc),
            mailbox_depth: p.mailbox_depth,
            lag_entries: Some(p.lag_entries),
        });
        self.dcs = std::iter::once(me).chain(peers).collect();
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub dc: String,
    pub connected: bool,
    pub reachable: bool,
    pub last_heard_ms_ago: Option<u64>,
    /// Entries this DC has applied that the peer has not (replication lag).
    pub lag_entries: u64,
    pub applied: BTreeMap<String, u64>,
    pub entries_sent: u64,
    pub entries_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub frames_rejected: u64,
    pub behind_log: bool,
    pub decommissioned: bool,
    pub mailbox_depth: Option<u64>,
}

/// Every pair among this DC and its peers (decommissioned ones left out).
fn links(me: &DcName, applied: &VersionVector, peers: &[PeerStatus]) -> Vec<LinkView> {
    let live: Vec<&PeerStatus> = peers.iter().filter(|p| !p.decommissioned).collect();
    let lag = |x: &VersionVector, y: &VersionVector| x.lead_over(y).max(y.lead_over(x));
    let mine = live.iter().map(|p| LinkView {
        a: me.to_string(),
        b: p.dc.to_string(),
        up: Some(p.reachable),
        lag_entries: lag(applied, &p.applied),
    });
    let theirs = live.iter().enumerate().flat_map(|(i, x)| {
        live[i + 1..].iter().map(move |y| LinkView {
            a: x.dc.to_string(),
            b: y.dc.to_string(),
            up: (x.reachable && y.reachable).then(|| !x.unreachable.contains(&y.dc) && !y.unreachable.contains(&x.dc)),
            lag_entries: lag(&x.applied, &y.applied),
        })
    });
    mine.chain(theirs).collect()
}

fn vv_map(vv: &VersionVector) -> BTreeMap<String, u64> {
    vv.iter().map(|(s, seq)| (s.to_string(), seq)).collect()
}

/// Starts the gateway and the replication driver.
pub async fn start(
    cfg: &ClusterConfig,
    me: DcName,
    peers: Vec<DcName>,
    store: Arc<EmbeddedStore>,
    shutdown: watch::Receiver<bool>,
) -> Result<watch::Receiver<ClusterStatus>, ClusterError> {
    let tls = chinwag_gateway::tls::load(&TlsFiles {
        ca: cfg.ca.clone(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    })?;
    let gateway = GatewayConfig {
        me: me.clone(),
        listen: cfg.gateway_listen,
        peers: peers
            .iter()
            .cloned()
            .zip(cfg.peers.iter().map(|p| p.gateway.clone()))
            .collect(),
        queue: cfg.link_queue,
    };
    let (events_tx, events) = mpsc::channel(4096);
    let (addr, counters) = chinwag_gateway::start(gateway, tls, events_tx, shutdown.clone())
        .await
        .map_err(|source| ClusterError::Listen {
            addr: cfg.gateway_listen,
            source,
        })?;
    let (applied, truncated) = store.replication_state()?;
    let t = &cfg.timing;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let repl = ReplConfig {
        tick_ms: ms(t.anti_entropy_interval),
        keepalive_ms: ms(t.keepalive),
        peer_timeout_ms: ms(t.peer_timeout),
        retransmit_ms: ms(t.retransmit),
        relay_after_ms: ms(t.relay_after),
        decommission_after_ms: ms(t.decommission_after),
        fanout: (cfg.gossip_fanout > 0).then_some(cfg.gossip_fanout),
        max_log_entries: cfg.max_log_entries,
        ..ReplConfig::wan(me.clone(), store.stream().clone(), peers)
    };
    let replicator = Replicator::new(repl, applied, truncated, now_ms());
    let (status_tx, status) = watch::channel(ClusterStatus::default());
    tracing::info!(dc = %me, gateway = %addr, stream = %store.stream(), "replication started");
    let driver = Driver {
        replicator,
        store,
        links: BTreeMap::new(),
        counters,
        status: status_tx,
        gateway: addr,
        dropped_sends: 0,
        incoming: Incoming::default(),
        sending: BTreeMap::new(),
    };
    tokio::spawn(driver.run(events, t.anti_entropy_interval, shutdown));
    Ok(status)
}

/// What the store finished for the replicator.
enum Done {
    Applied(StreamId, Result<u64, StoreError>),
    Merged(Result<VersionVector, StoreError>),
    /// A request whose only answer worth acting on is a failure, which is logged.
    Requested(String, Result<(), StoreError>),
}

type Applying = Pin<Box<dyn Future<Output = Done> + Send>>;

/// Most snapshot items accepted from one sender; a larger state is refused rather than
/// exhausting memory (the sender retries later).
const MAX_SNAPSHOT_ITEMS: usize = 5_000_000;
/// Most items, and most bytes of items, per snapshot part on the wire: a quarter of the
/// transport's frame limit, so a part of long messages still fits a frame.
const SNAPSHOT_PART_ITEMS: usize = 1024;
const SNAPSHOT_PART_BYTES: usize = wire::MAX_FRAME_BYTES / 4;

struct Driver {
    replicator: Replicator,
    store: Arc<EmbeddedStore>,
    links: BTreeMap<DcName, LinkHandle>,
    counters: Arc<Counters>,
    status: watch::Sender<ClusterStatus>,
    gateway: SocketAddr,
    dropped_sends: u64,
    incoming: Incoming,
    /// The snapshot being sent to each peer. Never two at once to one peer: their parts
    /// would interleave on the link, and the receiver, merging one snapshot's last part
    /// with the other's first ones, would take what is missing for acknowledged.
    sending: BTreeMap<DcName, tokio::task::JoinHandle<()>>,
}

impl Driver {
    async fn run(mut self, mut events: mpsc::Receiver<Event>, tick: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut head = self.store.log_head();
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut applying: FuturesUnordered<Applying> = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                Ok(()) = head.changed() => {
                    let through = *head.borrow_and_update();
                    self.replicator.on_local(through, &*self.store);
                }
                _ = ticker.tick() => {
                    self.replicator.set_mailbox_depth(self.store.mailbox_depth());
                    self.replicator.on_tick(now_ms(), &*self.store);
                    self.publish_status();
                }
                Some(done) = applying.next() => match done {
                    Done::Applied(stream, Ok(through)) => self.replicator.on_applied(&stream, through, &*self.store),
                    Done::Applied(stream, Err(e)) => {
                        tracing::warn!(%stream, error = %e, "applying replicated entries failed; they will be sent again");
                    }
                    Done::Merged(Ok(applied)) => {
                        tracing::info!(?applied, "merged a snapshot");
                        self.replicator.on_snapshot_merged(&applied, &*self.store);
                    }
                    Done::Merged(Err(e)) => tracing::warn!(error = %e, "merging a snapshot failed; it will be sent again"),
                    Done::Requested(what, Err(e)) => tracing::warn!(error = %e, "store could not {what}"),
                    Done::Requested(_, Ok(())) => {}
                },
                _ = shutdown.changed() => return,
            }
            self.carry_out(&mut applying);
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Up { peer, link } => {
                if !self.replicator.knows(&peer) {
                    tracing::info!(%peer, "a new DC joined the cluster");
                    self.replicator.add_peer(&peer, now_ms());
                }
                // A newer link replaces an older one; dropping the old handle closes it.
                self.links.insert(peer.clone(), link);
                self.incoming.forget(&peer);
                self.replicator.on_connected(&peer, now_ms());
            }
            Event::Down { peer, link } => {
                if self.links.get(&peer).is_some_and(|l| l.id == link) {
                    self.links.remove(&peer);
                    self.replicator.on_disconnected(&peer);
                }
            }
            Event::Message { peer, link, msg } => {
                // From a link since replaced: its stale snapshot parts would mix with the
                // next snapshot's, and a stale `Hello` would set us back.
                if self.links.get(&peer).is_some_and(|l| l.id == link) {
                    self.replicator.on_message(&peer, msg, now_ms(), &*self.store);
                }
            }
        }
    }

    fn carry_out(&mut self, applying: &mut FuturesUnordered<Applying>) {
        while let Some(action) = self.replicator.poll_action() {
            match action {
                Action::Send { to, msg } => {
                    let sent = self.links.get(&to).is_some_and(|link| link.send(&msg));
                    if !sent {
                        // Repaired by retransmission once the link has room again.
                        self.dropped_sends += 1;
                    }
                }
                Action::Apply { stream, first, entries } => {
                    // Queued to the store now, so batches of one stream stay in order.
                    let ingest = self.store.ingest(stream.clone(), first, entries);
                    applying.push(Box::pin(async move { Done::Applied(stream, ingest.await) }));
                }
                Action::SendSnapshot { to } => self.send_snapshot(to),
                Action::Forget { dc } => {
                    tracing::warn!(%dc, "DC silent past decommission_after: forgetting its coordinates");
                    let forget = self.store.forget_coordinates(dc.clone());
                    let what = format!("forget the coordinates of {dc}");
                    applying.push(Box::pin(async move { Done::Requested(what, forget.await) }));
                }
                Action::MergeSnapshot {
                    from,
                    applied,
                    items,
                    last,
                } => {
                    if let Some(items) = self.incoming.receive(&from, items, last, MAX_SNAPSHOT_ITEMS) {
                        let merge = self.store.merge_snapshot(applied, items);
                        applying.push(Box::pin(async move { Done::Merged(merge.await) }));
                    }
                }
                Action::Truncate { stream, through } => {
                    let what = format!("drop the log of {stream} through {through}");
                    let truncate = self.store.truncate(stream, through);
                    applying.push(Box::pin(async move { Done::Requested(what, truncate.await) }));
                }
            }
        }
    }

    /// Streams a snapshot of this store to `to` in the background, waiting for room on
    /// the link rather than dropping parts. If one is still on its way, that one stands.
    fn send_snapshot(&mut self, to: DcName) {
        if self.sending.get(&to).is_some_and(|task| !task.is_finished()) {
            return tracing::debug!(peer = %to, "a snapshot is still being sent");
        }
        let Some(link) = self.links.get(&to).cloned() else {
            return;
        };
        let store = self.store.clone();
        let peer = to.clone();
        let task = tokio::spawn(async move {
            let built = tokio::task::spawn_blocking(move || store.snapshot()).await;
            let Ok(Ok((applied, items))) = built else {
                return tracing::warn!(%peer, "could not build a snapshot");
            };
            tracing::info!(%peer, items = items.len(), "sending a snapshot");
            let parts = snapshot_parts(&items);
            let last = parts.len() - 1;
            for (i, part) in parts.into_iter().enumerate() {
                let msg = Wire::Snapshot {
                    applied: applied.clone(),
                    items: part.to_vec(),
                    last: i == last,
                };
                if !link.send_wait(&msg).await {
                    return;
                }
            }
        });
        self.sending.insert(to, task);
    }

    fn publish_status(&self) {
        let statuses = self.replicator.status();
        let links = links(&self.replicator.config().me, self.replicator.applied(), &statuses);
        let peers = statuses.into_iter().map(|p| self.peer_view(p)).collect();
        let status = ClusterStatus {
            dc: self.replicator.config().me.to_string(),
            stream: self.replicator.config().stream.to_string(),
            gateway: Some(self.gateway.to_string()),
            applied: vv_map(self.replicator.applied()),
            truncated: vv_map(self.replicator.truncated()),
            peers,
            dcs: Vec::new(),
            links,
        };
        self.status.send_replace(status);
    }

    fn peer_view(&self, p: PeerStatus) -> PeerView {
        let c = self.counters.get(&p.dc);
        let load = |f: fn(&chinwag_gateway::PeerCounters) -> &std::sync::atomic::AtomicU64| {
            c.as_deref().map_or(0, |c| f(c).load(Ordering::Relaxed))
        };
        PeerView {
            dc: p.dc.to_string(),
            connected: p.connected,
            reachable: p.reachable,
            last_heard_ms_ago: p.last_heard_ms_ago,
            lag_entries: p.lag_entries,
            applied: vv_map(&p.applied),
            entries_sent: p.entries_sent,
            entries_received: p.entries_received,
            bytes_sent: load(|c| &c.bytes_out),
            bytes_received: load(|c| &c.bytes_in),
            frames_rejected: load(|c| &c.frames_rejected),
            behind_log: p.behind_log,
            decommissioned: p.decommissioned,
            mailbox_depth: p.mailbox_depth,
        }
    }
}

/// Snapshot parts received so far, per sender. A snapshot is merged whole or not at all:
/// the merge takes a message missing from it for acknowledged.
#[derive(Default)]
struct Incoming(BTreeMap<DcName, Option<Vec<Vec<u8>>>>);

impl Incoming {
    /// Takes one part; returns the whole snapshot with its last part. One that grows past
    /// `max_items` is refused: its later parts are dropped too, up to and with its last.
    fn receive(&mut self, from: &DcName, items: Vec<Vec<u8>>, last: bool, max_items: usize) -> Option<Vec<Vec<u8>>> {
        let parts = self.0.entry(from.clone()).or_insert_with(|| Some(Vec::new()));
        match parts {
            Some(held) if held.len() + items.len() <= max_items => held.extend(items),
            Some(_) => {
                tracing::warn!(%from, "snapshot larger than {max_items} items refused");
                *parts = None;
            }
            None => {}
        }
        if last { self.0.remove(from).flatten() } else { None }
    }

    /// The link to `peer` was replaced: what came on the old one is incomplete.
    fn forget(&mut self, peer: &DcName) {
        self.0.remove(peer);
    }
}

/// Cuts a snapshot into the parts sent one frame each: in order, each within
/// [`SNAPSHOT_PART_ITEMS`] and [`SNAPSHOT_PART_BYTES`] (an item larger than that alone),
/// and at least one part, possibly empty, so the receiver always gets a last one.
fn snapshot_parts(items: &[Vec<u8>]) -> Vec<&[Vec<u8>]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let full = i - start == SNAPSHOT_PART_ITEMS || bytes + item.len() > SNAPSHOT_PART_BYTES;
        if full && i > start {
            parts.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += item.len();
    }
    if start < items.len() || parts.is_empty() {
        parts.push(&items[start..]);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(parts: &[&[Vec<u8>]]) -> Vec<(usize, usize)> {
        parts.iter().map(|p| (p.len(), p.iter().map(Vec::len).sum())).collect()
    }

    #[test]
    fn a_snapshot_is_given_whole_or_not_at_all() {
        let (east, west) = (DcName::parse("east").unwrap(), DcName::parse("west").unwrap());
        let items = |n: u8| (0..n).map(|i| vec![i]).collect::<Vec<_>>();
        let mut incoming = Incoming::default();
        assert_eq!(incoming.receive(&east, items(2), false, 5), None);
        assert_eq!(incoming.receive(&west, items(1), true, 5), Some(items(1)));
        assert_eq!(incoming.receive(&east, items(3), true, 5).map(|s| s.len()), Some(5));
        // Too large: neither the rest of it nor its last part may be merged alone.
        assert_eq!(incoming.receive(&east, items(4), false, 5), None);
        assert_eq!(incoming.receive(&east, items(2), false, 5), None);
        assert_eq!(incoming.receive(&east, items(1), false, 5), None);
        assert_eq!(incoming.receive(&east, items(1), true, 5), None);
        // The next snapshot starts afresh.
        assert_eq!(incoming.receive(&east, items(2), true, 5), Some(items(2)));
        // Parts from a replaced link are dropped.
        assert_eq!(incoming.receive(&east, items(2), false, 5), None);
        incoming.forget(&east);
        assert_eq!(incoming.receive(&east, items(1), true, 5), Some(items(1)));
    }

    #[test]
    fn an_empty_snapshot_is_one_empty_part() {
        assert_eq!(sizes(&snapshot_parts(&[])), vec![(0, 0)]);
    }

    #[test]
    fn parts_keep_every_item_in_order_within_both_limits() {
        let big = SNAPSHOT_PART_BYTES / 3;
        let items: Vec<Vec<u8>> = (0..10)
            .map(|i| vec![i; big])
            .chain((0..2_500).map(|i| vec![i as u8; 10]))
            .collect();
        let parts = snapshot_parts(&items);
        assert_eq!(parts.concat(), items);
        for (count, bytes) in sizes(&parts) {
            assert!((1..=SNAPSHOT_PART_ITEMS).contains(&count), "{count} items");
            assert!(bytes <= SNAPSHOT_PART_BYTES, "{bytes} bytes");
        }
        // Three long items fill a part by bytes; the short ones fill parts by count.
        assert_eq!(sizes(&parts)[0], (3, 3 * big));
    }

    #[test]
    fn an_item_over_the_byte_limit_goes_alone() {
        let items = vec![vec![1; 10], vec![2; SNAPSHOT_PART_BYTES + 1], vec![3; 10]];
        assert_eq!(
            sizes(&snapshot_parts(&items)),
            vec![(1, 10), (1, SNAPSHOT_PART_BYTES + 1), (1, 10)]
        );
    }
}
