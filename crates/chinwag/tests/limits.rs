//! Limits at the edge and on connections, against a real node: TLS, the Origin allow-list,
//! connection limits per node and per address, slow and silent sockets, idle clients,
//! per-user rates, clients that stop reading, and many idle sockets.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use chinwag_client::{ClientError, ConnectOptions, Connection};
use chinwag_proto::{ClientFrame, ErrorCode, ServerFrame};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Connects to `to` from the loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Sends a WebSocket upgrade request with `extra` headers; returns the status and body.
async fn raw_upgrade(tcp: &mut TcpStream, addr: SocketAddr, extra: &str) -> (u16, String) {
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer to a refused upgrade is small and ends the connection.
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn error_code_of(body: &str) -> ErrorCode {
    match chinwag_proto::decode_server(body) {
        Ok(ServerFrame::Error { code, .. }) => code,
        other => panic!("expected an error body, got {other:?} from {body:?}"),
    }
}

/// Waits until the server closes `tcp`; returns how long that took.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn clients_chat_over_tls_and_plain_websocket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let node = Node::start_in(
        dir.path(),
        &format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let url = format!("wss://{}/v1/ws", node.addr);
    let options = ConnectOptions {
        ca: Some(cert_path.clone()),
        ..ConnectOptions::default()
    };
    let (mut alice, _) = Connection::login_with(&url, &node.token("alice"), &options)
        .await
        .unwrap();
    let (mut bob, _) = Connection::login_with(&url, &node.token("bob"), &options)
        .await
        .unwrap();
    alice.send_message("bob", "t1", "over TLS").await.unwrap();
    let (_, from, text) = next_message(&mut bob).await;
    assert_eq!((from.as_str(), text.as_str()), ("alice", "over TLS"));

    // Without the certificate trusted, and in plain text, nothing gets through.
    let untrusted = Connection::connect_with(&url, &ConnectOptions::default()).await;
    assert!(untrusted.is_err(), "a certificate nobody vouches for was accepted");
    let plain = tokio::time::timeout(SOON, Connection::connect(&node.url()))
        .await
        .unwrap();
    assert!(plain.is_err(), "plain WebSocket on a TLS port was accepted");

    // The CLI speaks TLS too, given the CA.
    let token = node.token("carol");
    let ca = cert_path.display().to_string();
    let (code, out) = run_cli(&[
        "send", "--server", &url, "--token", &token, "--ca", &ca, "--to", "bob", "hi",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let (_, from, _) = next_message(&mut bob).await;
    assert_eq!(from, "carol");
}

#[tokio::test]
async fn handshakes_from_origins_not_on_the_allow_list_get_403() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "[limits]\nallowed_origins = [\"https://chat.example\"]\n");
    let mut tcp = TcpStream::connect(node.addr).await.unwrap();
    let (status, body) = raw_upgrade(&mut tcp, node.addr, "Origin: https://evil.example\r\n").await;
    assert_eq!(status, 403);
    assert_eq!(error_code_of(&body), ErrorCode::OriginNotAllowed);

    for origin in [Some("https://chat.example".to_owned()), None] {
        let options = ConnectOptions {
            origin,
            ..ConnectOptions::default()
        };
        let (mut conn, _) = Connection::login_with(&node.url(), &node.token("alice"), &options)
            .await
            .unwrap();
        conn.send(&ClientFrame::Ping { nonce: Some(1) }).await.unwrap();
        assert!(matches!(next(&mut conn).await, ServerFrame::Pong { .. }));
    }
    assert!(node.metric("chinwag_errors_total{code=\"origin_not_allowed\"}").await >= 1.0);
}

#[tokio::test]
async fn one_address_cannot_take_more_than_its_share_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "[limits]\nmax_connections_per_ip = 3\n");
    let mut held = Vec::new();
    for user in ["a", "b", "c"] {
        held.push(node.login(user).await);
    }
    let mut tcp = connect_from(loopback(1), node.addr).await.unwrap();
    let (status, body) = raw_upgrade(&mut tcp, node.addr, "").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(error_code_of(&body), ErrorCode::TooManyConnections);

    // Another address is not affected.
    let stream = connect_from(loopback(2), node.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(node.url(), stream).await.unwrap();
    let login = chinwag_proto::encode_client(&ClientFrame::Login {
        token: node.token("d"),
        receipts: false,
        device: None,
    });
    ws.send(WsMessage::text(login)).await.unwrap();
    let reply = tokio::time::timeout(SOON, ws.next()).await.unwrap().unwrap().unwrap();
    assert!(reply.to_text().unwrap().contains("welcome"), "{reply:?}");

    // A closed connection gives its place back.
    held.pop().unwrap().close().await.unwrap();
    let deadline = Instant::now() + SOON;
    let e = loop {
        if let Ok((conn, _)) = Connection::login(&node.url(), &node.token("e")).await {
            break conn;
        }
        assert!(Instant::now() < deadline, "the address never got its place back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The address is full again; closing frees a place for the metrics request.
    e.close().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        node.metric("chinwag_connections_refused_total{reason=\"address\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn silent_and_slowloris_sockets_are_dropped_within_10s_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    let addr = node.addr;
    let silent = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        closed_within(&mut tcp, Duration::from_secs(12)).await
    });
    // A request head dribbled one byte at a time never completes in time.
    let dribble = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let head = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nX-Padding: {}\r\n",
            "p".repeat(200)
        );
        for byte in head.bytes() {
            if tcp.write_all(&[byte]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            if started.elapsed() > Duration::from_secs(12) {
                panic!("a slowloris request head was still being read after 12 s");
            }
        }
        panic!("the whole head went through without the connection being dropped");
    });
    // Meanwhile everyone else is served.
    assert_others_unaffected(&node, "during").await;
    for (what, task) in [("silent", silent), ("dribbling", dribble)] {
        let took = task.await.unwrap();
        assert!(
            took <= Duration::from_secs(11),
            "{what} socket dropped only after {took:?}"
        );
    }
}

#[tokio::test]
async fn quiet_clients_are_pinged_and_only_silent_ones_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(
        dir.path(),
        "[limits]\nping_interval = \"300ms\"\nidle_timeout = \"1s\"\n",
    );
    let mut reader = node.login("reader").await;
    let mut silent = node.login("silent").await;
    // The reader's WebSocket library answers the pings; it stays connected.
    assert_silent(&mut reader, Duration::from_millis(2500)).await;
    reader.send(&ClientFrame::Ping { nonce: Some(2) }).await.unwrap();
    assert!(matches!(next(&mut reader).await, ServerFrame::Pong { .. }));
    // The other read nothing for as long, so it answered nothing: closed with 1001.
    assert_eq!(next_error(&mut silent).await.0, ErrorCode::IdleTimeout);
    match next_or_close(&mut silent).await {
        Err(ClientError::Closed(Some((1001, _)))) => {}
        other => panic!("expected close 1001, got {other:?}"),
    }
}

#[tokio::test]
async fn a_users_devices_share_one_send_rate() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "[limits]\nuser_rate_per_sec = 1\nuser_burst = 2\n");
    let mut phone = node.login("bob").await;
    let mut laptop = node.login("bob").await;
    phone.send_message("al", "p1", "1").await.unwrap();
    phone.send_message("al", "p2", "2").await.unwrap();
    match laptop.send_message("al", "l1", "3").await {
        Err(ClientError::Server {
            code: ErrorCode::RateLimited,
            message,
        }) => assert!(message.contains("across its connections"), "{message}"),
        other => panic!("expected rate_limited, got {other:?}"),
    }
    // Another user is not limited by bob's sending.
    let mut carol = node.login("carol").await;
    carol.send_message("al", "c1", "4").await.unwrap();
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(
        dir.path(),
        "[limits]\nsend_timeout = \"1s\"\nrate_per_sec = 100000\nburst = 100000\nuser_rate_per_sec = 100000\nuser_burst = 100000\n",
    );
    // Bob logs in over a socket with a tiny receive buffer, then reads no more.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(node.addr).await.unwrap();
    let (mut stalled, _) = tokio_tungstenite::client_async(node.url(), stream).await.unwrap();
    let login = chinwag_proto::encode_client(&ClientFrame::Login {
        token: node.token("bob"),
        receipts: false,
        device: None,
    });
    stalled.send(WsMessage::text(login)).await.unwrap();
    let welcome = tokio::time::timeout(SOON, stalled.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));

    let mut alice = node.login("alice").await;
    let n = 400;
    let body = "x".repeat(15_000);
    for i in 0..n {
        alice
            .send_message("bob", &format!("m{i}"), &format!("{i} {body}"))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + SOON;
    while node.metric("chinwag_slow_clients_total").await < 1.0 {
        assert!(Instant::now() < deadline, "the stalled client was never dropped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_others_unaffected(&node, "meanwhile").await;
    drop(stalled);

    // Everything is still in bob's mailbox, in order.
    let mut bob = node.login("bob").await;
    for i in 0..n {
        let (id, _, text) = next_message(&mut bob).await;
        assert!(
            text.starts_with(&format!("{i} ")),
            "message {i} out of place: {}",
            &text[..10]
        );
        bob.ack(vec![id]).await.unwrap();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[tokio::test]
async fn ten_thousand_idle_sockets_cost_under_100_mib_and_block_no_one() {
    let dir = tempfile::tempdir().unwrap();
    // The sockets are held past the default 10 s handshake timeout, to measure them all.
    let node = Node::start_in(dir.path(), "[limits]\nhandshake_timeout = \"120s\"\n");
    assert_others_unaffected(&node, "warm").await;
    let before = rss_kib(node.pid());
    let (sources, per_source) = (20u8, 500);
    let mut sockets = Vec::new();
    for source in 0..sources {
        for _ in 0..per_source {
            sockets.push(connect_from(loopback(10 + source), node.addr).await.unwrap());
        }
    }
    let total = sockets.len() as f64;
    let deadline = Instant::now() + SOON;
    while node.metric("chinwag_sockets").await < total {
        assert!(Instant::now() < deadline, "the node never accepted every socket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_others_unaffected(&node, "loaded").await;
    let grew_kib = rss_kib(node.pid()).saturating_sub(before);
    println!("10,000 idle sockets: RSS grew by {grew_kib} KiB");
    assert!(grew_kib < 100 * 1024, "RSS grew by {grew_kib} KiB");
}
