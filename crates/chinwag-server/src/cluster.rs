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
use chinwag_replication::{Action, Config as ReplConfig, PeerStatus, Replicator, StreamId, VersionVector};
use chinwag_store::EmbeddedStore;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::Serialize;
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
    pub peers: Vec<PeerView>,
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
    };
    tokio::spawn(driver.run(events, t.anti_entropy_interval, shutdown));
    Ok(status)
}

type Applying = Pin<Box<dyn Future<Output = (StreamId, Result<u64, StoreError>)> + Send>>;

struct Driver {
    replicator: Replicator,
    store: Arc<EmbeddedStore>,
    links: BTreeMap<DcName, LinkHandle>,
    counters: Counters,
    status: watch::Sender<ClusterStatus>,
    gateway: SocketAddr,
    dropped_sends: u64,
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
                    self.replicator.on_tick(now_ms(), &*self.store);
                    self.publish_status();
                }
                Some((stream, result)) = applying.next() => match result {
                    Ok(through) => self.replicator.on_applied(&stream, through, &*self.store),
                    Err(e) => tracing::warn!(%stream, error = %e, "applying replicated entries failed; they will be sent again"),
                },
                _ = shutdown.changed() => return,
            }
            self.carry_out(&mut applying);
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Up { peer, link } => {
                // A newer link replaces an older one; dropping the old handle closes it.
                self.links.insert(peer.clone(), link);
                self.replicator.on_connected(&peer, now_ms());
            }
            Event::Down { peer, link } => {
                if self.links.get(&peer).is_some_and(|l| l.id == link) {
                    self.links.remove(&peer);
                    self.replicator.on_disconnected(&peer);
                }
            }
            Event::Message { peer, msg } => self.replicator.on_message(&peer, msg, now_ms(), &*self.store),
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
                    applying.push(Box::pin(async move { (stream, ingest.await) }));
                }
                Action::Truncate { stream, through } => {
                    self.store.truncate(stream, through);
                }
            }
        }
    }

    fn publish_status(&self) {
        let peers = self
            .replicator
            .status()
            .into_iter()
            .map(|p| self.peer_view(p))
            .collect();
        let status = ClusterStatus {
            dc: self.replicator.config().me.to_string(),
            stream: self.replicator.config().stream.to_string(),
            gateway: Some(self.gateway.to_string()),
            applied: vv_map(self.replicator.applied()),
            peers,
        };
        self.status.send_replace(status);
    }

    fn peer_view(&self, p: PeerStatus) -> PeerView {
        let c = self.counters.get(&p.dc);
        let load = |f: fn(&chinwag_gateway::PeerCounters) -> &std::sync::atomic::AtomicU64| {
            c.map_or(0, |c| f(c).load(Ordering::Relaxed))
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
        }
    }
}
