//! The command-line clients, configuration and HTTP endpoints, as a user runs them.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[tokio::test]
async fn send_and_listen_as_in_the_readme() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let server = format!("http://{}", node.addr);
    let (_, bob) = run_cli(&["token", "--data", data, "--user", "bob", "--ttl", "1h"]).await;
    let (_, alice) = run_cli(&["token", "--data", data, "--user", "alice"]).await;
    let listen = tokio::spawn({
        let (server, bob) = (server.clone(), bob.trim().to_owned());
        async move { cli_listen(&server, &bob, &["--count", "2", "--timeout", "10s"]).await }
    });
    let (code, first) = cli_send(&server, alice.trim(), "bob", "hi bob", None).await;
    assert_eq!(code, 0);
    let first: serde_json::Value = serde_json::from_str(first.trim()).unwrap();
    assert!(first["id"].as_str().unwrap().starts_with("local."));
    let (code, _) = cli_send(&server, alice.trim(), "bob", "again", Some("k1")).await;
    assert_eq!(code, 0);
    // A retry with the same client id: same ack, no second delivery.
    let (_, retry) = cli_send(&server, alice.trim(), "bob", "again", Some("k1")).await;
    let (code, out) = listen.await.unwrap();
    assert_eq!(code, 0);
    let got: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0]["from"].as_str(), got[0]["text"].as_str()),
        (Some("alice"), Some("hi bob"))
    );
    assert_eq!(got[0]["id"], first["id"]);
    let retry: serde_json::Value = serde_json::from_str(retry.trim()).unwrap();
    assert_eq!(got[1]["id"], retry["id"]);
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 0.0);
}

#[tokio::test]
async fn listen_exits_3_when_too_few_messages_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let token = node.token("lonely");
    let (code, out) = cli_listen(&node.addr.to_string(), &token, &["--count", "1", "--timeout", "500ms"]).await;
    assert_eq!((code, out.as_str()), (3, ""));
}

#[tokio::test]
async fn send_fails_clearly_without_a_server() {
    let (code, _) = run_cli(&[
        "send",
        "--server",
        "127.0.0.1:9",
        "--token",
        "t",
        "--to",
        "bob",
        "--timeout",
        "1s",
        "x",
    ])
    .await;
    assert_ne!(code, 0);
}

#[tokio::test]
async fn send_reports_a_bad_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let (code, _) = cli_send(&node.addr.to_string(), "forged", "bob", "x", None).await;
    assert_eq!(code, 1);
}

#[tokio::test]
async fn token_refuses_an_invalid_user_id() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out) = run_cli(&[
        "token",
        "--data",
        dir.path().to_str().unwrap(),
        "--user",
        "no spaces please",
    ])
    .await;
    assert_eq!((code, out.as_str()), (1, ""));
}

/// A `chinwag chat` process with piped stdin and stdout.
struct Chat {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Chat {
    fn start(node: &Node, user: &str) -> Chat {
        let mut child = tokio::process::Command::new(BIN)
            .args(["chat", "--server", &node.addr.to_string(), "--token", &node.token(user)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Chat { child, lines }
    }

    async fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        stdin.flush().await.unwrap();
    }

    async fn expect_line(&mut self, wanted: &str) {
        let deadline = tokio::time::Instant::now() + SOON;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no line {wanted:?}"))
                .unwrap()
                .unwrap_or_else(|| panic!("chat ended before {wanted:?}"));
            if line == wanted {
                return;
            }
        }
    }
}

#[tokio::test]
async fn two_users_chat_in_the_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let mut alice = Chat::start(&node, "alice");
    let mut bob = Chat::start(&node, "bob");
    alice.expect_line("* connected as alice (dc local, node n1). @name text: send to name | text: send to the current recipient | /to name | /quit").await;
    bob.expect_line("* connected as bob (dc local, node n1). @name text: send to name | text: send to the current recipient | /to name | /quit").await;
    alice.say("@bob hello from alice").await;
    alice.expect_line("* sent to bob").await;
    bob.expect_line("alice: hello from alice").await;
    bob.say("/to alice").await;
    bob.say("hi alice").await;
    alice.expect_line("bob: hi alice").await;
    // Ending input sends what is pending and exits cleanly.
    drop(bob.child.stdin.take());
    let status = tokio::time::timeout(SOON, bob.child.wait()).await.unwrap().unwrap();
    assert!(status.success());
    // Both messages were acknowledged (alice acks hers just after printing it).
    node.wait_for_metric("chinwag_mailbox_depth", 0.0).await;
    // Each chat run is a device that numbers its sends: one window each.
    node.wait_for_metric("chinwag_store_device_windows", 2.0).await;
}

#[tokio::test]
async fn config_file_cli_and_env_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("chinwag.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:1\"\ndc = \"east\"\nnode = \"edge-1\"\n[log]\nlevel = \"warn\"\n",
    )
    .unwrap();
    let data = dir.path().join("from-env");
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env("CHINWAG_DATA", &data)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(SOON, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(line.contains("(dc east, node edge-1)"), "{line}");
    let addr = line.split("://").nth(1).unwrap().split_whitespace().next().unwrap();
    assert_ne!(addr, "127.0.0.1:1", "--listen must override the file");
    let health: serde_json::Value = serde_json::from_str(&http_get(&format!("http://{addr}/healthz")).await).unwrap();
    assert_eq!(
        (health["dc"].as_str(), health["node"].as_str()),
        (Some("east"), Some("edge-1"))
    );
    assert!(data.join("token.key").exists() && data.join("store").is_dir());
}

#[tokio::test]
async fn bad_config_is_reported_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[limits]\nmax_conections = 10\n").unwrap();
    let output = tokio::process::Command::new(BIN)
        .args(["serve", "--config", config.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("max_conections"), "{stderr}");
}

#[tokio::test]
async fn zero_config_serve_uses_the_documented_defaults() {
    // Runs in a fresh directory; the default port may be taken on a busy machine, in which
    // case the error must say so.
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("CHINWAG_LISTEN")
        .env_remove("CHINWAG_DATA")
        .env_remove("CHINWAG_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    match tokio::time::timeout(SOON, lines.next_line()).await.unwrap().unwrap() {
        Some(line) => {
            assert!(
                line.starts_with("chinwag listening on http://127.0.0.1:7700 (dc local, node n1)"),
                "{line}"
            );
            assert!(dir.path().join("chinwag-data/token.key").exists());
        }
        None => {
            let mut err = String::new();
            tokio::io::AsyncReadExt::read_to_string(child.stderr.as_mut().unwrap(), &mut err)
                .await
                .unwrap();
            assert!(err.contains("cannot listen on 127.0.0.1:7700"), "{err}");
        }
    }
}

#[tokio::test]
async fn healthz_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let health: serde_json::Value = serde_json::from_str(&http_get(&node.http("/healthz")).await).unwrap();
    assert_eq!(health["status"], "ok");
    let mut bob = node.login("bob").await;
    let mut alice = node.login("alice").await;
    alice.send_message("bob", "m", "x").await.unwrap();
    let (id, _, _) = next_message(&mut bob).await;
    bob.ack(vec![id]).await.unwrap();
    let metrics = http_get(&node.http("/metrics")).await;
    for name in [
        "chinwag_connections 2",
        "chinwag_logins_total 2",
        "chinwag_messages_in_total 1",
        "chinwag_messages_out_total 1",
        "chinwag_mailbox_depth 0",
        "chinwag_coordinates 2",
        "chinwag_store_commit_seconds_bucket",
        "chinwag_store_commit_ops_bucket",
        "chinwag_pushes_total{outcome=\"queued\"} 1",
        "chinwag_store_sealed_memtables{keyspace=\"dedup\"} 0",
        "chinwag_store_level0_runs{keyspace=\"mailbox\"} 0",
        "chinwag_store_tables{keyspace=\"coords\"}",
        "chinwag_store_journals 1",
        "chinwag_store_compactions_running 0",
        "chinwag_store_writer_queue",
        // The message was acknowledged before a checkpoint, so it never reached fjall.
        "chinwag_store_held_messages 0",
        // Its idempotency record waits in memory (and the journal) to be written in bulk.
        "chinwag_store_held_receipts 1",
        // Sent without a number: no device's window.
        "chinwag_store_device_windows 0",
        "chinwag_store_window_receipts 0",
        "chinwag_store_memtable_bytes{keyspace=\"dedup\"} 0",
    ] {
        assert!(metrics.contains(name), "missing {name} in\n{metrics}");
    }
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        line.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
    };
    // The journal holds the message, its idempotency record, its acknowledgement and the
    // logins.
    assert!(value("chinwag_store_journal_bytes") > 0.0);
    // The send and the acknowledgement each waited for the journal's sync; commits of
    // coordinates alone do not sync.
    let syncs = value("chinwag_store_journal_sync_seconds_count");
    assert!(
        (1.0..=value("chinwag_store_commit_seconds_count")).contains(&syncs),
        "{syncs} journal syncs in\n{metrics}"
    );
    assert!(value("chinwag_store_journal_sync_seconds_sum") <= value("chinwag_store_commit_seconds_sum"));
    // fjall's journal is synced only by a commit that syncs the store's journal too.
    let fjall_syncs = value("chinwag_store_fjall_sync_seconds_count");
    assert!(fjall_syncs <= syncs, "{fjall_syncs} fjall syncs in\n{metrics}");
}

#[tokio::test]
async fn the_connection_limit_answers_503_server_busy() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "[limits]\nmax_connections = 2\n");
    let _a = node.login("a").await;
    let _b = node.login("b").await;
    let err = chinwag_client::Connection::connect(&node.url())
        .await
        .err()
        .expect("third connection refused");
    assert!(err.to_string().contains("503"), "{err}");
    drop(_a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.login("c").await;
}

#[tokio::test]
async fn the_load_generator_counts_every_message_against_a_real_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let common = node.bench_args();
    let pid = node.pid().to_string();
    for scenario in BENCH_SCENARIOS {
        let args: Vec<&str> = common
            .iter()
            .map(String::as_str)
            .chain(["--users", "20", "--pid", &pid])
            .chain(scenario.iter().copied())
            .collect();
        let report = bench_without_loss(&args).await;
        // Only paced runs say how late the generator itself was.
        assert_eq!(
            report["send_lag_ms"].is_object(),
            scenario.contains(&"--rate"),
            "{report}"
        );
        // Given the server's PID, its CPU is read from /proc: over the whole run, and
        // for pairs also over the sending phase alone.
        assert!(
            report["server_cpu_percent"].as_f64().is_some_and(|c| c >= 0.0),
            "{report}"
        );
        assert_eq!(
            report["server_load_cpu_percent"].is_number(),
            scenario.contains(&"pairs"),
            "{report}"
        );
        // The generator's own CPU needs no PID, and is reported for pairs.
        assert_eq!(
            report["generator_load_cpu_percent"].as_f64().is_some_and(|c| c >= 0.0),
            scenario.contains(&"pairs"),
            "{report}"
        );
        assert_store_reported(&report, 1);
    }
}

#[tokio::test]
async fn the_load_generator_reports_refusals_by_code() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "[limits]\nrate_per_sec = 5\nburst = 5\n");
    let scenario = [
        "--users",
        "2",
        "--scenario",
        "pairs",
        "--rate",
        "100",
        "--duration",
        "1s",
    ];
    let common = node.bench_args();
    let args: Vec<&str> = common.iter().map(String::as_str).chain(scenario).collect();
    let (code, out) = run_cli(&args).await;
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    // Refused sends were never accepted: nothing is lost, and the run succeeds.
    assert_eq!(code, 0, "{out}");
    assert_eq!(report["lost"], 0, "{out}");
    let errors = report["errors"].as_u64().unwrap();
    assert!(errors > 50, "{out}");
    assert_eq!(report["errors_by_code"]["rate_limited"], errors, "{out}");
    // `sent` counts what the server accepted.
    assert_eq!(report["delivered"], report["sent"], "{out}");
    // Without --pid there is no server CPU, but the generator still reports its own.
    assert!(report["server_load_cpu_percent"].is_null(), "{out}");
    assert!(report["generator_load_cpu_percent"].is_number(), "{out}");
}
