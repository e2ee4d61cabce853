//! The edge: where client TCP connections arrive. It applies the connection limits (per
//! node and per address), waits out silent sockets cheaply, terminates TLS when it is
//! configured, and serves HTTP/1.1 — and with it the WebSocket upgrade — on what is left.
//!
//! Everything here bounds what a client can make the node hold before it has proved
//! anything: a socket that never speaks costs a task and a file descriptor, no buffers;
//! TLS and the request head each have [`EdgeLimits::handshake_timeout`] to complete; and a
//! node or address at its limit is refused with a short HTTP answer, not queued.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tower_service::Service;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("cannot load {path}: {detail}")]
    Load { path: PathBuf, detail: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Loads the certificate chain and key that clients' TLS is served with.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsConfigError> {
    let load = |path: &Path, detail: String| TlsConfigError::Load {
        path: path.to_owned(),
        detail,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| load(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(load(cert, "no certificate in file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| load(key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsConfigError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| TlsConfigError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[derive(Debug, Clone)]
pub struct EdgeLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// For a new socket's first byte, its TLS handshake and its request head, each.
    pub handshake_timeout: Duration,
}

/// Admission control: one permit per open connection, and a count per address.
pub struct Admission {
    limits: EdgeLimits,
    slots: Arc<Semaphore>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NodeFull,
    AddressFull,
}

/// A connection's place. Dropping the last clone gives it back; the WebSocket task holds
/// one, so an upgraded connection keeps its place until it closes.
pub struct Place {
    admission: Arc<Admission>,
    ip: IpAddr,
    _slot: OwnedSemaphorePermit,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut per_ip = self.admission.per_ip.lock().expect("per-ip lock");
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Attached to every request, so handlers know who is calling and can keep its place.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub place: Arc<Place>,
}

impl Admission {
    pub fn new(limits: EdgeLimits) -> Arc<Self> {
        Arc::new(Admission {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            per_ip: Mutex::new(HashMap::new()),
        })
    }

    pub fn limits(&self) -> &EdgeLimits {
        &self.limits
    }

    /// Takes a place for a connection from `ip`, or says why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Place, Refusal> {
        let slot = self.slots.clone().try_acquire_owned().map_err(|_| Refusal::NodeFull)?;
        let mut per_ip = self.per_ip.lock().expect("per-ip lock");
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.limits.max_connections_per_ip {
            return Err(Refusal::AddressFull);
        }
        *n += 1;
        Ok(Place {
            admission: self.clone(),
            ip,
            _slot: slot,
        })
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.slots.available_permits()
    }

    /// Waits until every connection has closed, or `timeout`; returns whether they all did.
    pub async fn drained(&self, timeout: Duration) -> bool {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        tokio::time::timeout(timeout, self.slots.acquire_many(all))
            .await
            .is_ok()
    }
}

/// Most refusals being answered at once; beyond it a refused socket is just closed, so a
/// flood of connections cannot make the node hold a task for each.
const REFUSALS_IN_FLIGHT: usize = 256;
/// How long a refused client has to send its request before the answer goes anyway.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Edge {
    pub admission: Arc<Admission>,
    pub tls: Option<TlsAcceptor>,
    pub app: Router,
    pub metrics: Arc<Metrics>,
    refusals: Arc<Semaphore>,
}

impl Edge {
    pub fn new(admission: Arc<Admission>, tls: Option<TlsAcceptor>, app: Router, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Edge {
            admission,
            tls,
            app,
            metrics,
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
        })
    }

    /// Accepts connections until `shutdown` changes.
    pub async fn run(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Frames are small and latency matters more than packet count: without
            // TCP_NODELAY a push can sit behind the peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            match self.admission.admit(peer.ip()) {
                Ok(place) => {
                    let info = ConnInfo {
                        peer,
                        place: Arc::new(place),
                    };
                    tokio::spawn(self.clone().serve(tcp, info, shutdown.clone()));
                }
                Err(refusal) => self.refuse(tcp, peer, refusal),
            }
        }
    }

    fn refuse(&self, tcp: TcpStream, peer: SocketAddr, refusal: Refusal) {
        self.metrics.refused(refusal);
        tracing::debug!(%peer, ?refusal, "connection refused");
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            return;
        };
        // Over TLS the client could not read a plain answer: just close.
        if self.tls.is_some() {
            return;
        }
        let limits = self.admission.limits().clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REFUSAL_TIMEOUT, answer_refusal(tcp, refusal, &limits)).await;
            drop(permit);
        });
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, info: ConnInfo, shutdown: watch::Receiver<bool>) {
        let timeout = self.admission.limits().handshake_timeout;
        // Until the client says something, hold nothing but the socket: HTTP and TLS
        // buffers are only allocated once there is something to read.
        // `peek` waits for a byte that is really there; `readable` may wake at once.
        if tokio::time::timeout(timeout, tcp.peek(&mut [0u8; 1])).await.is_err() {
            tracing::debug!(peer = %info.peer, "dropping a connection that sent nothing");
            return;
        }
        // Boxed so that the waiting above holds a pointer, not the state of HTTP and TLS.
        Box::pin(self.handshake(tcp, info, shutdown)).await;
    }

    async fn handshake(&self, tcp: TcpStream, info: ConnInfo, shutdown: watch::Receiver<bool>) {
        let timeout = self.admission.limits().handshake_timeout;
        match &self.tls {
            None => self.serve_http(tcp, info, shutdown).await,
            Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => self.serve_http(tls, info, shutdown).await,
                Ok(Err(e)) => tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %info.peer, "TLS handshake timed out"),
            },
        }
    }

    async fn serve_http<IO>(&self, io: IO, info: ConnInfo, mut shutdown: watch::Receiver<bool>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let app = self.app.clone();
        let peer = info.peer;
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(info.clone());
            let mut app = app.clone();
            async move { Ok::<_, Infallible>(app.call(request).await.unwrap_or_else(|never| match never {})) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.admission.limits().handshake_timeout)
            .max_buf_size(MAX_REQUEST_HEAD)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            _ = shutdown.changed() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// The largest request head (request line and headers) a client may send.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// Reads (and ignores) the start of the refused client's request, so that it is ready to
/// read the answer, then answers and closes.
async fn answer_refusal(mut tcp: TcpStream, refusal: Refusal, limits: &EdgeLimits) {
    let mut head = [0u8; 1024];
    let _ = tcp.read(&mut head).await;
    let (status, code, message) = match refusal {
        Refusal::NodeFull => (
            "503 Service Unavailable",
            chinwag_proto::ErrorCode::ServerBusy,
            format!("this node is at its limit of {} connections", limits.max_connections),
        ),
        Refusal::AddressFull => (
            "429 Too Many Requests",
            chinwag_proto::ErrorCode::TooManyConnections,
            format!(
                "this address has {} connections open, the most allowed",
                limits.max_connections_per_ip
            ),
        ),
    };
    let body = chinwag_proto::encode_server(&chinwag_proto::ServerFrame::Error {
        code,
        message,
        client_id: None,
        retry_after_ms: Some(1000),
    });
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(response.as_bytes()).await;
    let _ = tcp.shutdown().await;
}
