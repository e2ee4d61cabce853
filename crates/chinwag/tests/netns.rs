//! A real network partition: one DC runs in its own network namespace behind a veth pair,
//! and the test takes the link down (packets silently dropped, no connection resets) while
//! that DC's users keep chatting inside the namespace. Needs root; skipped otherwise.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chinwag_client::Connection;
use chinwag_proto::ClientFrame;
use common::*;

/// A network namespace joined to the host by a veth pair, removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().is_ok_and(|s| s.success())
}

impl Netns {
    fn create() -> Option<Netns> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .is_some_and(|o| o.stdout.starts_with(b"0\n"));
        if !is_root {
            return None;
        }
        let tag = std::process::id() % 200 + 20;
        let ns = Netns {
            name: format!("chinwag-{tag}"),
            host_if: format!("cwh{tag}"),
            host_ip: format!("10.213.{tag}.1"),
            ns_ip: format!("10.213.{tag}.2"),
        };
        let ns_if = format!("cwn{tag}");
        let ok = ip(&["netns", "add", &ns.name])
            && ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if])
            && ip(&["link", "set", &ns_if, "netns", &ns.name])
            && ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if])
            && ip(&["link", "set", &ns.host_if, "up"])
            && ip(&[
                "netns",
                "exec",
                &ns.name,
                "ip",
                "addr",
                "add",
                &format!("{}/30", ns.ns_ip),
                "dev",
                &ns_if,
            ])
            && ip(&["netns", "exec", &ns.name, "ip", "link", "set", &ns_if, "up"])
            && ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        // As root the namespace must come up: a silent skip here would hide the test.
        assert!(ok, "could not create network namespace {} as root", ns.name);
        Some(ns)
    }

    fn set_link(&self, up: bool) {
        assert!(ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the other.
        ip(&["netns", "del", &self.name]);
    }
}

/// A fixed port on an address that only this test's veth pair carries (either end). A port picked by
/// binding to port 0 and releasing it comes from the ephemeral range, where the first DC's
/// outgoing dials (from the same address) could take it before the second DC binds it;
/// ports below `ip_local_port_range` are never handed out to outgoing connections.
fn port_on(host: &str, port: u16) -> SocketAddr {
    format!("{host}:{port}").parse().unwrap()
}

fn dc_config(creds: &Path, name: &str, gateway: SocketAddr, peers: &[(&str, SocketAddr)]) -> String {
    let mut config = format!(
        "dc = \"{name}\"\n[tokens]\nkey_file = \"{0}/token.key\"\n[cluster]\ngateway_listen = \"{gateway}\"\nca = \"{0}/ca.pem\"\ncert = \"{0}/{name}.pem\"\nkey = \"{0}/{name}.key\"\n",
        creds.display()
    );
    for (peer, addr) in peers {
        config.push_str(&format!("[[cluster.peers]]\ndc = \"{peer}\"\ngateway = \"{addr}\"\n"));
    }
    config
}

async fn status(node: &Node) -> serde_json::Value {
    serde_json::from_str(&http_get(&node.http("/v1/cluster")).await).unwrap()
}

async fn wait_for(what: &str, nodes: &[&Node], ok: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = Vec::new();
        for node in nodes {
            all.push(status(node).await);
        }
        if ok(&all) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never {what}: {all:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn linked(all: &[serde_json::Value]) -> bool {
    all.iter()
        .all(|s| s["peers"].as_array().unwrap().iter().all(|p| p["connected"] == true))
}

fn converged(all: &[serde_json::Value]) -> bool {
    all.windows(2).all(|w| w[0]["applied"] == w[1]["applied"])
}

/// Runs the chinwag CLI inside the namespace.
async fn in_ns(ns: &Netns, args: &[&str]) -> (i32, String) {
    let output = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, BIN])
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8(output.stdout).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dc_behind_a_downed_link_keeps_serving_locally_and_converges_after() {
    let Some(ns) = Netns::create() else {
        eprintln!("skipped: needs root to create a network namespace");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("cluster");
    let (code, _) = run_cli(&[
        "cluster",
        "init",
        "--dir",
        creds.to_str().unwrap(),
        "--dc",
        "east",
        "--dc",
        "west",
        "--dc",
        "south",
    ])
    .await;
    assert_eq!(code, 0);
    let (east_gw, west_gw) = (port_on(&ns.host_ip, 7801), port_on(&ns.host_ip, 7802));
    let (south_gw, south_client) = (port_on(&ns.ns_ip, 7800), port_on(&ns.ns_ip, 7700));
    let mk = |name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let east_cfg = dc_config(&creds, "east", east_gw, &[("west", west_gw), ("south", south_gw)]);
    let west_cfg = dc_config(&creds, "west", west_gw, &[("east", east_gw), ("south", south_gw)]);
    let south_cfg = dc_config(&creds, "south", south_gw, &[("east", east_gw), ("west", west_gw)]);
    let east = Node::start_at(&mk("east"), &east_cfg, port_on(&ns.host_ip, 7701));
    let west = Node::start_at(&mk("west"), &west_cfg, port_on(&ns.host_ip, 7702));
    let south = Node::start_in_netns(&mk("south"), &south_cfg, south_client, &ns.name);
    let nodes = [&east, &west, &south];
    wait_for("linked", &nodes, linked).await;

    let token = |user: &str| token_for(&creds, user, Duration::from_secs(600));
    let login = |node: &Node, user: &str| {
        let (url, token) = (node.url(), token(user));
        async move { Connection::login(&url, &token).await.expect("login").0 }
    };
    let mut alice = login(&east, "alice").await;
    let mut carol = login(&south, "carol").await;
    alice.send_message("carol", "before", "before the cut").await.unwrap();
    let (id, _, _) = next_message(&mut carol).await;
    carol.ack(vec![id]).await.unwrap();
    drop(carol);

    ns.set_link(false);
    // Inside the namespace, south's users keep chatting with each other.
    let server = south_client.to_string();
    for i in 0..5 {
        let (code, _) = in_ns(
            &ns,
            &[
                "send",
                "--server",
                &server,
                "--token",
                &token("dave"),
                "--to",
                "erin",
                &format!("local {i}"),
            ],
        )
        .await;
        assert_eq!(code, 0, "south's local send {i} failed during the partition");
    }
    let (code, out) = in_ns(
        &ns,
        &[
            "listen",
            "--server",
            &server,
            "--token",
            &token("erin"),
            "--count",
            "5",
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert_eq!((code, out.lines().count()), (0, 5), "{out}");
    // East and west carry on too; alice writes to carol, who is cut off.
    for i in 0..5 {
        alice
            .send_message("carol", &format!("during{i}"), &format!("during {i}"))
            .await
            .unwrap();
    }
    let mut bob = login(&west, "bob").await;
    alice.send_message("bob", "b", "west is fine").await.unwrap();
    assert_eq!(next_message(&mut bob).await.2, "west is fine");
    // The silent link is noticed.
    wait_for("south unreachable", &[&east], |all| {
        all[0]["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["dc"] == "south" && p["reachable"] == false)
    })
    .await;

    ns.set_link(true);
    wait_for("relinked", &nodes, linked).await;
    wait_for("converged", &nodes, converged).await;
    let mut carol = login(&south, "carol").await;
    let mut texts = Vec::new();
    while texts.len() < 5 {
        let (id, _, text) = next_message(&mut carol).await;
        carol.send(&ClientFrame::Ack { ids: vec![id] }).await.unwrap();
        texts.push(text);
    }
    assert_eq!(texts, (0..5).map(|i| format!("during {i}")).collect::<Vec<_>>());
    assert_silent(&mut carol, Duration::from_millis(500)).await;
}
