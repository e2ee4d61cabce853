//! One access node: composition of store, router, sessions and the HTTP front end.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chinwag_auth::{KeyError, TokenKey, TokenPolicy, Verifier};
use chinwag_core::{Authenticate, CommitListener, Delivery, SessionLimits, Store};
use chinwag_store::{EmbeddedStore, OpenError, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::cluster::{ClusterError, ClusterStatus};
use crate::config::{Config, ConfigError};
use crate::metrics::{CommitMetrics, Metrics, Snapshot, Snapshotter};
use crate::registry::Registry;

/// Everything connections and HTTP handlers share.
pub struct NodeState<S> {
    pub config: Config,
    pub store: Arc<S>,
    pub registry: Arc<Registry>,
    pub auth: Arc<dyn Authenticate>,
    pub limits: Arc<SessionLimits>,
    pub metrics: Arc<Metrics>,
    /// Changes once, when the node begins to shut down.
    pub shutdown: watch::Receiver<bool>,
    /// One permit per allowed connection.
    pub connection_slots: Arc<Semaphore>,
    pub incarnation: u64,
    /// The multi-DC layer's view, when this DC has peers.
    pub cluster: Option<watch::Receiver<ClusterStatus>>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    TokenKey(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] OpenError),
    #[error("serving HTTP failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

/// How long shutdown waits for connections to close before closing the store anyway.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A node that has opened its store and is ready to accept connections.
pub struct Node {
    state: Arc<NodeState<EmbeddedStore>>,
    listener: TcpListener,
    stop: watch::Sender<bool>,
}

impl Node {
    /// Prepares a node: validates the config, loads the token key, opens the store and
    /// begins this node's incarnation. Nothing is served until [`Node::serve`].
    pub async fn start(config: Config, listener: TcpListener) -> Result<Node, NodeError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data).map_err(|source| NodeError::DataDir {
            path: config.data.clone(),
            source,
        })?;
        let key = TokenKey::load_or_create(&config.token_key_path())?;
        let policy = TokenPolicy {
            issuer: config.tokens.issuer.clone(),
            audience: config.tokens.audience.clone(),
        };

        let registry = Arc::new(Registry::new(
            config.dc_name(),
            config.node_name(),
            config.limits.send_queue,
        ));
        let delivery = Arc::new(Delivery::new(registry.clone()));
        let commit_metrics = CommitMetrics::default();
        let observer = commit_metrics.clone();
        let store = Arc::new(EmbeddedStore::open(
            &config.data,
            store_options(&config),
            delivery.clone() as Arc<dyn CommitListener>,
            Box::new(move |took, ops| observer.observe(took, ops)),
        )?);
        let incarnation = store.incarnation();
        registry.set_incarnation(incarnation);
        let (stop, stop_rx) = watch::channel(false);
        let cluster = match &config.cluster {
            Some(cluster) => Some(
                crate::cluster::start(
                    cluster,
                    config.dc_name(),
                    config.peer_names(),
                    store.clone(),
                    stop_rx.clone(),
                )
                .await?,
            ),
            None => None,
        };

        let snapshotter = Snapshotter {
            read: {
                let (store, registry) = (store.clone(), registry.clone());
                Box::new(move || {
                    let stats = store.stats();
                    Snapshot {
                        connections: registry.len() as u64,
                        mailbox_depth: stats.mailbox_depth,
                        coordinates: stats.coordinates,
                        replicated_in: stats.replicated_in,
                    }
                })
            },
            delivery: delivery.stats(),
            cluster: cluster.clone(),
        };
        let state = Arc::new(NodeState {
            limits: Arc::new(config.session_limits()),
            connection_slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            config,
            store,
            registry,
            auth: Arc::new(Verifier::new(&key, &policy)),
            metrics: Arc::new(Metrics::new(snapshotter, commit_metrics)),
            shutdown: stop_rx,
            incarnation,
            cluster,
        });
        tracing::info!(
            dc = %state.config.dc,
            node = %state.config.node,
            incarnation,
            data = %state.config.data.display(),
            "node started"
        );
        Ok(Node { state, listener, stop })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every connection and the store.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
        let Node { state, listener, stop } = self;
        let app = crate::http::router(state.clone());
        // Frames are small and latency matters more than packet count: without TCP_NODELAY a
        // push can sit behind the peer's delayed ACK for tens of milliseconds.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                // Tell every connection to close; axum waits for them before returning.
                let _ = stop.send(true);
            })
            .await;
        drain(&state).await;
        state.store.close().await;
        tracing::info!("node stopped");
        served.map_err(NodeError::Serve)
    }
}

/// Runs a node on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    Node::start(config, listener).await?.serve(shutdown).await
}

async fn drain<S: Store>(state: &NodeState<S>) {
    let all = u32::try_from(state.config.limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, state.connection_slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(open = state.registry.len(), "connections still open at shutdown");
    }
}

fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        dc: config.dc_name(),
        node: config.node_name(),
        mailbox_max_messages: config.limits.mailbox_max_messages,
        commit_batch_max: config.store.commit_batch_max,
        queue: config.store.queue,
        dedup_window: config.store.dedup_window,
        replicate: config.cluster.is_some(),
    }
}
