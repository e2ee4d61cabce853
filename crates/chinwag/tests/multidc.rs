//! Several DCs as real processes: the protocol across DCs, the critical case, faults.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use chinwag_client::Connection;
use chinwag_proto::ClientFrame;
use common::*;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn cluster(n: usize) -> (tempfile::TempDir, Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), n).await;
    (dir, cluster)
}

/// Reads messages until `n` distinct ones arrived (acknowledging each); fails on a
/// duplicate.
async fn receive(conn: &mut Connection, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    let mut ids = BTreeSet::new();
    while got.len() < n {
        let (id, from, text) = next_message(conn).await;
        assert!(ids.insert(id.clone()), "{id} delivered twice");
        conn.send(&ClientFrame::Ack { ids: vec![id] }).await.unwrap();
        got.push((from, text));
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_scenario_across_three_dcs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let mut demo = tokio::process::Command::new(BIN)
        .args(["demo", "--dcs", "3", "--data", data, "--json"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(demo.stdout.take().unwrap()).lines();
    let mut dcs = Vec::new();
    for _ in 0..3 {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        dcs.push((
            v["dc"].as_str().unwrap().to_owned(),
            v["ws"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        dcs.iter().map(|(d, _)| d.as_str()).collect::<Vec<_>>(),
        ["east", "west", "south"]
    );
    let token = |user: &str| token_for(dir.path(), user, Duration::from_secs(600));
    let login = |dc: usize, user: &'static str| {
        let (url, token) = (dcs[dc].1.clone(), token(user));
        async move { Connection::login(&url, &token).await.expect("login").0 }
    };

    // bob listening in DC 2 receives what alice sends from DC 1.
    let mut bob = login(1, "bob").await;
    let mut alice = login(0, "alice").await;
    alice.send_message("bob", "b1", "hello bob").await.unwrap();
    assert_eq!(
        receive(&mut bob, 1).await,
        [("alice".to_owned(), "hello bob".to_owned())]
    );

    // carol, offline, gets alice's message when she logs into DC 3, exactly once...
    alice.send_message("carol", "c1", "for carol").await.unwrap();
    let mut carol = login(2, "carol").await;
    assert_eq!(receive(&mut carol, 1).await[0].1, "for carol");
    assert_silent(&mut carol, Duration::from_millis(300)).await;
    carol.close().await.unwrap();
    // ...and nothing more when she later logs into DC 2 (once her ack has replicated).
    let mut carol = login(1, "carol").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout(Duration::from_millis(500), carol.recv()).await {
            Err(_) => break,
            Ok(frame) => {
                // Delivered before the ack arrived: only allowed while replication is in flight.
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "acknowledged message still delivered: {frame:?}"
                );
                carol.close().await.unwrap();
                tokio::time::sleep(Duration::from_millis(200)).await;
                carol = login(1, "carol").await;
            }
        }
    }

    // dave logs into DC 2 and alice in DC 1 sends to him at once: he receives it without
    // reconnecting, although DC 1 cannot yet know he is online.
    let mut dave = login(1, "dave").await;
    alice.send_message("dave", "d1", "welcome dave").await.unwrap();
    assert_eq!(receive(&mut dave, 1).await[0].1, "welcome dave");

    // Ctrl-C stops every DC.
    let pid = demo.id().unwrap();
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), demo.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    for (_, url) in &dcs {
        assert!(
            Connection::connect(url).await.is_err(),
            "{url} still serving after the demo stopped"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_between_every_pair_of_dcs() {
    let (_dir, c) = cluster(3).await;
    let users = ["u-east", "u-west", "u-south"];
    let mut conns = Vec::new();
    for (dc, user) in users.iter().enumerate() {
        conns.push(c.login(dc, user).await);
    }
    for from in 0..3 {
        for to in 0..3 {
            if from != to {
                let text = format!("{} to {}", users[from], users[to]);
                conns[from]
                    .send_message(users[to], &format!("k{from}{to}"), &text)
                    .await
                    .unwrap();
                let got = receive(&mut conns[to], 1).await;
                assert_eq!(got, [(users[from].to_owned(), text)]);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_in_different_dcs_all_get_it_and_one_ack_clears_it_everywhere() {
    let (_dir, c) = cluster(3).await;
    let mut phone = c.login(1, "bob").await;
    let mut laptop = c.login(2, "bob").await;
    let mut alice = c.login(0, "alice").await;
    let sent = alice.send_message("bob", "x1", "to every device").await.unwrap();
    let (on_phone, _, _) = next_message(&mut phone).await;
    let (on_laptop, _, _) = next_message(&mut laptop).await;
    assert_eq!((&on_phone, &on_laptop), (&sent.id, &sent.id));
    phone.ack(vec![on_phone]).await.unwrap();
    c.wait_converged().await;
    for dc in 0..3 {
        let mut tablet = c.login(dc, "bob").await;
        assert_silent(&mut tablet, Duration::from_millis(300)).await;
    }
    for node in &c.nodes {
        assert_eq!(node.metric("chinwag_mailbox_depth").await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_view_shows_online_users_and_mailbox_depth_per_dc() {
    let (_dir, c) = cluster(3).await;
    let _bob_phone = c.login(1, "bob").await;
    let _bob_laptop = c.login(1, "bob").await;
    let _dan = c.login(2, "dan").await;
    let mut alice = c.login(0, "alice").await;
    alice.send_message("carol", "c1", "for later").await.unwrap();
    let row = |s: &serde_json::Value, dc: &str| {
        s["dcs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["dc"] == dc)
            .cloned()
            .unwrap()
    };
    // Every DC sees the same picture: one user each online in east (alice), west (bob,
    // on two devices) and south (dan); carol's message waiting in every mailbox.
    c.wait_until("showing users and mailboxes", |s| {
        ["east", "west", "south"].iter().all(|dc| {
            let r = row(s, dc);
            r["up"] == true && r["online_users"] == 1 && r["mailbox_depth"] == 1
        })
    })
    .await;
    let s = c.status(1).await;
    assert_eq!(s["dcs"][0]["dc"], "west", "this DC comes first");
    assert_eq!(s["dcs"][0]["lag_entries"], serde_json::Value::Null);
    // The live stream carries the same object.
    let (status, events) = http_request_for(&c.nodes[0].http("/v1/cluster/events"), Duration::from_millis(1500)).await;
    assert_eq!(status, 200);
    let first: serde_json::Value =
        serde_json::from_str(events.lines().find_map(|l| l.strip_prefix("data: ")).expect("an event")).unwrap();
    assert_eq!(first["dc"], "east");
    assert_eq!(first["dcs"].as_array().unwrap().len(), 3);

    // The links: all three pairs, up, with nothing outstanding; then west and south cut
    // off from each other, which east learns from their digests.
    let link = |s: &serde_json::Value, a: &str, b: &str| {
        s["links"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| (l["a"] == a && l["b"] == b) || (l["a"] == b && l["b"] == a))
            .cloned()
            .unwrap()
    };
    let (up, down) = (serde_json::json!(true), serde_json::json!(false));
    c.wait_until("all links up", |s| {
        s["links"].as_array().unwrap().len() == 3
            && s["links"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["up"] == up && l["lag_entries"] == 0)
    })
    .await;
    c.cut_pair(1, 2);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = c.status(0).await;
        if link(&s, "west", "south")["up"] == down {
            assert_eq!(link(&s, "east", "west")["up"], up);
            assert_eq!(link(&s, "east", "south")["up"], up);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "east never saw west-south cut: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_another_dc_gets_the_same_ack() {
    let (_dir, c) = cluster(2).await;
    let mut alice_east = c.login(0, "alice").await;
    let first = alice_east.send_message("bob", "same", "once").await.unwrap();
    c.wait_converged().await;
    let mut alice_west = c.login(1, "alice").await;
    let again = alice_west.send_message("bob", "same", "once").await.unwrap();
    assert_eq!(first, again);
    let mut bob = c.login(1, "bob").await;
    let (id, _, _) = next_message(&mut bob).await;
    assert_eq!(id, first.id);
    assert_silent(&mut bob, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_senders_messages_arrive_in_order_across_dcs() {
    let (_dir, c) = cluster(2).await;
    let mut alice = c.login(0, "alice").await;
    let mut bob = c.login(1, "bob").await;
    let n = 150;
    for i in 0..n {
        let frame = ClientFrame::Send {
            to: "bob".into(),
            client_id: format!("o{i}"),
            text: format!("{i}"),
            seq: None,
        };
        alice.send(&frame).await.unwrap();
    }
    let got = receive(&mut bob, n).await;
    let texts: Vec<String> = got.into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, (0..n).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinates_replicate_to_every_dc() {
    let (_dir, c) = cluster(3).await;
    let bob = c.login(1, "bob").await;
    // Every DC's store learns of bob's coordinate in west.
    for node in &c.nodes {
        node.wait_for_metric("chinwag_coordinates", 1.0).await;
    }
    bob.close().await.unwrap();
    for node in &c.nodes {
        node.wait_for_metric("chinwag_coordinates", 0.0).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dc_cut_off_keeps_serving_its_users_and_catches_up_after_healing() {
    let (_dir, c) = cluster(3).await;
    let mut carol = c.login(2, "carol").await;
    let mut dave = c.login(2, "dave").await;
    let mut alice = c.login(0, "alice").await;
    c.isolate(2);
    // South's own users keep chatting.
    for i in 0..5 {
        carol
            .send_message("dave", &format!("local{i}"), &format!("local {i}"))
            .await
            .unwrap();
    }
    assert_eq!(receive(&mut dave, 5).await.len(), 5);
    // Meanwhile alice in east writes to carol and to dave's absent friend in west.
    for i in 0..5 {
        alice
            .send_message("carol", &format!("far{i}"), &format!("far {i}"))
            .await
            .unwrap();
    }
    assert_silent(&mut carol, Duration::from_millis(500)).await;
    c.heal();
    let got = receive(&mut carol, 5).await;
    assert_eq!(
        got.iter().map(|(_, t)| t.clone()).collect::<Vec<_>>(),
        (0..5).map(|i| format!("far {i}")).collect::<Vec<_>>()
    );
    c.wait_converged().await;
    assert_silent(&mut carol, Duration::from_millis(300)).await;
    for node in &c.nodes {
        assert_eq!(
            node.metric("chinwag_mailbox_depth").await,
            0.0,
            "everything was acknowledged"
        );
    }
}

/// Sends messages `a{i}` to bob for each i in `range`, collecting their ids.
async fn send_range(alice: &mut Connection, range: std::ops::Range<u32>, ids: &mut BTreeSet<String>) {
    for i in range {
        let sent = alice
            .send_message("bob", &format!("a{i}"), &format!("{i}"))
            .await
            .unwrap();
        ids.insert(sent.id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dc_killed_with_sigkill_restarts_and_converges() {
    let (_dir, mut c) = cluster(3).await;
    let mut alice = c.login(0, "alice").await;
    let mut acked = BTreeSet::new();
    send_range(&mut alice, 0..20, &mut acked).await;
    c.nodes[1].kill9();
    // While west is down, more messages are accepted in east.
    send_range(&mut alice, 20..40, &mut acked).await;
    c.nodes[1].restart();
    c.wait_linked().await;
    let mut bob = c.login(1, "bob").await;
    let mut got = BTreeSet::new();
    while got.len() < acked.len() {
        let (id, _, _) = next_message(&mut bob).await;
        assert!(got.insert(id.clone()), "{id} delivered twice");
        bob.send(&ClientFrame::Ack { ids: vec![id] }).await.unwrap();
    }
    assert_eq!(got, acked);
    c.wait_converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_dc_catches_up_after_sigcont() {
    let (_dir, c) = cluster(3).await;
    let mut alice = c.login(0, "alice").await;
    let pid = c.nodes[2].pid().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    for i in 0..10 {
        alice
            .send_message("carol", &format!("s{i}"), &format!("{i}"))
            .await
            .unwrap();
    }
    let mut bob = c.login(1, "bob").await;
    alice.send_message("bob", "live", "west still works").await.unwrap();
    assert_eq!(receive(&mut bob, 1).await[0].1, "west still works");
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    c.wait_linked().await;
    let mut carol = c.login(2, "carol").await;
    assert_eq!(receive(&mut carol, 10).await.len(), 10);
    c.wait_converged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_without_cluster_credentials_cannot_join_or_inject() {
    let (_dir, c) = cluster(2).await;
    // A rogue calling itself "east", with credentials from its own CA, dials west's gateway
    // directly (as the real east does: "east" sorts before "west").
    let rogue_dir = tempfile::tempdir().unwrap();
    let creds = rogue_dir.path().join("cluster");
    let (code, _) = run_cli(&[
        "cluster",
        "init",
        "--dir",
        creds.to_str().unwrap(),
        "--dc",
        "east",
        "--dc",
        "west",
    ])
    .await;
    assert_eq!(code, 0);
    let west_gateway = c.status(1).await["gateway"].as_str().unwrap().to_owned();
    let config = format!(
        "dc = \"east\"\n[cluster]\ngateway_listen = \"127.0.0.1:0\"\nca = \"{0}/ca.pem\"\ncert = \"{0}/east.pem\"\nkey = \"{0}/east.key\"\n[[cluster.peers]]\ndc = \"west\"\ngateway = \"{west_gateway}\"\n",
        creds.display()
    );
    let rogue = Node::start_in(rogue_dir.path(), &config);
    // The rogue accepts a message from its own user; it must never reach the real cluster.
    let token = token_for(&rogue_dir.path().join("data"), "mallory", Duration::from_secs(60));
    let (mut mallory, _) = Connection::login(&rogue.url(), &token).await.unwrap();
    mallory.send_message("bob", "evil", "injected").await.unwrap();
    // Give it several dial attempts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rogue_status: serde_json::Value = serde_json::from_str(&http_get(&rogue.http("/v1/cluster")).await).unwrap();
    assert_eq!(
        rogue_status["peers"][0]["reachable"], false,
        "west answered the rogue: {rogue_status}"
    );
    let rogue_stream = rogue_status["stream"].as_str().unwrap().to_owned();
    let west = c.status(1).await;
    assert!(
        west["applied"].get(&rogue_stream).is_none(),
        "west applied the rogue's stream: {west}"
    );
    let mut bob = c.login(1, "bob").await;
    assert_silent(&mut bob, Duration::from_millis(500)).await;
    // The real link is unaffected.
    let mut alice = c.login(0, "alice").await;
    alice.send_message("bob", "real", "genuine").await.unwrap();
    assert_eq!(receive(&mut bob, 1).await[0].1, "genuine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_dc_joins_without_restarting_the_others() {
    let (_dir, mut c) = cluster(2).await;
    let mut alice = c.login(0, "alice").await;
    let waiting = alice.send_message("carol", "w1", "waiting for carol").await.unwrap();
    alice.send_message("bob", "b1", "for bob").await.unwrap();
    let mut bob = c.login(1, "bob").await;
    receive(&mut bob, 1).await;
    c.wait_converged().await;
    // Both DCs drop the log entries they both have.
    let deadline = tokio::time::Instant::now() + SOON;
    while c.status(0).await["truncated"].as_object().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "logs never truncated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let north = c.add_dc("north", "").await;
    c.wait_linked().await;
    c.wait_converged().await;
    // carol's message, accepted long before north existed, is there.
    let mut carol = c.login(north, "carol").await;
    let (id, _, text) = next_message(&mut carol).await;
    assert_eq!((id, text.as_str()), (waiting.id.clone(), "waiting for carol"));
    carol.ack(vec![waiting.id]).await.unwrap();
    // And north takes part like any DC: alice's next message reaches dave there.
    let mut dave = c.login(north, "dave").await;
    alice.send_message("dave", "d1", "hello north").await.unwrap();
    assert_eq!(receive(&mut dave, 1).await[0].1, "hello north");
    let east = c.status(0).await;
    assert!(
        east["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["dc"] == "north" && p["connected"] == true),
        "{east}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_dc_is_decommissioned_and_catches_up_if_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start_with(dir.path(), 3, "[cluster.timing]\ndecommission_after = \"2s\"\n").await;
    let mut alice = c.login(0, "alice").await;
    let erin = c.login(2, "erin").await;
    // erin's coordinate reaches east.
    c.nodes[0].wait_for_metric("chinwag_coordinates", 2.0).await;
    c.nodes[2].kill9();
    drop(erin);
    for i in 0..10 {
        alice
            .send_message("carol", &format!("k{i}"), &format!("{i}"))
            .await
            .unwrap();
    }
    // With south silent past decommission_after, east stops keeping its log for it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let east = c.status(0).await;
        let stream = east["stream"].as_str().unwrap_or_default().to_owned();
        let head = east["applied"][&stream].as_u64();
        let south_gone = east["peers"]
            .as_array()
            .is_some_and(|peers| peers.iter().any(|p| p["dc"] == "south" && p["decommissioned"] == true));
        if south_gone && head.is_some() && east["truncated"][&stream].as_u64() == head {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "east kept its log for a dead DC: {east}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nobody believes south's coordinates any more: erin is not online anywhere.
    assert_eq!(c.nodes[0].metric("chinwag_coordinates").await, 1.0);
    // South comes back: it catches up from a snapshot.
    c.nodes[2].restart();
    c.wait_linked().await;
    c.wait_converged().await;
    let mut carol = c.login(2, "carol").await;
    let got = receive(&mut carol, 10).await;
    assert_eq!(got.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dcs_cut_off_from_each_other_converge_through_a_third() {
    let (_dir, c) = cluster(3).await;
    c.cut_pair(0, 1);
    let mut alice = c.login(0, "alice").await;
    let mut bob = c.login(1, "bob").await;
    // east and west cannot talk; south relays in both directions.
    alice.send_message("bob", "r1", "via south").await.unwrap();
    assert_eq!(receive(&mut bob, 1).await[0].1, "via south");
    bob.send_message("alice", "r2", "and back").await.unwrap();
    assert_eq!(receive(&mut alice, 1).await[0].1, "and back");
    c.wait_converged().await;
    let east = c.status(0).await;
    let west = east["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["dc"] == "west")
        .unwrap()
        .clone();
    assert_eq!(west["connected"], false, "the pair was really cut: {east}");
}

/// The load generator spread over two DCs: every pair's receiver is in the other DC, so
/// every message it counts crossed the gateways, and none may be lost or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_sends_every_message_across_dcs() {
    let (_dir, cluster) = cluster(2).await;
    let data = cluster.dir.join("cluster");
    let (east, west, data) = (
        cluster.nodes[0].url(),
        cluster.nodes[1].url(),
        data.to_str().unwrap().to_owned(),
    );
    let common = [
        "bench", "--server", &east, "--server", &west, "--data", &data, "--json", "--users", "20",
    ];
    let mut sent = 0;
    for scenario in BENCH_SCENARIOS {
        let args: Vec<&str> = common.iter().chain(scenario).copied().collect();
        let report = bench_without_loss(&args).await;
        assert_store_reported(&report, 2);
        sent += report["sent"].as_u64().unwrap();
    }
    // Every message is stored in both DCs: each holds the other's as replicated entries.
    let replicated = "chinwag_mailbox_entries_replicated_total";
    let (into_east, into_west) = (
        cluster.nodes[0].metric(replicated).await,
        cluster.nodes[1].metric(replicated).await,
    );
    assert_eq!(into_east + into_west, sent as f64, "east {into_east}, west {into_west}");
    assert!(into_east > 0.0 && into_west > 0.0, "east {into_east}, west {into_west}");
}
