//! `chinwag bench`: a load generator speaking protocol v1 over real WebSockets.
//!
//! Scenarios: `idle` (connect and log in N users, hold the connections), `pairs` (N users
//! in N/2 sender→receiver pairs, at a fixed offered rate or as fast as the server accepts),
//! `offline` (senders fill N/2 offline mailboxes, then the recipients log in and drain
//! them). Every message carries its send time; receivers measure end-to-end latency into
//! an HDR histogram and account for every message by sender and sequence number, so lost
//! and duplicated messages are counted, not guessed.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chinwag_auth::{TokenKey, TokenPolicy};
use chinwag_core::UserId;
use chinwag_proto::{ClientFrame, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::{Counter, Histogram};
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod store_metrics;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(clap::Args)]
pub struct Args {
    /// Server to load; repeat to spread users over several nodes or DCs (senders round
    /// robin, each receiver on the server after its sender's, so every message crosses).
    #[arg(long = "server", required = true)]
    servers: Vec<String>,
    /// Data directory holding the token key.
    #[arg(long, default_value_os_t = crate::default_data())]
    data: PathBuf,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Users (connections).
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Offered messages per second in total (pairs); without it, as fast as the server
    /// accepts, with a window of outstanding sends per sender.
    #[arg(long)]
    rate: Option<u64>,
    /// How long to run (pairs, idle).
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    duration: Duration,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Messages in all (offline).
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// Connections opened per second.
    #[arg(long, default_value_t = 20_000)]
    ramp: u64,
    /// Outstanding sends per sender when no --rate is given.
    #[arg(long, default_value_t = 32)]
    window: u64,
    /// Number each sender's sends (a `device` at login, `seq` on every send), as a client
    /// that retries only its recent sends may; without it, sends carry client ids alone.
    #[arg(long)]
    numbered: bool,
    /// The server's process id, to report its memory and CPU.
    #[arg(long)]
    pid: Option<u32>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Idle,
    Pairs,
    Offline,
}

#[derive(Debug, Default, Serialize)]
struct Percentiles {
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

/// The latency of the messages sent during one second of the run.
#[derive(Debug, Serialize)]
struct SecondLatency {
    second: usize,
    messages: u64,
    #[serde(flatten)]
    latency: Percentiles,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    scenario: &'static str,
    connections: usize,
    logins_per_sec: f64,
    sent: u64,
    delivered: u64,
    delivered_per_sec: f64,
    latency_ms: Percentiles,
    /// Latency by the second in which messages were sent, counted from the start of
    /// sending: shows whether a tail is spread over the run or comes from a few seconds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    latency_by_second_ms: Vec<SecondLatency>,
    /// With `--rate`: how late the generator sent (see [`Ledger::send_lag`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    send_lag_ms: Option<Percentiles>,
    errors: u64,
    /// The errors by code: the server's error codes, and `unreadable_delivery` for a
    /// delivered text this generator did not write.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    errors_by_code: BTreeMap<String, u64>,
    lost: u64,
    duplicated: u64,
    reordered: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    stored_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drained_per_sec: Option<f64>,
    /// The server's RSS before the first connection, and at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_rss_kib: Option<u64>,
    /// The server's RSS every [`RSS_SAMPLE_EVERY`] of the run: flat in a healthy soak.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    server_rss_timeline_kib: Vec<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_kib_per_conn: Option<f64>,
    /// Over the whole run, connecting and draining included.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_cpu_percent: Option<f64>,
    /// Over the pairs' sending phase only: the steady load the latencies were measured
    /// under, which the whole-run figure understates.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_load_cpu_percent: Option<f64>,
    /// The generator's own CPU over the sending phase (100 = one core). Near 100 its
    /// own queueing would show in the latencies; well below, they are the server's.
    #[serde(skip_serializing_if = "Option::is_none")]
    generator_load_cpu_percent: Option<f64>,
    /// Each server's store over the run, from its metrics: how much of a commit, and so
    /// of the latency, was the disk's sync.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    server_store: Vec<store_metrics::StoreReport>,
}

impl Report {
    /// What every scenario counts: latency, errors, lost, duplicated and reordered.
    fn counted(counters: &Counters, ledger: &Ledger) -> Report {
        Report {
            latency_ms: percentiles(&ledger.latency),
            latency_by_second_ms: ledger.by_second(),
            send_lag_ms: (!ledger.send_lag.is_empty()).then(|| percentiles(&ledger.send_lag)),
            errors: counters.errors.load(Ordering::Relaxed),
            errors_by_code: counters.error_codes.lock().expect("error codes").clone(),
            lost: ledger.lost(),
            duplicated: counters.duplicated.load(Ordering::Relaxed),
            reordered: counters.reordered.load(Ordering::Relaxed),
            ..Report::default()
        }
    }
}

/// Shared counters, also read by the progress line.
#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    sent: AtomicU64,
    accepted: AtomicU64,
    delivered: AtomicU64,
    duplicated: AtomicU64,
    /// First deliveries of a sender's message after a later one of the same sender.
    reordered: AtomicU64,
    errors: AtomicU64,
    error_codes: std::sync::Mutex<BTreeMap<String, u64>>,
    /// When the latest first delivery arrived, in ns since the start of the run.
    last_delivery_ns: AtomicU64,
    /// When the scenario began to send, in ns since the start of the run.
    sending_since_ns: AtomicU64,
}

impl Counters {
    fn error(&self, code: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .error_codes
            .lock()
            .expect("error codes")
            .entry(code.to_owned())
            .or_default() += 1;
    }
}

/// The code counted for a delivered text that is not one of the generator's messages.
const UNREADABLE: &str = "unreadable_delivery";

/// What every receiver has seen, by sender and sequence number.
struct Ledger {
    /// Per sender: accepted (bit set when `sent` arrives) and delivered (count per seq).
    accepted: Vec<Vec<bool>>,
    delivered: Vec<Vec<u8>>,
    /// Per sender: it has stopped and has no send left unanswered.
    finished: Vec<bool>,
    /// Per sender: the highest seq delivered so far.
    highest: Vec<Option<usize>>,
    latency: Histogram<u64>,
    /// Latency by the second of sending (since [`Counters::sending_since_ns`]), coarser
    /// than `latency` to stay small: one histogram per second of the run.
    seconds: Vec<Histogram<u32>>,
    /// How late the generator itself sent each paced message: when this is of the order
    /// of the latencies, they measure the generator, not the server.
    send_lag: Histogram<u64>,
}

impl Ledger {
    fn new(senders: usize) -> Self {
        Self {
            accepted: vec![Vec::new(); senders],
            delivered: vec![Vec::new(); senders],
            finished: vec![false; senders],
            highest: vec![None; senders],
            latency: histogram(),
            seconds: Vec::new(),
            send_lag: histogram(),
        }
    }

    fn mark(v: &mut Vec<u8>, seq: usize) -> u8 {
        if v.len() <= seq {
            v.resize(seq + 1, 0);
        }
        v[seq] = v[seq].saturating_add(1);
        v[seq]
    }

    /// Records one latency under the second its message was sent in; seconds past
    /// [`TIMELINE_MAX_SECONDS`] are only in the overall histogram.
    fn record_second(&mut self, second: usize, latency_ns: u64) {
        if second >= TIMELINE_MAX_SECONDS {
            return;
        }
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, second_histogram);
        }
        let _ = self.seconds[second].record(latency_ns);
    }

    fn by_second(&self) -> Vec<SecondLatency> {
        (self.seconds.iter().enumerate())
            .filter(|(_, h)| !h.is_empty())
            .map(|(second, h)| SecondLatency {
                second,
                messages: h.len(),
                latency: percentiles(h),
            })
            .collect()
    }

    /// Whether everything `sender` will ever have accepted has been delivered.
    fn complete(&self, sender: usize) -> bool {
        let delivered = &self.delivered[sender];
        self.finished[sender]
            && self.accepted[sender]
                .iter()
                .enumerate()
                .all(|(seq, ok)| !ok || delivered.get(seq).is_some_and(|n| *n > 0))
    }

    fn lost(&self) -> u64 {
        let mut lost = 0;
        for (accepted, delivered) in self.accepted.iter().zip(&self.delivered) {
            for (seq, ok) in accepted.iter().enumerate() {
                if *ok && delivered.get(seq).copied().unwrap_or(0) == 0 {
                    lost += 1;
                }
            }
        }
        lost
    }
}

struct Run {
    args: Args,
    key: TokenKey,
    start: Instant,
    counters: Counters,
    ledger: Mutex<Ledger>,
    body: String,
    /// Prefix of this run's client ids: runs must not collide with the server's memory of
    /// earlier runs' idempotency keys. Each sender's count follows in fixed-width hex, so
    /// that its ids increase as our clients' do, and stay as short as before (15 bytes):
    /// fjall keeps keys of up to 20 bytes inline, and 41-byte keys cost its compactions
    /// 4.9 % of the node's samples in `memcmp` (docs/performance.md).
    nonce: String,
}

impl Run {
    fn token(&self, user: usize) -> String {
        let id = UserId::parse(&format!("bench-{user}")).expect("valid user id");
        chinwag_auth::mint(
            &self.key,
            &id,
            Duration::from_secs(24 * 3600),
            chinwag_server::now_ms(),
            &TokenPolicy::default(),
        )
    }

    fn server(&self, user: usize) -> &str {
        &self.args.servers[placement(user, self.args.users, self.args.servers.len())]
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Connects and logs in user `i`.
    async fn login(&self, user: usize) -> anyhow::Result<Ws> {
        let url = chinwag_client::ws_url(self.server(user));
        let tcp = connect_tcp(&url, user)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        // tungstenite's default 128 KiB read buffer, zeroed for each of thousands of
        // connections, would make the generator's page clearing the thing measured.
        let config = WebSocketConfig::default().read_buffer_size(CLIENT_READ_BUFFER);
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(url.as_str(), MaybeTlsStream::Plain(tcp), Some(config))
                .await
                .with_context(|| format!("upgrading {url}"))?;
        let login = chinwag_proto::encode_client(&ClientFrame::Login {
            token: self.token(user),
            receipts: false,
            device: self.args.numbered.then(|| self.nonce.clone()),
        });
        ws.send(WsMessage::text(login)).await?;
        loop {
            match next_frame(&mut ws).await? {
                ServerFrame::Welcome { .. } => break,
                ServerFrame::Error { code, message, .. } => anyhow::bail!("login refused: {code}: {message}"),
                _ => {}
            }
        }
        self.counters.connected.fetch_add(1, Ordering::Relaxed);
        Ok(ws)
    }

    /// The text of message `seq` from sender `from`: send time, sender, seq, padding.
    fn text(&self, sent_ns: u64, from: usize, seq: u64) -> String {
        let head = format!("{sent_ns}|{from}|{seq}|");
        let pad = self.args.size.saturating_sub(head.len());
        format!("{head}{}", &self.body[..pad.min(self.body.len())])
    }

    async fn on_message(&self, text: &str) {
        let now = self.now_ns();
        let mut parts = text.splitn(4, '|');
        let (Some(t), Some(from), Some(seq)) = (parts.next(), parts.next(), parts.next()) else {
            self.counters.error(UNREADABLE);
            return;
        };
        let (Ok(t), Ok(from), Ok(seq)) = (t.parse::<u64>(), from.parse::<usize>(), seq.parse::<usize>()) else {
            self.counters.error(UNREADABLE);
            return;
        };
        let mut ledger = self.ledger.lock().await;
        let Some(delivered) = ledger.delivered.get_mut(from) else {
            return;
        };
        if Ledger::mark(delivered, seq) > 1 {
            self.counters.duplicated.fetch_add(1, Ordering::Relaxed);
        } else {
            let highest = &mut ledger.highest[from];
            if highest.is_some_and(|h| seq < h) {
                self.counters.reordered.fetch_add(1, Ordering::Relaxed);
            }
            *highest = (*highest).max(Some(seq));
            self.counters.delivered.fetch_add(1, Ordering::Relaxed);
            self.counters.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
            let latency = now.saturating_sub(t).max(1);
            let _ = ledger.latency.record(latency);
            let since = self.counters.sending_since_ns.load(Ordering::Relaxed);
            ledger.record_second((t.saturating_sub(since) / 1_000_000_000) as usize, latency);
        }
    }

    /// A paced message left `lag_ns` after it was due. Recorded in the shared histogram
    /// rather than one per sender: a histogram of this precision is 200 KB, and creating
    /// one per sender as sending starts stalled the generator for tens of milliseconds.
    async fn on_due(&self, lag_ns: u64) {
        let _ = self.ledger.lock().await.send_lag.record(lag_ns.max(1));
    }

    async fn on_accepted(&self, from: usize, client_id: &str) {
        let Some(Ok(seq)) = client_id
            .rsplit_once('-')
            .map(|(_, seq)| usize::from_str_radix(seq, 16))
        else {
            return;
        };
        let mut ledger = self.ledger.lock().await;
        let accepted = &mut ledger.accepted[from];
        if accepted.len() <= seq {
            accepted.resize(seq + 1, false);
        }
        accepted[seq] = true;
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
    }
}

/// Nanoseconds from 1 to a minute, three significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// Seconds of sending covered by `latency_by_second_ms`; an hour of them is under 8 MB.
const TIMELINE_MAX_SECONDS: usize = 3_600;

/// One significant figure (values within 10 %) keeps each second's histogram near 2 KB.
fn second_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 60_000_000_000, 1).expect("valid bounds")
}

/// Which of `servers` user `user` of `users` connects to. Receivers (the second half)
/// sit on the server after their partner's, so with several servers every message
/// crosses from one node (or DC) to another.
fn placement(user: usize, users: usize, servers: usize) -> usize {
    let half = (users / 2).max(1);
    let place = if user >= half { user - half + 1 } else { user };
    place % servers.max(1)
}

/// The `host:port` of a server URL.
fn authority(url: &str) -> &str {
    url.split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_default()
}

/// Opens the TCP connection for user `user`. Toward a loopback server, connections come
/// from many loopback source addresses: tens of thousands of connections from one address
/// make the kernel's search for a free local port the bottleneck of the benchmark itself.
async fn connect_tcp(url: &str, user: usize) -> std::io::Result<TcpStream> {
    let host = authority(url);
    let Ok(std::net::SocketAddr::V4(addr)) = host.parse::<std::net::SocketAddr>() else {
        return TcpStream::connect(host).await;
    };
    if !addr.ip().is_loopback() {
        return TcpStream::connect(addr).await;
    }
    let socket = tokio::net::TcpSocket::new_v4()?;
    let source = std::net::Ipv4Addr::new(127, 0, 1 + (user / 250 % 200) as u8, 2 + (user % 250) as u8);
    socket.bind(std::net::SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(addr.into()).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn next_frame(ws: &mut Ws) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => return Ok(chinwag_proto::decode_server(t.as_str())?),
            Some(Ok(WsMessage::Close(_))) | None => anyhow::bail!("connection closed"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let key = TokenKey::load(&args.data.join(chinwag_auth::KEY_FILE)).with_context(|| {
        format!(
            "the token key in {} (use the server's data directory)",
            args.data.display()
        )
    })?;
    let senders = args.users / 2;
    let run = Arc::new(Run {
        key,
        start: Instant::now(),
        counters: Counters::default(),
        ledger: Mutex::new(Ledger::new(senders.max(1))),
        body: "x".repeat(args.size),
        nonce: crate::clients::random_hex(4),
        args,
    });
    let whole_run_cpu = run.args.pid.map(CpuWindow::start);
    let rss_before = run.args.pid.and_then(rss_kib);
    let progress = tokio::spawn(progress(run.clone()));
    let timeline = Arc::new(Mutex::new(Vec::new()));
    let sampler = run.args.pid.map(|pid| tokio::spawn(sample_rss(pid, timeline.clone())));
    let metrics_before = scrape_all(&run.args.servers).await;
    let mut report = match run.args.scenario {
        Scenario::Idle => idle(&run).await?,
        Scenario::Pairs => pairs(&run).await?,
        Scenario::Offline => offline(&run).await?,
    };
    let metrics_after = scrape_all(&run.args.servers).await;
    report.server_store = (run.args.servers.iter().zip(metrics_before).zip(metrics_after))
        .filter_map(|((server, before), after)| store_metrics::between(server, &before?, &after?))
        .collect();
    progress.abort();
    eprintln!();
    if let Some(pid) = run.args.pid {
        report.server_rss_before_kib = rss_before;
        report.server_rss_kib = rss_kib(pid);
        if let Some(sampler) = sampler {
            sampler.abort();
            report.server_rss_timeline_kib = timeline.lock().await.clone();
        }
        if let (Some(before), Some(after)) = (rss_before, report.server_rss_kib)
            && report.connections > 0
        {
            report.rss_kib_per_conn = Some(after.saturating_sub(before) as f64 / report.connections as f64);
        }
        report.server_cpu_percent = whole_run_cpu.and_then(|w| w.percent());
    }
    print_report(&report, run.args.json);
    Ok(if report.lost == 0 && report.duplicated == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Each server's metrics text, where it could be read.
async fn scrape_all(servers: &[String]) -> Vec<Option<String>> {
    let mut texts = Vec::with_capacity(servers.len());
    for server in servers {
        texts.push(store_metrics::scrape(server).await);
    }
    texts
}

/// Opens `users` connections at the ramp rate; returns them and the logins per second.
async fn connect_all(run: &Arc<Run>, users: std::ops::Range<usize>) -> anyhow::Result<(Vec<(usize, Ws)>, f64)> {
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / run.args.ramp.max(1) as f64);
    let mut tasks = Vec::new();
    for (n, user) in users.enumerate() {
        let target = started + gap * n as u32;
        tokio::time::sleep_until(target.into()).await;
        let run = run.clone();
        tasks.push(tokio::spawn(async move { run.login(user).await.map(|ws| (user, ws)) }));
    }
    let mut conns = Vec::with_capacity(tasks.len());
    for task in tasks {
        conns.push(task.await??);
    }
    let rate = conns.len() as f64 / started.elapsed().as_secs_f64();
    Ok((conns, rate))
}

async fn idle(run: &Arc<Run>) -> anyhow::Result<Report> {
    let (conns, rate) = connect_all(run, 0..run.args.users).await?;
    tokio::time::sleep(run.args.duration).await;
    Ok(Report {
        scenario: "idle",
        connections: conns.len(),
        logins_per_sec: rate,
        ..Report::default()
    })
}

async fn pairs(run: &Arc<Run>) -> anyhow::Result<Report> {
    let senders = run.args.users / 2;
    let (conns, rate) = connect_all(run, 0..senders * 2).await?;
    let started = Instant::now();
    run.counters.sending_since_ns.store(run.now_ns(), Ordering::Relaxed);
    let deadline = started + run.args.duration;
    let per_sender_rate = run.args.rate.map(|r| r as f64 / senders as f64);
    let (server_cpu, generator_cpu) = (run.args.pid.map(CpuWindow::start), CpuWindow::start(std::process::id()));
    let load_cpu = tokio::spawn(async move {
        tokio::time::sleep_until(deadline.into()).await;
        (server_cpu.and_then(|w| w.percent()), generator_cpu.percent())
    });
    let mut tasks = Vec::new();
    for (user, ws) in conns {
        let run = run.clone();
        tasks.push(if user < senders {
            tokio::spawn(async move { sender(&run, user, ws, deadline, per_sender_rate, None).await })
        } else {
            tokio::spawn(async move { receiver(&run, ws, user - senders, deadline).await })
        });
    }
    for task in tasks {
        task.await??;
    }
    let (server_load_cpu_percent, generator_load_cpu_percent) = load_cpu.await?;
    let ledger = run.ledger.lock().await;
    // Deliveries that trail in after the senders stop count, and so does the time they took.
    let last_ns = run.counters.last_delivery_ns.load(Ordering::Relaxed);
    let started_ns = started.duration_since(run.start).as_nanos() as u64;
    let elapsed = (last_ns.saturating_sub(started_ns) as f64 / 1e9).max(run.args.duration.as_secs_f64());
    Ok(Report {
        scenario: "pairs",
        connections: senders * 2,
        logins_per_sec: rate,
        sent: run.counters.accepted.load(Ordering::Relaxed),
        delivered: run.counters.delivered.load(Ordering::Relaxed),
        delivered_per_sec: run.counters.delivered.load(Ordering::Relaxed) as f64 / elapsed,
        server_load_cpu_percent,
        generator_load_cpu_percent,
        ..Report::counted(&run.counters, &ledger)
    })
}

/// Read buffer of each generated connection: a few frames' worth.
const CLIENT_READ_BUFFER: usize = 4096;

/// How long a receiver waits, once the senders have stopped, before checking whether it
/// has everything; also how long a draining receiver waits for a message that never comes.
const GRACE: Duration = Duration::from_secs(3);
/// The longest anyone waits for answers or deliveries after the senders stop.
const DRAIN_MAX: Duration = Duration::from_secs(120);

async fn offline(run: &Arc<Run>) -> anyhow::Result<Report> {
    let senders = run.args.users / 2;
    let (conns, rate) = connect_all(run, 0..senders).await?;
    let per_sender = run.args.messages.div_ceil(senders as u64);
    let started = Instant::now();
    run.counters.sending_since_ns.store(run.now_ns(), Ordering::Relaxed);
    let far = started + Duration::from_secs(3600);
    let mut tasks = Vec::new();
    for (user, ws) in conns {
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            sender(&run, user, ws, far, None, Some(per_sender)).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let stored = run.counters.accepted.load(Ordering::Relaxed);
    let stored_per_sec = stored as f64 / started.elapsed().as_secs_f64();
    // The recipients come online and drain their mailboxes.
    let drain_started = Instant::now();
    let (receivers, _) = connect_all(run, senders..senders * 2).await?;
    let mut tasks = Vec::new();
    for (_, ws) in receivers {
        let run = run.clone();
        tasks.push(tokio::spawn(async move { drain(&run, ws, per_sender).await }));
    }
    for task in tasks {
        task.await??;
    }
    let drained = run.counters.delivered.load(Ordering::Relaxed);
    let drained_per_sec = drained as f64 / drain_started.elapsed().as_secs_f64();
    let ledger = run.ledger.lock().await;
    Ok(Report {
        scenario: "offline",
        connections: senders * 2,
        logins_per_sec: rate,
        sent: stored,
        delivered: drained,
        delivered_per_sec: drained_per_sec,
        stored_per_sec: Some(stored_per_sec),
        drained_per_sec: Some(drained_per_sec),
        ..Report::counted(&run.counters, &ledger)
    })
}

/// Sends to this sender's partner until the deadline (or `count` messages), paced by
/// `rate` per second or by a window of outstanding sends.
async fn sender(
    run: &Run,
    me: usize,
    mut ws: Ws,
    deadline: Instant,
    rate: Option<f64>,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let to = format!("bench-{}", me + run.args.users / 2);
    let mut seq: u64 = 0;
    let mut outstanding: u64 = 0;
    let mut pace = rate.map(|r| Pace::new(run, me, r));
    let mut writes = Writes::default();
    let window = if rate.is_some() { u64::MAX } else { run.args.window };
    let done = |seq: u64| Instant::now() >= deadline || count.is_some_and(|c| seq >= c);
    loop {
        if done(seq) && outstanding == 0 {
            break;
        }
        let can_send = !done(seq) && outstanding < window;
        tokio::select! {
            (sent_ns, lag_ns) = async { pace.as_mut().expect("paced").next(seq, &mut writes).await }, if can_send && pace.is_some() => {
                run.on_due(lag_ns).await;
                let started_ns = run.now_ns();
                send_one(run, &mut ws, me, &to, seq, sent_ns).await?;
                writes.record(started_ns, run.now_ns());
                seq += 1;
                outstanding += 1;
            }
            () = std::future::ready(()), if can_send && pace.is_none() => {
                // Fill the window with one write, as a busy client would.
                while !done(seq) && outstanding < window {
                    ws.feed(send_frame(run, me, &to, seq, run.now_ns())).await?;
                    run.counters.sent.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                    outstanding += 1;
                }
                ws.flush().await?;
            }
            frame = next_frame(&mut ws) => match frame? {
                ServerFrame::Sent { client_id, .. } => {
                    outstanding = outstanding.saturating_sub(1);
                    run.on_accepted(me, &client_id).await;
                }
                ServerFrame::Error { code, .. } => {
                    outstanding = outstanding.saturating_sub(1);
                    run.counters.error(code.as_str());
                }
                _ => {}
            },
            () = tokio::time::sleep_until((deadline + DRAIN_MAX).into()), if done(seq) => break,
        }
    }
    run.ledger.lock().await.finished[me] = true;
    let _ = ws.close(None).await;
    Ok(())
}

/// An open-loop schedule for one sender: message `seq` is due at `phase + seq * period`.
/// Senders' phases are spread evenly over one period, so the offered load arrives smoothly
/// rather than in bursts of one message per sender.
struct Pace {
    start: Instant,
    phase_ns: u64,
    period_ns: u64,
}

impl Pace {
    fn new(run: &Run, me: usize, rate: f64) -> Self {
        let period_ns = (1e9 / rate.max(0.001)) as u64;
        let senders = (run.args.users / 2).max(1) as u64;
        let phase_ns = run.now_ns() + period_ns * (me as u64 % senders) / senders;
        Pace {
            start: run.start,
            phase_ns,
            period_ns,
        }
    }

    /// Waits until message `seq` is due and returns the time to stamp it with and how late
    /// the message leaves. The latency starts when the message leaves, moved earlier by
    /// the time the sender spent in writes since it fell due (see [`Writes`]).
    async fn next(&self, seq: u64, writes: &mut Writes) -> (u64, u64) {
        let due_ns = self.phase_ns + seq * self.period_ns;
        tokio::time::sleep_until((self.start + Duration::from_nanos(due_ns)).into()).await;
        let now_ns = self.start.elapsed().as_nanos() as u64;
        let held_ns = writes.since(due_ns);
        (
            now_ns.saturating_sub(held_ns).max(due_ns),
            now_ns.saturating_sub(due_ns),
        )
    }
}

/// When one sender was inside its writes. The senders never wait for answers, so the
/// server can hold one back only by not reading: its socket fills and a write blocks.
/// The time a message spent due while its sender was inside a write is the server's
/// doing, and is charged to it, so the queueing a stalled server causes is not hidden
/// (coordinated omission), even for a backlog that leaves only after the write returns.
/// Any other lateness is the generator's own (its timer's 1 ms granularity, its one core
/// busy with other connections; `send_lag_ms` reports it) and is not charged. A write
/// that does not block lasts microseconds, so what it adds is as small.
#[derive(Default)]
struct Writes {
    /// Each write since the earliest message not yet stamped fell due: its start, its
    /// end, and the time spent in writes up to its end.
    recent: VecDeque<(u64, u64, u64)>,
    /// The time spent in writes up to the end of the last write dropped from `recent`.
    dropped_total_ns: u64,
}

impl Writes {
    fn record(&mut self, start_ns: u64, end_ns: u64) {
        let total_ns = self.total_ns() + end_ns.saturating_sub(start_ns);
        self.recent.push_back((start_ns, end_ns, total_ns));
    }

    fn total_ns(&self) -> u64 {
        self.recent.back().map_or(self.dropped_total_ns, |&(_, _, total)| total)
    }

    /// The time spent in writes since `due_ns`; no write is in progress when asked, and
    /// each message asks with a later `due_ns` than the one before.
    fn since(&mut self, due_ns: u64) -> u64 {
        while let Some(&(_, end_ns, total_ns)) = self.recent.front()
            && end_ns <= due_ns
        {
            self.dropped_total_ns = total_ns;
            self.recent.pop_front();
        }
        let at_due_ns = match self.recent.front() {
            Some(&(start_ns, end_ns, total_ns)) if start_ns < due_ns => total_ns - (end_ns - due_ns),
            _ => self.dropped_total_ns,
        };
        self.total_ns() - at_due_ns
    }
}

fn send_frame(run: &Run, me: usize, to: &str, seq: u64, sent_ns: u64) -> WsMessage {
    let frame = ClientFrame::Send {
        to: to.to_owned(),
        client_id: format!("{}-{seq:06x}", run.nonce),
        text: run.text(sent_ns, me, seq),
        // Protocol seqs start at 1.
        seq: run.args.numbered.then_some(seq + 1),
    };
    WsMessage::text(chinwag_proto::encode_client(&frame))
}

async fn send_one(run: &Run, ws: &mut Ws, me: usize, to: &str, seq: u64, sent_ns: u64) -> anyhow::Result<()> {
    ws.send(send_frame(run, me, to, seq, sent_ns)).await?;
    run.counters.sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Acknowledgements go out in batches of this many ids (or when the stream pauses).
const ACK_BATCH: usize = 64;

/// Receives and acknowledges until everything `partner` had accepted has arrived: an
/// overloaded server still has messages to deliver after the senders stop, and those
/// count as delivered late, not lost. Bounded by [`DRAIN_MAX`] after `senders_stop`.
async fn receiver(run: &Run, ws: Ws, partner: usize, senders_stop: Instant) -> anyhow::Result<()> {
    let mut rx = Receiving { ws, acks: Vec::new() };
    let mut check = tokio::time::interval_at((senders_stop + GRACE).into(), Duration::from_millis(100));
    loop {
        let everything_arrived = async {
            loop {
                check.tick().await;
                if run.ledger.lock().await.complete(partner) || Instant::now() >= senders_stop + DRAIN_MAX {
                    return;
                }
            }
        };
        if !rx.next(run, everything_arrived).await? {
            return rx.close().await;
        }
    }
}

/// Receives until `expected` messages arrived (or nothing comes for a while).
async fn drain(run: &Run, ws: Ws, expected: u64) -> anyhow::Result<()> {
    let mut rx = Receiving { ws, acks: Vec::new() };
    for _ in 0..expected {
        if !rx.next(run, tokio::time::sleep(GRACE)).await? {
            break;
        }
    }
    rx.close().await
}

/// A receiving connection: records every message and acknowledges them in batches of
/// [`ACK_BATCH`], or as soon as nothing has come for 2 ms.
struct Receiving {
    ws: Ws,
    acks: Vec<String>,
}

impl Receiving {
    /// Waits for the next message and records it; `false` if `stop` finished first.
    async fn next(&mut self, run: &Run, stop: impl Future<Output = ()>) -> anyhow::Result<bool> {
        tokio::pin!(stop);
        loop {
            let frame = tokio::select! {
                f = next_frame(&mut self.ws) => f?,
                () = tokio::time::sleep(Duration::from_millis(2)), if !self.acks.is_empty() => {
                    flush_acks(&mut self.ws, &mut self.acks).await?;
                    continue;
                }
                () = &mut stop => return Ok(false),
            };
            if let ServerFrame::Message { id, text, .. } = frame {
                run.on_message(&text).await;
                self.acks.push(id);
                if self.acks.len() >= ACK_BATCH {
                    flush_acks(&mut self.ws, &mut self.acks).await?;
                }
                return Ok(true);
            }
        }
    }

    async fn close(mut self) -> anyhow::Result<()> {
        flush_acks(&mut self.ws, &mut self.acks).await?;
        let _ = self.ws.close(None).await;
        Ok(())
    }
}

async fn flush_acks(ws: &mut Ws, acks: &mut Vec<String>) -> anyhow::Result<()> {
    if acks.is_empty() {
        return Ok(());
    }
    let frame = ClientFrame::Ack {
        ids: std::mem::take(acks),
    };
    ws.send(WsMessage::text(chinwag_proto::encode_client(&frame))).await?;
    Ok(())
}

fn percentiles<T: Counter>(h: &Histogram<T>) -> Percentiles {
    let ms = |ns: u64| ns as f64 / 1e6;
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// How often a long run samples the server's RSS.
const RSS_SAMPLE_EVERY: Duration = Duration::from_secs(30);

async fn sample_rss(pid: u32, timeline: Arc<Mutex<Vec<u64>>>) {
    let mut tick = tokio::time::interval(RSS_SAMPLE_EVERY);
    loop {
        tick.tick().await;
        if let Some(rss) = rss_kib(pid) {
            timeline.lock().await.push(rss);
        }
    }
}

async fn progress(run: Arc<Run>) {
    let mut last = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let c = &run.counters;
        let delivered = c.delivered.load(Ordering::Relaxed);
        eprint!(
            "\r[{:>5.1}s] connected {:>6}  sent {:>9}  delivered {:>9} ({:>7}/s)  errors {}   ",
            run.start.elapsed().as_secs_f64(),
            c.connected.load(Ordering::Relaxed),
            c.sent.load(Ordering::Relaxed),
            delivered,
            (delivered - last) * 2,
            c.errors.load(Ordering::Relaxed),
        );
        last = delivered;
    }
}

fn print_report(r: &Report, json: bool) {
    if json {
        println!("{}", serde_json::to_string(r).expect("serialises"));
        return;
    }
    let opt = |v: Option<f64>, unit: &str| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}{unit}"));
    println!("scenario          {}", r.scenario);
    println!("connections       {}", r.connections);
    println!("logins/s          {:.0}", r.logins_per_sec);
    println!("messages sent     {}", r.sent);
    println!("delivered         {} ({:.0}/s)", r.delivered, r.delivered_per_sec);
    print_percentiles("latency ms", &r.latency_ms);
    let p99 = |s: &SecondLatency| s.latency.p99;
    if let Some(worst) = r.latency_by_second_ms.iter().max_by(|a, b| p99(a).total_cmp(&p99(b))) {
        println!(
            "worst second      {} (p99 {:.2} ms over {} messages)",
            worst.second,
            p99(worst),
            worst.messages
        );
    }
    if let Some(lag) = &r.send_lag_ms {
        print_percentiles("generator lag ms", lag);
    }
    println!("lost / dup / reord {} / {} / {}", r.lost, r.duplicated, r.reordered);
    println!("errors            {}", r.errors);
    for (code, n) in &r.errors_by_code {
        println!("  {code:<16}{n}");
    }
    println!("stored/s          {}", opt(r.stored_per_sec, ""));
    println!("drained/s         {}", opt(r.drained_per_sec, ""));
    println!(
        "server RSS        {} before, {} after",
        opt(r.server_rss_before_kib.map(|v| v as f64), " KiB"),
        opt(r.server_rss_kib.map(|v| v as f64), " KiB")
    );
    println!("RSS per conn      {}", opt(r.rss_kib_per_conn, " KiB"));
    println!("server CPU        {}", opt(r.server_cpu_percent, "%"));
    if let Some(cpu) = r.server_load_cpu_percent {
        println!("  while sending   {cpu:.1}%");
    }
    if let Some(cpu) = r.generator_load_cpu_percent {
        println!("generator CPU     {cpu:.1}% while sending");
    }
    for s in &r.server_store {
        println!("store of          {}", s.server);
        println!(
            "  commits         {}, mean {:.2} ms, p99 at most {:.2} ms",
            s.commits, s.commit_ms.mean, s.commit_ms.p99_at_most
        );
        println!(
            "  journal syncs   {}, mean {:.2} ms, p99 at most {:.2} ms",
            s.journal_syncs, s.journal_sync_ms.mean, s.journal_sync_ms.p99_at_most
        );
    }
}

fn print_percentiles(label: &str, p: &Percentiles) {
    println!(
        "{label:<18}p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        p.p50, p.p99, p.p999, p.max
    );
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields after its closing parenthesis are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A process's CPU time from [`CpuWindow::start`] on.
struct CpuWindow {
    pid: u32,
    ticks: Option<u64>,
    since: Instant,
}

impl CpuWindow {
    fn start(pid: u32) -> Self {
        CpuWindow {
            pid,
            ticks: cpu_ticks(pid),
            since: Instant::now(),
        }
    }

    /// CPU time since the start as a share of the wall time that actually passed (100 =
    /// one core): a reading taken late, on a busy core, is not overstated.
    fn percent(&self) -> Option<f64> {
        // Linux reports process times in USER_HZ, 100 on every mainstream configuration.
        const TICKS_PER_SEC: f64 = 100.0;
        let used = cpu_ticks(self.pid)?.saturating_sub(self.ticks?);
        Some(used as f64 / TICKS_PER_SEC / self.since.elapsed().as_secs_f64() * 100.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{TIMELINE_MAX_SECONDS, Writes, placement, second_histogram};

    #[test]
    fn only_time_spent_in_writes_after_a_message_fell_due_is_charged_to_the_server() {
        const MS: u64 = 1_000_000;
        let mut writes = Writes::default();
        // On time, writes of a few microseconds: nothing to charge.
        writes.record(10 * MS, 10 * MS + 5_000);
        assert_eq!(writes.since(20 * MS), 0);
        // The generator itself was late: the message due at 30 ms left at 42 ms, and the
        // next, due at 40 ms, goes out right behind it. Only the 10 µs of that write,
        // which came after 40 ms, is the server's.
        writes.record(42 * MS, 42 * MS + 10_000);
        assert_eq!(writes.since(40 * MS), 10_000);
        // A write blocked from 100 to 150 ms (the server not reading): every message that
        // fell due meanwhile is charged from its due time, including those sent after it
        // returned, and one due before the write began is charged the whole block.
        writes.record(100 * MS, 150 * MS);
        assert_eq!(writes.since(95 * MS), 50 * MS);
        assert_eq!(writes.since(110 * MS), 40 * MS);
        writes.record(150 * MS, 150 * MS + 10_000);
        assert_eq!(writes.since(120 * MS), 30 * MS + 10_000);
        // Two blocks in a row add up for a message that waited behind both.
        writes.record(160 * MS, 200 * MS);
        assert_eq!(writes.since(130 * MS), 20 * MS + 10_000 + 40 * MS);
        // Due after every write ended: nothing, and what it no longer needs is let go.
        assert_eq!(writes.since(300 * MS), 0);
        assert!(writes.recent.is_empty());
    }

    #[test]
    fn an_hour_of_latency_by_second_stays_under_8_mb() {
        // Each second's histogram is a fixed array of u32 counts, however many it holds.
        let bytes = second_histogram().distinct_values() * std::mem::size_of::<u32>();
        assert!(bytes * TIMELINE_MAX_SECONDS < 8 << 20, "{bytes} bytes per second");
    }

    #[test]
    fn with_several_servers_every_pair_is_split_and_load_is_spread() {
        for servers in 2..=5 {
            for users in [2, 20, 21, 1000] {
                let half = users / 2;
                let mut per_server = vec![0; servers];
                for sender in 0..half {
                    let (from, to) = (
                        placement(sender, users, servers),
                        placement(sender + half, users, servers),
                    );
                    assert_ne!(from, to, "pair {sender} of {users} on {servers} servers");
                    per_server[from] += 1;
                }
                let (least, most) = (per_server.iter().min().unwrap(), per_server.iter().max().unwrap());
                assert!(most - least <= 1, "senders spread unevenly: {per_server:?}");
            }
        }
        assert!((0..10).all(|user| placement(user, 10, 1) == 0));
    }
}
