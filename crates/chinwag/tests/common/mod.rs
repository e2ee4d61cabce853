//! Test harness: real `chinwag` processes on loopback ports, real WebSocket clients.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use chinwag_auth::{TokenKey, TokenPolicy};
use chinwag_client::{ClientError, Connection};
use chinwag_core::UserId;
use chinwag_proto::ServerFrame;

pub const BIN: &str = env!("CARGO_BIN_EXE_chinwag");

/// Generous bound for anything that should happen "at once"; only reached on failure.
pub const SOON: Duration = Duration::from_secs(10);

/// A running `chinwag serve` process with its own data directory.
pub struct Node {
    child: Child,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    config: String,
    /// The network namespace the node runs in, if not the host's.
    netns: Option<String>,
}

impl Node {
    /// Starts a node in `dir` with these extra config lines (TOML).
    pub fn start_in(dir: &Path, extra_config: &str) -> Node {
        Self::start_at(dir, extra_config, "127.0.0.1:0".parse().unwrap())
    }

    /// Starts a node inside network namespace `netns`, listening on `listen`.
    pub fn start_in_netns(dir: &Path, extra_config: &str, listen: SocketAddr, netns: &str) -> Node {
        Self::spawn(dir, extra_config, listen, Some(netns.to_owned()))
    }

    /// Starts a node listening on `listen`.
    pub fn start_at(dir: &Path, extra_config: &str, listen: SocketAddr) -> Node {
        Self::spawn(dir, extra_config, listen, None)
    }

    fn spawn(dir: &Path, extra_config: &str, listen: SocketAddr, netns: Option<String>) -> Node {
        let config = format!(
            "listen = \"{listen}\"\ndata = \"{}\"\n{extra_config}\n[log]\nlevel = \"warn\"\n",
            dir.join("data").display()
        );
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, &config).unwrap();
        let mut command = match &netns {
            Some(ns) => {
                // `ip netns exec` execs the command, so the child's pid is the node's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start chinwag serve");
        let addr = read_listen_line(&mut child);
        Node {
            child,
            addr,
            dir: dir.to_owned(),
            config: extra_config.to_owned(),
            netns,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(&self, user: &str) -> String {
        token_for(&self.dir.join("data"), user, Duration::from_secs(3600))
    }

    /// `chinwag bench` against this node, with its token key, reporting JSON; the
    /// scenario's arguments follow.
    pub fn bench_args(&self) -> Vec<String> {
        let data = self.dir.join("data").display().to_string();
        ["bench", "--server", &self.url(), "--data", &data, "--json"]
            .map(String::from)
            .to_vec()
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the node again on the same port and data directory.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let node = Self::spawn(&self.dir, &self.config.clone(), self.addr, self.netns.clone());
        *self = node;
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }

    pub async fn login(&self, user: &str) -> Connection {
        let (conn, welcome) = Connection::login(&self.url(), &self.token(user)).await.expect("login");
        assert_eq!(welcome.user, user);
        conn
    }

    /// Waits until metric `name` equals `value`, failing the test if it does not soon.
    pub async fn wait_for_metric(&self, name: &str, value: f64) {
        let deadline = tokio::time::Instant::now() + SOON;
        while self.metric(name).await != value {
            assert!(tokio::time::Instant::now() < deadline, "{name} never reached {value}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let body = http_get(&self.http("/metrics")).await;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no metric {name} in\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unsafe_kill(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the `chinwag listening on http://ADDR ...` line.
fn read_listen_line(child: &mut Child) -> SocketAddr {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the node never blocks on a full pipe.
        for _ in lines {}
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("node did not start");
    let addr = line
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    addr.parse().unwrap()
}

pub fn token_for(data: &Path, user: &str, ttl: Duration) -> String {
    let key = TokenKey::load_or_create(&data.join(chinwag_auth::KEY_FILE)).unwrap();
    chinwag_auth::mint(
        &key,
        &UserId::parse(user).unwrap(),
        ttl,
        chinwag_server::now_ms(),
        &TokenPolicy::default(),
    )
}

/// `GET url` over a plain HTTP/1.1 connection; returns the status code and the body.
pub async fn http_request(url: &str) -> (u16, String) {
    read_response(send_get(url).await).await
}

async fn read_response(mut stream: tokio::net::TcpStream) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    tokio::time::timeout(SOON, stream.read_to_end(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    parse_response(response)
}

/// `GET url` on a response that does not end (a stream of events): what came in `window`.
pub async fn http_request_for(url: &str, window: Duration) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = send_get(url).await;
    let mut response = Vec::new();
    let _still_open = tokio::time::timeout(window, stream.read_to_end(&mut response)).await;
    parse_response(response)
}

/// `POST url` with a JSON body; returns the status and the body.
pub async fn http_post_json(url: &str, json: &str) -> (u16, String) {
    let head = format!("Content-Type: application/json\r\nContent-Length: {}\r\n", json.len());
    read_response(send_request("POST", url, &head, json).await).await
}

async fn send_get(url: &str) -> tokio::net::TcpStream {
    send_request("GET", url, "", "").await
}

async fn send_request(method: &str, url: &str, headers: &str, body: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let rest = url.strip_prefix("http://").expect("http:// URL");
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::time::timeout(SOON, tokio::net::TcpStream::connect(host))
        .await
        .expect("connect in time")
        .unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{headers}\r\n{body}");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

fn parse_response(response: Vec<u8>) -> (u16, String) {
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        let Some(chunk) = rest.get(..size) else {
            // A stream cut off mid-chunk.
            out.push_str(rest);
            break;
        };
        out.push_str(chunk);
        body = rest.get(size + 2..).unwrap_or_default();
    }
    out
}

/// `GET url`, expecting 200 OK; returns the body.
pub async fn http_get(url: &str) -> String {
    let (status, body) = http_request(url).await;
    assert_eq!(status, 200, "GET {url}: {body}");
    body
}

/// The next frame, failing the test if none comes soon.
pub async fn next(conn: &mut Connection) -> ServerFrame {
    match tokio::time::timeout(SOON, conn.recv()).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => panic!("connection failed: {e}"),
        Err(_) => panic!("no frame within {SOON:?}"),
    }
}

/// The next frame, or the error the connection ended with.
pub async fn next_or_close(conn: &mut Connection) -> Result<ServerFrame, ClientError> {
    tokio::time::timeout(SOON, conn.recv())
        .await
        .expect("no frame or close in time")
}

/// Asserts no message (nor anything unexpected) arrives for `quiet`; answers to our own
/// acknowledgements may.
pub async fn assert_silent(conn: &mut Connection, quiet: Duration) {
    let until = tokio::time::Instant::now() + quiet;
    while let Ok(result) = tokio::time::timeout_at(until, conn.recv()).await {
        if !matches!(result, Ok(ServerFrame::Acked { .. } | ServerFrame::Delivered { .. })) {
            panic!("expected silence, got {result:?}");
        }
    }
}

/// A received `message` frame's id and text.
pub async fn next_message(conn: &mut Connection) -> (String, String, String) {
    loop {
        match next(conn).await {
            ServerFrame::Message { id, from, text, .. } => return (id, from, text),
            ServerFrame::Acked { .. } | ServerFrame::Sent { .. } | ServerFrame::Delivered { .. } => {}
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

pub async fn next_error(conn: &mut Connection) -> (chinwag_proto::ErrorCode, Option<String>) {
    match next(conn).await {
        ServerFrame::Error { code, client_id, .. } => (code, client_id),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Something users can log in to: a node, or a [`Place`].
pub trait LogIn {
    async fn log_in(&self, user: &str) -> Connection;
}

impl LogIn for Node {
    async fn log_in(&self, user: &str) -> Connection {
        self.login(user).await
    }
}

impl LogIn for Place {
    async fn log_in(&self, user: &str) -> Connection {
        self.login(user).await
    }
}

/// Proves the node still serves everyone else: a fresh pair logs in and exchanges a
/// message both ways.
pub async fn assert_others_unaffected(node: &impl LogIn, tag: &str) {
    let (a, b) = (format!("{tag}-x"), format!("{tag}-y"));
    let mut x = node.log_in(&a).await;
    let mut y = node.log_in(&b).await;
    x.send_message(&b, "probe-1", "are you there?").await.expect("send x→y");
    let (id, from, text) = next_message(&mut y).await;
    assert_eq!((from.as_str(), text.as_str()), (a.as_str(), "are you there?"));
    y.ack(vec![id]).await.unwrap();
    y.send_message(&a, "probe-2", "yes").await.expect("send y→x");
    let (id, _, text) = next_message(&mut x).await;
    assert_eq!(text, "yes");
    x.ack(vec![id]).await.unwrap();
}

/// Runs the `chinwag` binary with these arguments and returns (exit code, stdout).
pub async fn run_cli(args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new(BIN).args(args).output().await.unwrap();
    if !output.stderr.is_empty() {
        eprintln!(
            "chinwag {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
    )
}

/// The load generator's two message scenarios, small, as `chinwag bench` arguments.
pub const BENCH_SCENARIOS: [&[&str]; 2] = [
    &["--scenario", "pairs", "--rate", "200", "--duration", "2s"],
    &["--scenario", "offline", "--messages", "200"],
];

/// Checks that a bench report read each of its `servers`' store from their metrics: every
/// scenario sends, so each store synced its journal, and each sync is part of a commit.
pub fn assert_store_reported(report: &serde_json::Value, servers: usize) {
    let stores = report["server_store"].as_array().unwrap_or_else(|| panic!("{report}"));
    assert_eq!(stores.len(), servers, "{report}");
    for store in stores {
        let syncs = store["journal_syncs"].as_u64().unwrap_or(0);
        assert!(syncs > 0 && syncs <= store["commits"].as_u64().unwrap_or(0), "{report}");
        assert!(
            store["journal_sync_ms"]["mean"].as_f64().is_some_and(|ms| ms > 0.0),
            "{report}"
        );
    }
}

/// Runs `chinwag bench --json` with `args` and checks it succeeded and counted every
/// message it sent as delivered exactly once; returns its report.
pub async fn bench_without_loss(args: &[&str]) -> serde_json::Value {
    let (code, out) = run_cli(args).await;
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(code, 0, "{out}");
    assert!(report["sent"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(report["delivered"], report["sent"], "{out}");
    for counted in ["lost", "duplicated", "reordered", "errors"] {
        assert_eq!(report[counted], 0, "{counted}: {out}");
    }
    check_latency_by_second(&report);
    report
}

/// Every delivery is in exactly one second of the timeline, seconds ascend, and each
/// second's percentiles are ordered.
fn check_latency_by_second(report: &serde_json::Value) {
    let seconds = report["latency_by_second_ms"].as_array().expect("latency_by_second_ms");
    let total: u64 = seconds.iter().map(|s| s["messages"].as_u64().unwrap()).sum();
    assert_eq!(total, report["delivered"].as_u64().unwrap(), "{report}");
    let numbers: Vec<u64> = seconds.iter().map(|s| s["second"].as_u64().unwrap()).collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{report}");
    for s in seconds {
        let (p50, p99, max) = (
            s["p50"].as_f64().unwrap(),
            s["p99"].as_f64().unwrap(),
            s["max"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{s}");
    }
}

/// `chinwag send` as a user would run it; returns (exit code, stdout).
pub async fn cli_send(server: &str, token: &str, to: &str, text: &str, client_id: Option<&str>) -> (i32, String) {
    let mut args = vec!["send", "--server", server, "--token", token.trim(), "--to", to];
    if let Some(id) = client_id {
        args.extend(["--client-id", id]);
    }
    args.push(text);
    run_cli(&args).await
}

/// `chinwag listen` with extra flags; returns (exit code, stdout).
pub async fn cli_listen(server: &str, token: &str, flags: &[&str]) -> (i32, String) {
    let mut args = vec!["listen", "--server", server, "--token", token.trim()];
    args.extend_from_slice(flags);
    run_cli(&args).await
}

/// Several DCs as separate `chinwag serve` processes, each with its own data directory,
/// linked by their gateways through [`Proxy`]s the test can cut.
pub struct Cluster {
    pub dir: PathBuf,
    pub names: Vec<String>,
    pub nodes: Vec<Node>,
    /// `proxies[(a, b)]` carries the links DC a dials to DC b.
    pub proxies: std::collections::BTreeMap<(usize, usize), Proxy>,
}

pub const DC_NAMES: [&str; 5] = ["east", "west", "south", "north", "centre"];

/// A DC's config up to its peers: credentials from `creds`, its gateway on a port the
/// node picks itself.
fn dc_config(creds: &Path, name: &str) -> String {
    format!(
        "dc = \"{name}\"\n[tokens]\nkey_file = \"{}\"\n[cluster]\ngateway_listen = \"127.0.0.1:0\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        creds.join("token.key").display(),
        creds.join("ca.pem").display(),
        creds.join(format!("{name}.pem")).display(),
        creds.join(format!("{name}.key")).display(),
    )
}

impl Cluster {
    pub async fn start(dir: &Path, n: usize) -> Cluster {
        Self::start_with(dir, n, "").await
    }

    /// With extra lines for each DC's `[cluster]` table (e.g. `[cluster.timing]`).
    pub async fn start_with(dir: &Path, n: usize, cluster_extra: &str) -> Cluster {
        let names: Vec<String> = DC_NAMES[..n].iter().map(|s| s.to_string()).collect();
        let creds = dir.join("cluster");
        let mut init = vec!["cluster", "init", "--dir", creds.to_str().unwrap()];
        for name in &names {
            init.extend(["--dc", name]);
        }
        let (code, _) = run_cli(&init).await;
        assert_eq!(code, 0, "cluster init failed");
        // One proxy per direction: every DC dials every peer. The proxies exist first, so
        // each DC's config can name them; they learn where to forward once the DCs have
        // bound their gateways to ports of their own choosing (a port picked here and
        // released could be taken by a parallel test before the DC binds it).
        let mut proxies = std::collections::BTreeMap::new();
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                proxies.insert((from, to), Proxy::start().await);
            }
        }
        let mut nodes = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let node_dir = dir.join(name);
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut config = dc_config(&creds, name);
            for (j, peer) in names.iter().enumerate().filter(|(j, _)| *j != i) {
                let proxy = &proxies[&(i, j)];
                config.push_str(&format!(
                    "[[cluster.peers]]\ndc = \"{peer}\"\ngateway = \"{}\"\n",
                    proxy.addr
                ));
            }
            config.push_str(cluster_extra);
            nodes.push(Node::start_in(&node_dir, &config));
        }
        let cluster = Cluster {
            dir: dir.to_owned(),
            names,
            nodes,
            proxies,
        };
        let mut gateways = Vec::with_capacity(n);
        for dc in 0..n {
            gateways.push(cluster.gateway(dc).await);
        }
        for ((_, to), proxy) in &cluster.proxies {
            proxy.forward_to(gateways[*to]);
        }
        cluster.wait_linked().await;
        cluster
    }

    pub fn token(&self, user: &str) -> String {
        token_for(&self.dir.join("cluster"), user, Duration::from_secs(3600))
    }

    /// Adds a DC the running ones were never configured with: it gets a certificate from
    /// the cluster CA and lists them as peers; they accept it when it dials.
    pub async fn add_dc(&mut self, name: &str, cluster_extra: &str) -> usize {
        let creds = self.dir.join("cluster");
        let (code, _) = run_cli(&["cluster", "add-dc", "--dir", creds.to_str().unwrap(), "--dc", name]).await;
        assert_eq!(code, 0, "cluster add-dc failed");
        let node_dir = self.dir.join(name);
        std::fs::create_dir_all(&node_dir).unwrap();
        let mut config = dc_config(&creds, name);
        for i in 0..self.nodes.len() {
            let gateway = self.gateway(i).await;
            config.push_str(&format!(
                "[[cluster.peers]]\ndc = \"{}\"\ngateway = \"{gateway}\"\n",
                self.names[i]
            ));
        }
        config.push_str(cluster_extra);
        self.nodes.push(Node::start_in(&node_dir, &config));
        self.names.push(name.to_owned());
        self.nodes.len() - 1
    }

    pub async fn login(&self, dc: usize, user: &str) -> Connection {
        let (conn, welcome) = Connection::login(&self.nodes[dc].url(), &self.token(user))
            .await
            .expect("login");
        assert_eq!(welcome.dc, self.names[dc]);
        conn
    }

    /// Where DC `dc`'s gateway listens, once its replication driver has said so.
    pub async fn gateway(&self, dc: usize) -> SocketAddr {
        for _ in 0..200 {
            if let Some(addr) = self.status(dc).await["gateway"].as_str() {
                return addr.parse().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("DC {dc} never reported its gateway address");
    }

    pub async fn status(&self, dc: usize) -> serde_json::Value {
        serde_json::from_str(&http_get(&self.nodes[dc].http("/v1/cluster")).await).unwrap()
    }

    /// Waits until every DC has a live link to every other.
    pub async fn wait_linked(&self) {
        self.wait_until("all links up", |s| {
            s["peers"].as_array().unwrap().iter().all(|p| p["connected"] == true)
        })
        .await;
    }

    /// Waits until every DC has applied everything every other DC has: the version vectors
    /// agree, and still agree unchanged a few status updates later (each DC publishes its
    /// status once per anti-entropy tick, so a single agreeing poll could be stale).
    pub async fn wait_converged(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut previous: Option<serde_json::Value> = None;
        loop {
            let mut applied = Vec::new();
            for i in 0..self.nodes.len() {
                applied.push(self.status(i).await["applied"].clone());
            }
            let agreed = applied.windows(2).all(|w| w[0] == w[1]);
            if agreed && previous.as_ref() == Some(&applied[0]) {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "no convergence: {applied:?}");
            previous = agreed.then(|| applied[0].clone());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub async fn wait_until(&self, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        'outer: loop {
            for i in 0..self.nodes.len() {
                let s = self.status(i).await;
                if !ok(&s) {
                    assert!(tokio::time::Instant::now() < deadline, "never {what}: {s}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'outer;
                }
            }
            return;
        }
    }

    /// Cuts every link of DC `dc` (its processes keep running).
    pub fn isolate(&self, dc: usize) {
        for ((a, b), proxy) in &self.proxies {
            if *a == dc || *b == dc {
                proxy.cut();
            }
        }
    }

    /// Cuts the links between DCs `a` and `b` only.
    pub fn cut_pair(&self, a: usize, b: usize) {
        self.proxies[&(a, b)].cut();
        self.proxies[&(b, a)].cut();
    }

    pub fn heal(&self) {
        for proxy in self.proxies.values() {
            proxy.heal();
        }
    }
}

/// A TCP forwarder between two gateways that a test can cut and heal: a real partition
/// of the link while both processes keep running.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    target: tokio::sync::watch::Sender<Option<SocketAddr>>,
}

impl Proxy {
    /// Listens at once; connections wait until [`Proxy::forward_to`] names the target.
    pub async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, _) = tokio::sync::watch::channel(false);
        let cut = std::sync::Arc::new(cut);
        let (target, _) = tokio::sync::watch::channel(None);
        let state = cut.clone();
        let mut targets = target.subscribe();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *state.borrow() {
                    continue; // dropped: refused while cut
                }
                let mut cut_rx = state.subscribe();
                // Only `None` until the cluster is up; a closed channel means the test ended.
                let Ok(Some(to)) = targets.wait_for(Option::is_some).await.map(|t| *t) else {
                    return;
                };
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    let (mut a, mut b) = (inbound, outbound);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Proxy { addr, cut, target }
    }

    pub fn forward_to(&self, target: SocketAddr) {
        self.target.send_replace(Some(target));
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

/// Where a protocol test runs: one node, or three DCs with users spread over them (each
/// user always in the same DC, chosen from the name).
pub enum Place {
    Single(tempfile::TempDir, Node),
    Spread(tempfile::TempDir, Cluster),
}

impl Place {
    pub async fn single(config: &str) -> Place {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start_in(dir.path(), config);
        Place::Single(dir, node)
    }

    pub async fn spread(config: &str) -> Place {
        let dir = tempfile::tempdir().unwrap();
        let cluster = Cluster::start_with(dir.path(), 3, config).await;
        Place::Spread(dir, cluster)
    }

    fn dc_of(user: &str) -> usize {
        user.bytes().map(usize::from).sum::<usize>() % 3
    }

    pub fn url(&self, user: &str) -> String {
        match self {
            Place::Single(_, node) => node.url(),
            Place::Spread(_, c) => c.nodes[Self::dc_of(user)].url(),
        }
    }

    pub async fn login(&self, user: &str) -> Connection {
        match self {
            Place::Single(_, node) => node.login(user).await,
            Place::Spread(_, c) => c.login(Self::dc_of(user), user).await,
        }
    }

    /// Logs in asking for `delivered` receipts.
    pub async fn login_with_receipts(&self, user: &str) -> Connection {
        let options = chinwag_client::ConnectOptions {
            receipts: true,
            ..Default::default()
        };
        self.login_with(user, &options).await
    }

    pub async fn login_with(&self, user: &str, options: &chinwag_client::ConnectOptions) -> Connection {
        let token = match self {
            Place::Single(_, node) => node.token(user),
            Place::Spread(_, c) => c.token(user),
        };
        let (conn, _) = Connection::login_with(&self.url(user), &token, options)
            .await
            .expect("login");
        conn
    }

    /// A metric once replication has settled: counters summed over the DCs, gauges (which
    /// must then agree) from any.
    pub async fn metric(&self, name: &str) -> f64 {
        match self {
            Place::Single(_, node) => node.metric(name).await,
            Place::Spread(_, c) => {
                c.wait_converged().await;
                let mut values = Vec::new();
                for node in &c.nodes {
                    values.push(node.metric(name).await);
                }
                if name.ends_with("_total") {
                    values.iter().sum()
                } else {
                    assert!(
                        values.windows(2).all(|w| w[0] == w[1]),
                        "{name} differs between DCs: {values:?}"
                    );
                    values[0]
                }
            }
        }
    }
}
