//! One access node: composition of store, router, sessions and the HTTP front end.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chinwag_auth::{KeyError, TokenKey, TokenPolicy, Verifier};
use chinwag_core::ratelimit::UserBuckets;
use chinwag_core::{Authenticate, CommitListener, Delivery, SessionLimits, Store};
use chinwag_store::{EmbeddedStore, OpenError, StoreMemory, StoreOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::{ClusterError, ClusterStatus};
use crate::config::{Config, ConfigError};
use crate::edge::{Admission, Edge, TlsConfigError};
use crate::metrics::{CommitMetrics, Metrics, ReadSnapshot, Snapshot, Snapshotter};
use crate::registry::Registry;

/// Everything connections and HTTP handlers share.
pub struct NodeState<S> {
    pub config: Config,
    pub store: Arc<S>,
    pub registry: Arc<Registry>,
    pub auth: Arc<dyn Authenticate>,
    pub limits: Arc<SessionLimits>,
    /// Per-user send rate, across the user's connections to this node.
    pub user_buckets: Arc<UserBuckets>,
    pub metrics: Arc<Metrics>,
    /// Changes once, when the node begins to shut down.
    pub shutdown: watch::Receiver<bool>,
    /// Connection limits, shared with the edge that accepts connections.
    pub admission: Arc<Admission>,
    pub incarnation: u64,
    /// The multi-DC layer's view, when this DC has peers.
    pub cluster: Option<watch::Receiver<ClusterStatus>>,
    /// Current figures of this node, for metrics and the cluster view.
    pub snapshot: ReadSnapshot,
    /// Set only when `dev.sign_in` is on: mints tokens for anyone who asks.
    pub dev_tokens: Option<DevTokens>,
}

/// The token key and policy, for the development sign-in.
pub struct DevTokens {
    pub key: TokenKey,
    pub policy: TokenPolicy,
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
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
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
    tls: Option<tokio_rustls::TlsAcceptor>,
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
        let tls = match &config.tls {
            Some(tls) => Some(crate::edge::tls_acceptor(&tls.cert, &tls.key)?),
            None => None,
        };
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
            Box::new(move |commit| observer.observe(commit)),
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

        let dev_tokens = config.dev.sign_in.then(|| {
            tracing::warn!(
                "DEVELOPMENT SIGN-IN IS ON (dev.sign_in): anyone who can reach this node can sign in \
                 as any user. Never enable it on a node that serves real users."
            );
            DevTokens {
                key: key.clone(),
                policy: policy.clone(),
            }
        });
        let admission = Admission::new(config.edge_limits());
        let snapshot: ReadSnapshot = {
            let (store, registry, admission) = (store.clone(), registry.clone(), admission.clone());
            Arc::new(move || {
                let stats = store.stats();
                Snapshot {
                    connections: registry.len() as u64,
                    sockets: admission.open() as u64,
                    mailbox_depth: stats.mailbox_depth,
                    coordinates: stats.coordinates,
                    replicated_in: stats.replicated_in,
                    online_users: stats.online_users.iter().map(|(dc, n)| (dc.to_string(), *n)).collect(),
                }
            })
        };
        let engine = store.clone();
        let snapshotter = Snapshotter {
            read: snapshot.clone(),
            engine: Arc::new(move || engine.engine_stats()),
            delivery: delivery.stats(),
            cluster: cluster.clone(),
        };
        let state = Arc::new(NodeState {
            limits: Arc::new(config.session_limits()),
            user_buckets: Arc::new(UserBuckets::new(
                config.limits.user_rate_per_sec,
                config.limits.user_burst,
                config.limits.max_connections,
            )),
            admission,
            config,
            store,
            registry,
            auth: Arc::new(Verifier::new(&key, &policy)),
            metrics: Arc::new(Metrics::new(snapshotter, commit_metrics)),
            shutdown: stop_rx,
            incarnation,
            cluster,
            snapshot,
            dev_tokens,
        });
        tracing::info!(
            dc = %state.config.dc,
            node = %state.config.node,
            incarnation,
            data = %state.config.data.display(),
            "node started"
        );
        Ok(Node {
            state,
            listener,
            stop,
            tls,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes, then closes every connection and the store.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), NodeError> {
        let Node {
            state,
            listener,
            stop,
            tls,
        } = self;
        let app = crate::http::router(state.clone());
        let edge = Edge::new(state.admission.clone(), tls, app, state.metrics.clone());
        let accepting = tokio::spawn(edge.run(listener, state.shutdown.clone()));
        shutdown.await;
        // Stop accepting, and tell every connection to close.
        let _ = stop.send(true);
        state.registry.shut_down();
        let _ = accepting.await;
        drain(&state).await;
        state.store.close().await;
        tracing::info!("node stopped");
        Ok(())
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
    if !state.admission.drained(DRAIN_TIMEOUT).await {
        tracing::warn!(open = state.admission.open(), "connections still open at shutdown");
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
        memory: StoreMemory {
            memtable_bytes: config.store.memtable_mib * crate::config::MIB,
            cache_bytes: config.store.cache_mib * crate::config::MIB,
            checkpoint_bytes: config.store.checkpoint_mib * crate::config::MIB,
        },
        journal_dir: config.store.journal_dir.clone(),
    }
}
