//! Prometheus metrics, served at `GET /metrics`. Names and meanings are listed in
//! `docs/operations.md`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use crate::edge::Refusal;
use chinwag_core::DeliveryStats;
use chinwag_proto::ErrorCode;
use chinwag_store::{CommitStats, EngineStats, KeyspaceStats, Syncs};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::cluster::{ClusterStatus, PeerView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

/// Metrics updated on the hot path. Values that already live elsewhere (store sizes,
/// delivery counts) are read at scrape time by [`Snapshotter`] instead of being copied
/// on every change.
pub struct Metrics {
    registry: Registry,
    pub logins: Counter,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub errors: Family<CodeLabel, Counter>,
    pub slow_clients: Counter,
    refused: Family<ReasonLabel, Counter>,
}

/// Store commit metrics. Created before the store, which reports into them from its
/// writer thread.
///
/// One commit touches up to four histograms; `gate` makes a commit and a scrape exclude
/// each other, so every scrape shows whole commits (a journal sync never counted without
/// its commit), which is what lets readers compare the counts of two scrapes.
#[derive(Clone, Debug)]
pub struct CommitMetrics {
    gate: Arc<Mutex<()>>,
    seconds: Histogram,
    ops: Histogram,
    journal_sync: Histogram,
    fjall_sync: Histogram,
}

/// 50 µs .. ~0.8 s: fsync latency on anything from NVMe to a congested network disk.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 15))
}

impl Default for CommitMetrics {
    fn default() -> Self {
        Self {
            gate: Arc::default(),
            seconds: seconds_histogram(),
            ops: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            journal_sync: seconds_histogram(),
            fjall_sync: seconds_histogram(),
        }
    }
}

impl CommitMetrics {
    pub fn observe(&self, commit: &CommitStats) {
        let _whole = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        self.seconds.observe(commit.took.as_secs_f64());
        self.ops.observe(commit.ops as f64);
        let Syncs { journal, fjall } = commit.syncs;
        if let Some(took) = journal {
            self.journal_sync.observe(took.as_secs_f64());
        }
        if let Some(took) = fjall {
            self.fjall_sync.observe(took.as_secs_f64());
        }
    }
}

impl Collector for CommitMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let _whole = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        for (name, help, histogram) in [
            (
                "store_commit_seconds",
                "Time to make one batch of store writes durable",
                &self.seconds,
            ),
            ("store_commit_ops", "Operations made durable per commit", &self.ops),
            (
                "store_journal_sync_seconds",
                "Time a commit waited for the store's journal to sync (part of store_commit_seconds)",
                &self.journal_sync,
            ),
            (
                "store_fjall_sync_seconds",
                "Time a commit took to hand its batch to fjall when it also synced fjall's journal, at most every 100 ms (part of store_commit_seconds)",
                &self.fjall_sync,
            ),
        ] {
            histogram.encode(encoder.encode_descriptor(name, help, None, histogram.metric_type())?)?;
        }
        Ok(())
    }
}

/// Point-in-time values gathered at each scrape.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub connections: u64,
    pub sockets: u64,
    pub mailbox_depth: u64,
    pub coordinates: u64,
    pub replicated_in: u64,
    /// Users online per DC, as this DC's store knows them.
    pub online_users: std::collections::BTreeMap<String, u64>,
}

/// Reads a [`Snapshot`]; shared by metrics and the cluster view.
pub type ReadSnapshot = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Reads the storage engine's queues; only at a scrape, since it walks every keyspace.
pub type ReadEngine = Arc<dyn Fn() -> EngineStats + Send + Sync>;

/// Reads a [`Snapshot`] and the delivery counters when Prometheus scrapes.
pub struct Snapshotter {
    pub read: ReadSnapshot,
    pub engine: ReadEngine,
    pub delivery: Arc<DeliveryStats>,
    pub cluster: Option<watch::Receiver<ClusterStatus>>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Snapshotter")
    }
}

impl Metrics {
    pub fn new(snapshotter: Snapshotter, commit: CommitMetrics) -> Self {
        let mut registry = Registry::with_prefix("chinwag");
        let logins = Counter::default();
        registry.register("logins", "Successful logins", logins.clone());
        let messages_in = Counter::default();
        registry.register(
            "messages_in",
            "Messages accepted from senders (retries of an accepted message not counted)",
            messages_in.clone(),
        );
        let messages_out = Counter::default();
        registry.register(
            "messages_out",
            "Message frames written to recipients",
            messages_out.clone(),
        );
        let errors = Family::<CodeLabel, Counter>::default();
        registry.register("errors", "Error frames sent to clients, by code", errors.clone());
        registry.register_collector(Box::new(commit));
        let slow_clients = Counter::default();
        registry.register(
            "slow_clients",
            "Connections dropped because the client did not read within limits.send_timeout",
            slow_clients.clone(),
        );
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections turned away at the edge, by limit (node, address)",
            refused.clone(),
        );
        registry.register_collector(Box::new(snapshotter));
        Self {
            registry,
            logins,
            messages_in,
            messages_out,
            errors,
            slow_clients,
            refused,
        }
    }

    pub fn refused(&self, refusal: Refusal) {
        let reason = match refusal {
            Refusal::NodeFull => "node",
            Refusal::AddressFull => "address",
        };
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors.get_or_create(&CodeLabel { code: code.as_str() }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

impl Collector for Snapshotter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = (self.read)();
        let gauges = [
            (
                "connections",
                "Open WebSocket connections on this node",
                snap.connections,
            ),
            (
                "sockets",
                "Open client TCP connections on this node, logged in or not (limits.max_connections)",
                snap.sockets,
            ),
            (
                "mailbox_depth",
                "Unacknowledged messages in all mailboxes",
                snap.mailbox_depth,
            ),
            (
                "coordinates",
                "Online coordinates (connections) in the store",
                snap.coordinates,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = gauge(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let stats = &self.delivery;
        let outcomes = [
            ("queued", &stats.queued),
            ("overflowed", &stats.overflowed),
            ("gone", &stats.gone),
            ("unroutable", &stats.unroutable),
        ];
        let mut family = encoder.encode_descriptor(
            "pushes",
            "Pushes of committed messages to coordinates, by outcome",
            None,
            MetricType::Counter,
        )?;
        for (outcome, counter) in outcomes {
            let value = ConstCounter::new(counter.load(Ordering::Relaxed));
            value.encode(family.encode_family(&OutcomeLabel { outcome })?)?;
        }
        let receipts = ConstCounter::new(stats.receipts.load(Ordering::Relaxed));
        receipts.encode(encoder.encode_descriptor(
            "receipts",
            "Delivery receipts queued for senders' connections",
            None,
            receipts.metric_type(),
        )?)?;
        encode_engine(&mut encoder, &(self.engine)())?;
        let Some(cluster) = &self.cluster else { return Ok(()) };
        let replicated = ConstCounter::new(snap.replicated_in);
        replicated.encode(encoder.encode_descriptor(
            "mailbox_entries_replicated",
            "Messages received from other DCs' streams and stored here",
            None,
            replicated.metric_type(),
        )?)?;
        encode_peers(&mut encoder, &cluster.borrow())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyspaceLabel {
    keyspace: String,
}

/// One metric family with a series per item (peer, keyspace): name, help, type, value.
type Series<T> = (&'static str, &'static str, MetricType, fn(&T) -> u64);

fn encode_series<T, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    series: &[Series<T>],
    items: &[T],
    label: impl Fn(&T) -> L,
) -> Result<(), std::fmt::Error> {
    for (name, help, kind, value) in series {
        let mut family = encoder.encode_descriptor(name, help, None, *kind)?;
        for item in items {
            encode_value(family.encode_family(&label(item))?, *kind, value(item))?;
        }
    }
    Ok(())
}

fn encode_value(metric: MetricEncoder<'_>, kind: MetricType, value: u64) -> Result<(), std::fmt::Error> {
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => gauge(value).encode(metric),
    }
}

fn gauge(value: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

/// The storage engine's queues and work, per keyspace and in all.
fn encode_engine(encoder: &mut DescriptorEncoder, engine: &EngineStats) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter as C, Gauge as G};
    let keyspaces: [Series<KeyspaceStats>; 5] = [
        (
            "store_memtable_bytes",
            "Bytes in the keyspace's memtable that takes writes",
            G,
            |k| k.memtable_bytes,
        ),
        (
            "store_sealed_memtables",
            "Sealed memtables waiting to be written out; all writes are held while one keyspace has 4",
            G,
            |k| k.sealed_memtables,
        ),
        (
            "store_level0_runs",
            "Sorted runs in level 0 waiting for compaction; writes are slowed from 20",
            G,
            |k| k.level0_runs,
        ),
        ("store_tables", "Table files of the keyspace, all levels", G, |k| {
            k.tables
        }),
        (
            "store_table_bytes",
            "Bytes of the keyspace's table files on disk",
            G,
            |k| k.disk_bytes,
        ),
    ];
    encode_series(encoder, &keyspaces, &engine.keyspaces, |k| KeyspaceLabel {
        keyspace: k.name.clone(),
    })?;
    let totals: [Series<EngineStats>; 11] = [
        (
            "store_journals",
            "fjall's journal files; all but the newest wait for memtables to be written out",
            G,
            |e| e.journals,
        ),
        (
            "store_journal_bytes",
            "Bytes in the store's own journal, replayed at a restart and emptied at each checkpoint",
            G,
            |e| e.journal_bytes,
        ),
        (
            "store_held_messages",
            "New messages held in memory and the journal only, written to fjall at a checkpoint if still unacknowledged",
            G,
            |e| e.held_messages,
        ),
        (
            "store_held_receipts",
            "Idempotency records held in memory and the journal only, written to fjall in bulk",
            G,
            |e| e.held_receipts,
        ),
        (
            "store_device_windows",
            "Windows of numbered sends in memory, one per device",
            G,
            |e| e.device_windows,
        ),
        (
            "store_window_receipts",
            "Receipts of numbered sends in the windows in memory",
            G,
            |e| e.window_receipts,
        ),
        (
            "store_flushes_queued",
            "Sealed memtables queued for the engine's workers, all keyspaces",
            G,
            |e| e.flushes_queued,
        ),
        ("store_compactions_running", "Compactions in progress", G, |e| {
            e.compactions_running
        }),
        ("store_compactions", "Compactions completed since start", C, |e| {
            e.compactions_completed
        }),
        (
            "store_compaction_microseconds",
            "Time spent compacting since start",
            C,
            |e| e.compaction_micros,
        ),
        (
            "store_writer_queue",
            "Operations waiting for the store's writer thread (store.queue bounds it)",
            G,
            |e| e.writer_queue,
        ),
    ];
    for (name, help, kind, value) in totals {
        encode_value(encoder.encode_descriptor(name, help, None, kind)?, kind, value(engine))?;
    }
    Ok(())
}

/// Per-peer replication metrics, from the replication driver's latest status.
fn encode_peers(encoder: &mut DescriptorEncoder, status: &ClusterStatus) -> Result<(), std::fmt::Error> {
    use MetricType::{Counter as C, Gauge as G};
    let series: [Series<PeerView>; 8] = [
        ("replication_peer_up", "1 if the peer DC is reachable", G, |p| {
            u64::from(p.reachable)
        }),
        (
            "replication_lag_entries",
            "Entries applied here that the peer has not applied",
            G,
            |p| p.lag_entries,
        ),
        (
            "replication_last_heard_ms",
            "Milliseconds since the peer was last heard",
            G,
            |p| p.last_heard_ms_ago.unwrap_or(u64::MAX >> 1),
        ),
        ("replication_bytes_sent", "Bytes sent to the peer's gateway", C, |p| {
            p.bytes_sent
        }),
        (
            "replication_bytes_received",
            "Bytes received from the peer's gateway",
            C,
            |p| p.bytes_received,
        ),
        (
            "replication_entries_sent",
            "Stream entries sent to the peer (messages forwarded included)",
            C,
            |p| p.entries_sent,
        ),
        (
            "replication_entries_received",
            "Stream entries received from the peer",
            C,
            |p| p.entries_received,
        ),
        (
            "replication_frames_rejected",
            "Frames from the peer that failed validation",
            C,
            |p| p.frames_rejected,
        ),
    ];
    encode_series(encoder, &series, &status.peers, |p| PeerLabel { peer: p.dc.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn count(text: &str, name: &str) -> u64 {
        let line = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        line.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{text}"))
    }

    /// Readers compare the counts of two scrapes (`chinwag bench` reports syncs per
    /// commit), so a scrape taken while commits land must never show a sync without its
    /// commit.
    #[test]
    fn a_scrape_taken_while_commits_land_shows_whole_commits() {
        let metrics = CommitMetrics::default();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(metrics.clone()));
        let commit = CommitStats {
            took: Duration::from_micros(300),
            ops: 2,
            syncs: Syncs {
                journal: Some(Duration::from_micros(200)),
                fjall: None,
            },
        };
        let committer = std::thread::spawn(move || (0..20_000).for_each(|_| metrics.observe(&commit)));
        let mut scrapes = 0;
        while !committer.is_finished() || scrapes == 0 {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            let commits = count(&text, "store_commit_seconds_count");
            assert_eq!(
                count(&text, "store_journal_sync_seconds_count"),
                commits,
                "scrape {scrapes}"
            );
            scrapes += 1;
        }
        committer.join().unwrap();
    }
}
