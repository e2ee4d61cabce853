//! Node configuration: built-in defaults, then a TOML file, then command-line and
//! environment overrides, then [`Config::validate`]. Every key is documented in
//! `docs/operations.md`; unknown keys are errors so that a typo cannot silently fall back
//! to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chinwag_core::{DcName, NodeName, SessionLimits};
use chinwag_store::StoreMemory;
use serde::{Deserialize, Serialize};

pub const MIB: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address for HTTP and WebSocket clients.
    pub listen: SocketAddr,
    /// Directory for the store and the token key.
    pub data: PathBuf,
    /// This node's datacenter.
    pub dc: String,
    /// This node's name within its DC.
    pub node: String,
    pub tokens: TokenConfig,
    pub limits: LimitsConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    /// Client TLS; absent means plain HTTP and WebSocket (for loopback and development).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Present when this DC is one of several; absent for a single-DC deployment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterConfig>,
    pub dev: DevConfig,
}

/// Conveniences for development and demos, all off by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// Lets anyone who can reach the node mint a token for any user, at
    /// `POST /v1/dev/token` and as "sign in as" in the web app. Never in production.
    pub sign_in: bool,
}

/// The multi-DC layer: this DC's gateway, its credentials and its peers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Address of this DC's gateway, where peer gateways connect.
    pub gateway_listen: SocketAddr,
    /// The cluster CA certificate, and this DC's certificate and key (`chinwag cluster init`).
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Every other DC.
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    #[serde(default)]
    pub timing: ClusterTiming,
    /// Messages queued per peer link before sends are dropped (and later repaired).
    #[serde(default = "default_link_queue")]
    pub link_queue: usize,
    /// 0: every DC exchanges digests with every other each tick (a full mesh, right for a
    /// handful of DCs). k > 0: with k random peers per tick (gossip, for many DCs).
    #[serde(default)]
    pub gossip_fanout: usize,
    /// Most entries kept of each stream's replication log: a peer further behind catches
    /// up from a snapshot instead.
    #[serde(default = "default_max_log_entries")]
    pub max_log_entries: u64,
}

pub fn default_link_queue() -> usize {
    4096
}

pub fn default_max_log_entries() -> u64 {
    10_000_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub dc: String,
    /// `host:port` of the peer's gateway.
    pub gateway: String,
}

/// Replication timing; the defaults suit DCs up to a few hundred milliseconds apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterTiming {
    #[serde(with = "duration_text")]
    pub anti_entropy_interval: Duration,
    #[serde(with = "duration_text")]
    pub keepalive: Duration,
    #[serde(with = "duration_text")]
    pub peer_timeout: Duration,
    #[serde(with = "duration_text")]
    pub retransmit: Duration,
    #[serde(with = "duration_text")]
    pub relay_after: Duration,
    /// A DC not heard from for this long is decommissioned: logs stop being kept for it,
    /// and if it returns it catches up from a snapshot.
    #[serde(with = "duration_text")]
    pub decommission_after: Duration,
}

impl Default for ClusterTiming {
    fn default() -> Self {
        Self {
            anti_entropy_interval: Duration::from_millis(100),
            keepalive: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(3),
            retransmit: Duration::from_millis(500),
            relay_after: Duration::from_secs(1),
            decommission_after: Duration::from_secs(24 * 3600),
        }
    }
}

/// PEM files for clients' TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// Token key file; empty means `<data>/token.key`.
    pub key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    #[serde(with = "duration_text")]
    pub handshake_timeout: Duration,
    #[serde(with = "duration_text")]
    pub ping_interval: Duration,
    #[serde(with = "duration_text")]
    pub idle_timeout: Duration,
    #[serde(with = "duration_text")]
    pub send_timeout: Duration,
    pub user_rate_per_sec: u32,
    pub user_burst: u32,
    pub allowed_origins: Vec<String>,
    pub max_frame_bytes: usize,
    pub max_text_bytes: usize,
    pub max_ack_ids: usize,
    pub max_inflight: usize,
    pub max_pending_sends: usize,
    pub push_buffer: usize,
    pub send_queue: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
    #[serde(with = "duration_text")]
    pub login_timeout: Duration,
    pub mailbox_max_messages: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Most operations made durable by one commit (group commit).
    pub commit_batch_max: usize,
    /// Most operations waiting for the store writer before senders wait.
    pub queue: usize,
    /// How long a `(sender, client_id)` pair is remembered for deduplication.
    #[serde(with = "duration_text")]
    pub dedup_window: Duration,
    /// Size at which a keyspace's in-memory write table is written out, in MiB.
    pub memtable_mib: u64,
    /// Block cache for reads, in MiB.
    pub cache_mib: u64,
    /// Journal size at which held messages are written to the tables, in MiB.
    pub checkpoint_mib: u64,
    /// Directory of the store's journal; empty means beside the tables, in `<data>/store`.
    pub journal_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `chinwag_server=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data: PathBuf::from("chinwag-data"),
            dc: "local".into(),
            node: "n1".into(),
            tokens: TokenConfig::default(),
            limits: LimitsConfig::default(),
            store: StoreConfig::default(),
            log: LogConfig::default(),
            tls: None,
            cluster: None,
            dev: DevConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let session = SessionLimits::default();
        Self {
            max_connections: 100_000,
            max_connections_per_ip: 1_000,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_millis(session.ping_interval_ms),
            idle_timeout: Duration::from_millis(session.idle_timeout_ms),
            send_timeout: Duration::from_secs(10),
            user_rate_per_sec: session.user_rate_per_sec,
            user_burst: session.user_burst,
            allowed_origins: Vec::new(),
            max_frame_bytes: session.max_frame_bytes,
            max_text_bytes: session.max_text_bytes,
            max_ack_ids: session.max_ack_ids,
            max_inflight: session.max_inflight,
            max_pending_sends: session.max_pending_sends,
            push_buffer: session.push_buffer,
            send_queue: 1024,
            rate_per_sec: session.rate_per_sec,
            burst: session.burst,
            login_timeout: Duration::from_millis(session.login_timeout_ms),
            mailbox_max_messages: 10_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            commit_batch_max: 4096,
            queue: 65_536,
            dedup_window: Duration::from_secs(24 * 3600),
            memtable_mib: StoreMemory::default().memtable_bytes / MIB,
            cache_mib: StoreMemory::default().cache_bytes / MIB,
            checkpoint_mib: StoreMemory::default().checkpoint_bytes / MIB,
            journal_dir: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks everything that can be checked before starting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if let Err(e) = DcName::parse(&self.dc) {
            return bad(format!("dc {:?}: {e} ({})", self.dc, DcName::ALLOWED));
        }
        if let Err(e) = NodeName::parse(&self.node) {
            return bad(format!("node {:?}: {e} ({})", self.node, NodeName::ALLOWED));
        }
        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_connections_per_ip", l.max_connections_per_ip as u64),
            ("limits.user_rate_per_sec", u64::from(l.user_rate_per_sec)),
            ("limits.user_burst", u64::from(l.user_burst)),
            ("limits.max_text_bytes", l.max_text_bytes as u64),
            ("limits.max_ack_ids", l.max_ack_ids as u64),
            ("limits.max_inflight", l.max_inflight as u64),
            ("limits.max_pending_sends", l.max_pending_sends as u64),
            ("limits.send_queue", l.send_queue as u64),
            ("limits.rate_per_sec", u64::from(l.rate_per_sec)),
            ("limits.burst", u64::from(l.burst)),
            ("limits.mailbox_max_messages", l.mailbox_max_messages),
            ("store.commit_batch_max", self.store.commit_batch_max as u64),
            ("store.queue", self.store.queue as u64),
            ("store.memtable_mib", self.store.memtable_mib),
            ("store.cache_mib", self.store.cache_mib),
            ("store.checkpoint_mib", self.store.checkpoint_mib),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be at least 1"));
        }
        // A frame must be able to carry a maximal text plus the JSON around it.
        if l.max_frame_bytes < l.max_text_bytes + 1024 {
            return bad(format!(
                "limits.max_frame_bytes ({}) must exceed limits.max_text_bytes ({}) by at least 1024",
                l.max_frame_bytes, l.max_text_bytes
            ));
        }
        if l.max_frame_bytes > 16 * 1024 * 1024 {
            return bad("limits.max_frame_bytes is capped at 16 MiB".into());
        }
        if self.store.memtable_mib > 1024 || self.store.cache_mib > 1024 * 1024 || self.store.checkpoint_mib > 1024 {
            return bad(
                "store.memtable_mib and store.checkpoint_mib are capped at 1024, store.cache_mib at 1048576".into(),
            );
        }
        let timeouts = [
            ("limits.login_timeout", l.login_timeout),
            ("limits.handshake_timeout", l.handshake_timeout),
            ("limits.ping_interval", l.ping_interval),
            ("limits.send_timeout", l.send_timeout),
        ];
        if let Some((name, _)) = timeouts.iter().find(|(_, d)| d.is_zero()) {
            return bad(format!("{name} must be positive"));
        }
        if l.idle_timeout <= l.ping_interval {
            return bad("limits.idle_timeout must exceed limits.ping_interval, or every quiet client is cut".into());
        }
        if l.max_connections > 10_000_000 {
            return bad("limits.max_connections is capped at 10000000".into());
        }
        match &self.cluster {
            Some(cluster) => cluster.validate(&self.dc),
            None => Ok(()),
        }
    }

    /// The peers' names, validated.
    pub fn peer_names(&self) -> Vec<DcName> {
        self.cluster
            .iter()
            .flat_map(|c| &c.peers)
            .map(|p| DcName::parse(&p.dc).expect("validated"))
            .collect()
    }

    pub fn dc_name(&self) -> DcName {
        DcName::parse(&self.dc).expect("validated")
    }

    pub fn node_name(&self) -> NodeName {
        NodeName::parse(&self.node).expect("validated")
    }

    pub fn token_key_path(&self) -> PathBuf {
        self.tokens
            .key_file
            .clone()
            .unwrap_or_else(|| self.data.join(chinwag_auth::KEY_FILE))
    }

    pub fn session_limits(&self) -> SessionLimits {
        let l = &self.limits;
        SessionLimits {
            max_frame_bytes: l.max_frame_bytes,
            max_text_bytes: l.max_text_bytes,
            max_ack_ids: l.max_ack_ids,
            max_inflight: l.max_inflight,
            max_pending_sends: l.max_pending_sends,
            push_buffer: l.push_buffer,
            rate_per_sec: l.rate_per_sec,
            burst: l.burst,
            login_timeout_ms: millis(l.login_timeout),
            ping_interval_ms: millis(l.ping_interval),
            idle_timeout_ms: millis(l.idle_timeout),
            user_rate_per_sec: l.user_rate_per_sec,
            user_burst: l.user_burst,
        }
    }

    pub fn edge_limits(&self) -> crate::edge::EdgeLimits {
        crate::edge::EdgeLimits {
            max_connections: self.limits.max_connections,
            max_connections_per_ip: self.limits.max_connections_per_ip,
            handshake_timeout: self.limits.handshake_timeout,
        }
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX)
}

impl ClusterConfig {
    fn validate(&self, me: &str) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        let mut seen = std::collections::BTreeSet::new();
        for peer in &self.peers {
            if let Err(e) = DcName::parse(&peer.dc) {
                return bad(format!("cluster.peers: dc {:?}: {e} ({})", peer.dc, DcName::ALLOWED));
            }
            if peer.dc == me {
                return bad(format!("cluster.peers lists this DC ({me}) itself"));
            }
            if !seen.insert(&peer.dc) {
                return bad(format!("cluster.peers lists {} twice", peer.dc));
            }
            if peer.gateway.is_empty() {
                return bad(format!("cluster.peers: {} has no gateway address", peer.dc));
            }
        }
        let t = &self.timing;
        if t.anti_entropy_interval.is_zero() || t.keepalive < t.anti_entropy_interval {
            return bad("cluster.timing: anti_entropy_interval must be positive and at most keepalive".into());
        }
        if t.peer_timeout <= t.keepalive {
            return bad("cluster.timing: peer_timeout must exceed keepalive".into());
        }
        if self.link_queue == 0 {
            return bad("cluster.link_queue must be at least 1".into());
        }
        // Below this, entries still in flight to a peer that is merely slow could be
        // dropped, and ordinary packet loss would turn into whole-state snapshots.
        if self.max_log_entries < 65_536 {
            return bad("cluster.max_log_entries must be at least 65536".into());
        }
        Ok(())
    }
}

/// Durations as human-readable text: `10s`, `250ms`, `24h`.
mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let config = Config::default();
        config.validate().unwrap();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), config);
    }

    #[test]
    fn partial_files_keep_defaults() {
        let config = Config::from_toml("dc = \"east\"\n[limits]\nlogin_timeout = \"3s\"\n").unwrap();
        assert_eq!(config.dc, "east");
        assert_eq!(config.limits.login_timeout, Duration::from_secs(3));
        assert_eq!(config.limits.burst, LimitsConfig::default().burst);
    }

    #[test]
    fn cluster_sections_parse_and_validate() {
        let text = r#"
            dc = "east"
            [cluster]
            gateway_listen = "0.0.0.0:7800"
            ca = "c/ca.pem"
            cert = "c/east.pem"
            key = "c/east.key"
            [[cluster.peers]]
            dc = "west"
            gateway = "10.0.0.2:7800"
            [cluster.timing]
            anti_entropy_interval = "50ms"
        "#;
        let config = Config::from_toml(text).unwrap();
        config.validate().unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(cluster.peers[0].dc, "west");
        assert_eq!(cluster.timing.anti_entropy_interval, Duration::from_millis(50));
        assert_eq!(cluster.timing.peer_timeout, Duration::from_secs(3));
        assert_eq!(config.peer_names(), vec![DcName::parse("west").unwrap()]);
        let mut twice = config.clone();
        twice.cluster.as_mut().unwrap().peers.push(cluster.peers[0].clone());
        assert!(twice.validate().unwrap_err().to_string().contains("twice"));
        let mut itself = config.clone();
        itself.cluster.as_mut().unwrap().peers[0].dc = "east".into();
        assert!(itself.validate().unwrap_err().to_string().contains("itself"));
        assert_eq!(cluster.max_log_entries, 10_000_000);
        let mut short_logs = config.clone();
        short_logs.cluster.as_mut().unwrap().max_log_entries = 8_192;
        let err = short_logs.validate().unwrap_err().to_string();
        assert!(err.contains("max_log_entries must be at least 65536"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::from_toml("[limits]\nmax_conections = 5\n").unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
    }

    #[test]
    fn invalid_values_are_explained() {
        let config = Config {
            dc: "East".into(),
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("dc"));
        let mut config = Config::default();
        config.limits.burst = 0;
        assert!(config.validate().unwrap_err().to_string().contains("limits.burst"));
        let mut config = Config::default();
        config.limits.max_frame_bytes = 1000;
        assert!(config.validate().unwrap_err().to_string().contains("max_frame_bytes"));
    }
}
