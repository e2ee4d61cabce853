//! The message gateway: one mutually authenticated TLS link to each peer DC.
//!
//! A gateway listens for peers and dials every configured peer, with backoff while it is
//! down. It accepts any DC holding a certificate from the cluster CA, configured or not,
//! which is how a new DC joins without the others restarting. When two links to the same
//! peer exist (both sides dialled), both sides keep the one dialled by the DC whose name
//! sorts first. Each link becomes events for the replication driver: it came up (with a
//! handle to send on), a message arrived, it went down. Frames are a 4-byte big-endian
//! length and a postcard-encoded [`Wire`] message; a frame that does not decode is
//! logged, counted and skipped, and the link carries on. What to send, and when, is
//! decided elsewhere.

pub mod pki;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chinwag_core::DcName;
use chinwag_replication::wire::{self, MAX_FRAME_BYTES, Wire};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

pub use tls::{Tls, TlsError, TlsFiles};

/// A link with no frame for this long is considered dead and closed; peers send a
/// keepalive well within it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most inbound TLS handshakes in progress at once. Until its certificate is checked a
/// connection could come from anyone, and each costs a task, a socket and TLS state for
/// up to [`CONNECT_TIMEOUT`]; beyond this a new one is closed at once. Links do not
/// depend on it alone: each DC also dials its peers.
pub const MAX_HANDSHAKES: usize = 64;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub me: DcName,
    pub listen: SocketAddr,
    /// Every other DC and the address of its gateway.
    pub peers: Vec<(DcName, String)>,
    /// Frames queued per link before sends are dropped (replication repairs drops).
    pub queue: usize,
}

/// A live link: send encoded frames with [`LinkHandle::send`].
#[derive(Clone, Debug)]
pub struct LinkHandle {
    pub id: u64,
    frames: mpsc::Sender<Vec<u8>>,
}

impl LinkHandle {
    /// Queues a message; false if the link's queue is full or the link is gone.
    pub fn send(&self, msg: &Wire) -> bool {
        self.frames.try_send(wire::encode(msg)).is_ok()
    }

    /// Queues a message, waiting for room; false if the link is gone.
    pub async fn send_wait(&self, msg: &Wire) -> bool {
        self.frames.send(wire::encode(msg)).await.is_ok()
    }
}

#[derive(Debug)]
pub enum Event {
    Up {
        peer: DcName,
        link: LinkHandle,
    },
    /// `link` says which: a replaced link's last frames can still arrive after its
    /// successor's `Up`, and must then be ignored.
    Message {
        peer: DcName,
        link: u64,
        msg: Wire,
    },
    Down {
        peer: DcName,
        link: u64,
    },
}

/// Traffic counters of one peer.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub frames_rejected: AtomicU64,
}

/// Counters of every peer seen so far.
#[derive(Debug, Default)]
pub struct Counters(RwLock<BTreeMap<DcName, Arc<PeerCounters>>>);

impl Counters {
    pub fn get(&self, peer: &DcName) -> Option<Arc<PeerCounters>> {
        self.0.read().expect("counters lock").get(peer).cloned()
    }

    fn entry(&self, peer: &DcName) -> Arc<PeerCounters> {
        if let Some(c) = self.get(peer) {
            return c;
        }
        self.0
            .write()
            .expect("counters lock")
            .entry(peer.clone())
            .or_default()
            .clone()
    }
}

/// Starts the gateway: binds, accepts and dials in background tasks until `shutdown`.
pub async fn start(
    cfg: GatewayConfig,
    tls: Tls,
    events: mpsc::Sender<Event>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, Arc<Counters>)> {
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    for (peer, _) in &cfg.peers {
        counters.entry(peer);
    }
    let shared = Arc::new(Shared {
        cfg,
        tls,
        events,
        counters: counters.clone(),
        next_link: AtomicU64::new(1),
        links: Mutex::new(BTreeMap::new()),
    });
    tokio::spawn(accept_loop(shared.clone(), listener, shutdown.clone()));
    for (peer, address) in shared.cfg.peers.clone() {
        tokio::spawn(dial_loop(shared.clone(), peer, address, shutdown.clone()));
    }
    Ok((addr, counters))
}

struct Shared {
    cfg: GatewayConfig,
    tls: Tls,
    events: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    next_link: AtomicU64,
    /// The live link to each peer.
    links: Mutex<BTreeMap<DcName, Slot>>,
}

struct Slot {
    id: u64,
    dialed_by_me: bool,
    close: watch::Sender<bool>,
}

impl Shared {
    /// Registers a new link unless a better one exists; returns its close signal.
    fn admit(&self, peer: &DcName, id: u64, dialed_by_me: bool) -> Option<watch::Receiver<bool>> {
        let mut links = self.links.lock().expect("links lock");
        // Both sides prefer the link dialled by the DC whose name sorts first.
        let preferred = |dialed_by_me: bool| dialed_by_me == (self.cfg.me < *peer);
        if let Some(existing) = links.get(peer)
            && preferred(existing.dialed_by_me)
            && !preferred(dialed_by_me)
        {
            return None;
        }
        let (close, closed) = watch::channel(false);
        if let Some(old) = links.insert(
            peer.clone(),
            Slot {
                id,
                dialed_by_me,
                close,
            },
        ) {
            old.close.send_replace(true);
        }
        Some(closed)
    }

    fn release(&self, peer: &DcName, id: u64) {
        let mut links = self.links.lock().expect("links lock");
        if links.get(peer).is_some_and(|s| s.id == id) {
            links.remove(peer);
        }
    }

    fn linked(&self, peer: &DcName) -> bool {
        self.links.lock().expect("links lock").contains_key(peer)
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, from) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "gateway could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%from, "gateway refused a connection: {MAX_HANDSHAKES} handshakes in progress");
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let handshake = tokio::time::timeout(CONNECT_TIMEOUT, shared.tls.acceptor.accept(tcp)).await;
            drop(permit);
            let stream = match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return tracing::warn!(%from, error = %e, "gateway refused a peer: TLS handshake failed"),
                Err(_) => return tracing::warn!(%from, "gateway refused a peer: handshake timed out"),
            };
            let me = &shared.cfg.me;
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| tls::identify(c, me));
            match peer {
                Some(peer) => run_link(&shared, peer, stream, false, shutdown).await,
                None => tracing::warn!(%from, "gateway refused a peer: its certificate names no DC"),
            }
        });
    }
}

async fn dial_loop(shared: Arc<Shared>, peer: DcName, address: String, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if shared.linked(&peer) {
            // The peer dialled us; nothing to do while that link lives.
            backoff = BACKOFF_MIN;
        } else {
            match dial(&shared, &peer, &address).await {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    run_link(&shared, peer.clone(), stream, true, shutdown.clone()).await;
                }
                Err(e) => tracing::debug!(%peer, %address, error = %e, "gateway dial failed"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn dial(
    shared: &Shared,
    peer: &DcName,
    address: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let timeout = |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(timeout)??;
    tcp.set_nodelay(true)?;
    let name = tls::server_name(peer).map_err(std::io::Error::other)?;
    tokio::time::timeout(CONNECT_TIMEOUT, shared.tls.connector.connect(name, tcp))
        .await
        .map_err(timeout)?
}

/// Runs one established link until either direction fails or the node shuts down.
async fn run_link<S>(shared: &Shared, peer: DcName, stream: S, dialed_by_me: bool, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let id = shared.next_link.fetch_add(1, Ordering::Relaxed);
    let Some(mut replaced) = shared.admit(&peer, id, dialed_by_me) else {
        tracing::debug!(%peer, "gateway dropped a second link to a linked peer");
        return;
    };
    let (frames_tx, mut frames_rx) = mpsc::channel::<Vec<u8>>(shared.cfg.queue);
    let link = LinkHandle { id, frames: frames_tx };
    if shared
        .events
        .send(Event::Up {
            peer: peer.clone(),
            link,
        })
        .await
        .is_err()
    {
        shared.release(&peer, id);
        return;
    }
    tracing::info!(%peer, link = id, "gateway link up");
    let counters = shared.counters.entry(&peer);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let reader = async {
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut rd)).await {
                Ok(Ok(frame)) => frame,
                Ok(Err(e)) => return format!("read: {e}"),
                Err(_) => return "idle timeout".to_owned(),
            };
            counters.bytes_in.fetch_add(frame.len() as u64 + 4, Ordering::Relaxed);
            match wire::decode(&frame) {
                Ok(msg) => {
                    if shared
                        .events
                        .send(Event::Message {
                            peer: peer.clone(),
                            link: id,
                            msg,
                        })
                        .await
                        .is_err()
                    {
                        return "node stopping".to_owned();
                    }
                }
                Err(e) => {
                    counters.frames_rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%peer, error = %e, "gateway rejected a frame");
                }
            }
        }
    };
    let writer = async {
        while let Some(frame) = frames_rx.recv().await {
            if let Err(e) = write_frame(&mut wr, &frame).await {
                return format!("write: {e}");
            }
            counters.bytes_out.fetch_add(frame.len() as u64 + 4, Ordering::Relaxed);
            if frames_rx.is_empty()
                && let Err(e) = wr.flush().await
            {
                return format!("flush: {e}");
            }
        }
        "replaced".to_owned()
    };
    let why = tokio::select! {
        why = reader => why,
        why = writer => why,
        _ = replaced.wait_for(|r| *r) => "replaced by a newer link".to_owned(),
        _ = shutdown.changed() => "node stopping".to_owned(),
    };
    shared.release(&peer, id);
    tracing::info!(%peer, link = id, %why, "gateway link down");
    let _ = shared.events.send(Event::Down { peer, link: id }).await;
}

async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let len = r.read_u32().await? as usize;
    if len > MAX_FRAME_BYTES {
        // The length cannot be trusted, so neither can anything after it.
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes"),
        ));
    }
    let mut frame = vec![0; len];
    r.read_exact(&mut frame).await?;
    Ok(frame)
}

async fn write_frame(w: &mut (impl AsyncWrite + Unpin), frame: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len()).map_err(|_| std::io::Error::other("frame too large"))?;
    w.write_u32(len).await?;
    w.write_all(frame).await
}
