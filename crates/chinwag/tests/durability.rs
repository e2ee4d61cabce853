//! Crashes and restarts: nothing acknowledged is lost, nothing is routed to a dead socket.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chinwag_proto::{ClientFrame, ServerFrame};
use common::*;

#[tokio::test]
async fn an_offline_message_survives_sigkill_and_is_delivered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("data/store/journal");
    offline_message_survives_sigkill(dir.path(), "", &journal).await;
}

/// The same with the journal in a directory of its own (`store.journal_dir`): that is
/// where the message is until a checkpoint, and where the restart finds it.
#[tokio::test]
async fn with_the_journal_in_its_own_directory_too() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let config = format!("[store]\njournal_dir = {:?}\n", journal.to_str().unwrap());
    offline_message_survives_sigkill(dir.path(), &config, &journal.join("journal")).await;
    assert!(!dir.path().join("data/store/journal").exists());
}

/// Sends a message to an offline user, checks that it is in `journal` (held there until a
/// checkpoint), kills the node and restarts it: the message is delivered once.
async fn offline_message_survives_sigkill(dir: &std::path::Path, config: &str, journal: &std::path::Path) {
    let mut node = Node::start_in(dir, config);
    let data = dir.join("data");
    let data = data.to_str().unwrap();
    let server = node.addr.to_string();
    let (code, alice) = run_cli(&["token", "--data", data, "--user", "alice"]).await;
    assert_eq!(code, 0);
    let (_, carol) = run_cli(&["token", "--data", data, "--user", "carol"]).await;
    let (code, ack) = cli_send(&server, alice.trim(), "carol", "survive this", None).await;
    assert_eq!(code, 0, "{ack}");
    let ack: serde_json::Value = serde_json::from_str(ack.trim()).unwrap();
    assert!(
        std::fs::metadata(journal).unwrap().len() > 0,
        "nothing in {}",
        journal.display()
    );

    node.kill9();
    node.restart();

    let (code, out) = cli_listen(&server, carol.trim(), &["--count", "1", "--timeout", "10s"]).await;
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert_eq!(lines[0]["id"], ack["id"]);
    assert_eq!(lines[0]["from"], "alice");
    assert_eq!(lines[0]["text"], "survive this");

    let (code, out) = cli_listen(&server, carol.trim(), &["--timeout", "2s"]).await;
    assert_eq!((code, out.as_str()), (0, ""), "a second listen must receive nothing");
}

#[tokio::test]
async fn acknowledged_sends_survive_sigkill_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(dir.path(), "[limits]\nrate_per_sec = 100000\nburst = 100000\n");
    let recipients = ["r1", "r2", "r3"];
    let mut sender = node.login("loader").await;
    // Pipeline sends and record every acknowledgement until the node dies under us.
    let mut acked: HashMap<String, String> = HashMap::new();
    let mut next_send = 0;
    let mut killed = false;
    loop {
        while next_send < 2_000 && next_send < acked.len() + 64 {
            let frame = ClientFrame::Send {
                to: recipients[next_send % 3].into(),
                client_id: format!("k{next_send}"),
                text: format!("{next_send}"),
                seq: None,
            };
            if sender.send(&frame).await.is_err() {
                break;
            }
            next_send += 1;
        }
        if !killed && acked.len() >= 300 {
            node.kill9();
            killed = true;
        }
        match tokio::time::timeout(SOON, sender.recv()).await.expect("frame") {
            Ok(ServerFrame::Sent { client_id, id, .. }) => {
                acked.insert(id, client_id);
            }
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    assert!(killed && acked.len() >= 300, "only {} acknowledged", acked.len());
    node.restart();

    let mut delivered = BTreeSet::new();
    for r in recipients {
        let mut conn = node.login(r).await;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), conn.recv()).await {
                Ok(Ok(ServerFrame::Message { id, .. })) => {
                    assert!(delivered.insert(id), "delivered twice")
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => break,
            }
        }
    }
    let lost: Vec<_> = acked.keys().filter(|id| !delivered.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}",
        lost.len(),
        lost.first()
    );
}

#[tokio::test]
async fn a_restart_drops_the_coordinates_of_the_previous_incarnation() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(dir.path(), "");
    let bob = node.login("bob").await;
    assert_eq!(node.metric("chinwag_coordinates").await, 1.0);
    let health: serde_json::Value = serde_json::from_str(&http_get(&node.http("/healthz")).await).unwrap();
    assert_eq!(health["incarnation"], 1);

    node.kill9();
    drop(bob);
    node.restart();

    let health: serde_json::Value = serde_json::from_str(&http_get(&node.http("/healthz")).await).unwrap();
    assert_eq!(health["incarnation"], 2);
    assert_eq!(node.metric("chinwag_coordinates").await, 0.0);
    let mut alice = node.login("alice").await;
    alice.send_message("bob", "after", "are you back?").await.unwrap();
    // No push was attempted toward the dead connection: it went to the mailbox only.
    let pushes = http_get(&node.http("/metrics")).await;
    assert!(pushes.contains("chinwag_pushes_total{outcome=\"gone\"} 0"), "{pushes}");
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 1.0);
    let mut bob = node.login("bob").await;
    let (_, _, text) = next_message(&mut bob).await;
    assert_eq!(text, "are you back?");
}

#[tokio::test]
async fn disconnecting_removes_the_coordinate() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let bob = node.login("bob").await;
    let laptop = node.login("bob").await;
    assert_eq!(node.metric("chinwag_coordinates").await, 2.0);
    bob.close().await.unwrap();
    node.wait_for_metric("chinwag_coordinates", 1.0).await;
    drop(laptop);
    node.wait_for_metric("chinwag_coordinates", 0.0).await;
    assert_eq!(node.metric("chinwag_connections").await, 0.0);
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start_in(dir.path(), "");
    let mut bob = node.login("bob").await;
    let status = node.terminate();
    assert!(status.success(), "{status:?}");
    match next_or_close(&mut bob).await {
        Err(chinwag_client::ClientError::Closed(Some((code, _)))) => assert_eq!(code, 1001),
        other => panic!("expected close 1001, got {other:?}"),
    }
}
