//! Gateways on loopback with real certificates.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chinwag_core::{DcName, Epoch};
use chinwag_gateway::{Event, GatewayConfig, LinkHandle, TlsFiles, pki, tls};
use chinwag_replication::{StreamId, VersionVector, Wire};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

fn dc(name: &str) -> DcName {
    DcName::parse(name).unwrap()
}

fn files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: dir.join(pki::CA_CERT),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    }
}

struct Gw {
    events: mpsc::Receiver<Event>,
    addr: std::net::SocketAddr,
    counters: std::sync::Arc<chinwag_gateway::Counters>,
    _stop: watch::Sender<bool>,
}

/// An address nothing listens on: a gateway given it for its one peer waits to be dialled.
const NOWHERE: &str = "127.0.0.1:9";

async fn start(me: &str, tls_files: TlsFiles, peers: Vec<(DcName, String)>) -> Gw {
    start_on("127.0.0.1:0".parse().unwrap(), me, tls_files, peers).await
}

async fn start_on(listen: std::net::SocketAddr, me: &str, tls_files: TlsFiles, peers: Vec<(DcName, String)>) -> Gw {
    let (tx, events) = mpsc::channel(64);
    let (stop, stopped) = watch::channel(false);
    let cfg = GatewayConfig {
        me: dc(me),
        listen,
        peers,
        queue: 64,
    };
    let tls = tls::load(&tls_files).unwrap();
    let (addr, counters) = chinwag_gateway::start(cfg, tls, tx, stopped).await.unwrap();
    Gw {
        events,
        addr,
        counters,
        _stop: stop,
    }
}

async fn next(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event in time")
        .expect("open")
}

async fn link_up(events: &mut mpsc::Receiver<Event>) -> (DcName, LinkHandle) {
    match next(events).await {
        Event::Up { peer, link } => (peer, link),
        other => panic!("expected a link, got {other:?}"),
    }
}

fn hello(from: &str) -> Wire {
    Wire::Hello {
        dc: dc(from),
        stream: StreamId::new(dc(from), Epoch(1)),
        applied: VersionVector::default(),
    }
}

/// west listens; east dials it (east < west).
/// West on `listen`, waiting to be dialled by east.
async fn west_on(dir: &Path, listen: std::net::SocketAddr) -> Gw {
    start_on(listen, "west", files(dir, "west"), vec![(dc("east"), NOWHERE.into())]).await
}

async fn pair(dir: &Path, east_files: TlsFiles) -> (Gw, Gw) {
    let west = west_on(dir, "127.0.0.1:0".parse().unwrap()).await;
    let east = start("east", east_files, vec![(dc("west"), west.addr.to_string())]).await;
    (east, west)
}

#[tokio::test]
async fn peers_with_cluster_certificates_link_and_talk_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    pki::init_cluster(dir.path(), &[dc("east"), dc("west")]).unwrap();
    let (mut east, mut west) = pair(dir.path(), files(dir.path(), "east")).await;
    let (peer, to_west) = link_up(&mut east.events).await;
    assert_eq!(peer, dc("west"));
    let (peer, to_east) = link_up(&mut west.events).await;
    assert_eq!(peer, dc("east"));
    assert!(to_west.send(&hello("east")));
    assert!(to_east.send(&hello("west")));
    // Each message names the link it came on, the one its `Up` announced.
    match next(&mut west.events).await {
        Event::Message { peer, link, msg } => {
            assert_eq!((peer, link, msg), (dc("east"), to_east.id, hello("east")))
        }
        other => panic!("{other:?}"),
    }
    match next(&mut east.events).await {
        Event::Message { peer, link, msg } => {
            assert_eq!((peer, link, msg), (dc("west"), to_west.id, hello("west")))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        east.counters
            .get(&dc("west"))
            .unwrap()
            .bytes_out
            .load(Ordering::Relaxed)
            > 0
    );
}

#[tokio::test]
async fn a_peer_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    pki::init_cluster(dir.path(), &[dc("east"), dc("west")]).unwrap();
    let rogue = tempfile::tempdir().unwrap();
    pki::init_cluster(rogue.path(), &[dc("east")]).unwrap();
    // The rogue east trusts the real CA (so it would accept west) but its own certificate
    // is from another CA.
    let rogue_files = TlsFiles {
        ca: dir.path().join(pki::CA_CERT),
        ..files(rogue.path(), "east")
    };
    let (_east, mut west) = pair(dir.path(), rogue_files).await;
    // (With TLS 1.3 the rogue's own side may see its handshake finish before west checks
    // its certificate and closes; what matters is that west never accepts it.)
    let quiet = tokio::time::timeout(Duration::from_millis(1500), west.events.recv()).await;
    assert!(quiet.is_err(), "west must not accept the rogue: {quiet:?}");
}

#[tokio::test]
async fn a_dc_with_a_cluster_certificate_joins_unannounced_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    pki::init_cluster(dir.path(), &[dc("east"), dc("west"), dc("north")]).unwrap();
    // north is not in west's configuration, and dials west through east's entry in its
    // own: west links it as north, the name its certificate proves, not as east.
    let (mut north, mut west) = pair(dir.path(), files(dir.path(), "north")).await;
    let (peer, _link) = link_up(&mut west.events).await;
    assert_eq!(peer, dc("north"));
    let (_, _to_west) = link_up(&mut north.events).await;
}

#[tokio::test]
async fn a_bad_frame_is_skipped_and_the_link_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    pki::init_cluster(dir.path(), &[dc("east"), dc("west")]).unwrap();
    let mut west = west_on(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    // Speak the framing by hand as an authenticated east.
    let tls = tls::load(&files(dir.path(), "east")).unwrap();
    let tcp = tokio::net::TcpStream::connect(west.addr).await.unwrap();
    let mut stream = tls
        .connector
        .connect(tls::server_name(&dc("west")).unwrap(), tcp)
        .await
        .unwrap();
    // Dropping a link's handle closes the link, so keep it.
    let _link = link_up(&mut west.events).await;
    let garbage = [0xffu8, 0xee, 0xdd];
    stream.write_u32(garbage.len() as u32).await.unwrap();
    stream.write_all(&garbage).await.unwrap();
    let good = chinwag_replication::wire::encode(&hello("east"));
    stream.write_u32(good.len() as u32).await.unwrap();
    stream.write_all(&good).await.unwrap();
    stream.flush().await.unwrap();
    match next(&mut west.events).await {
        Event::Message { msg, .. } => assert_eq!(msg, hello("east")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        west.counters
            .get(&dc("east"))
            .unwrap()
            .frames_rejected
            .load(Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn a_link_comes_back_after_the_peer_restarts() {
    let dir = tempfile::tempdir().unwrap();
    pki::init_cluster(dir.path(), &[dc("east"), dc("west")]).unwrap();
    let west = west_on(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    let addr = west.addr;
    let mut east = start("east", files(dir.path(), "east"), vec![(dc("west"), addr.to_string())]).await;
    let _first = link_up(&mut east.events).await;
    drop(west);
    assert!(matches!(next(&mut east.events).await, Event::Down { .. }));
    // A new west on the same address.
    let mut west = west_on(dir.path(), addr).await;
    link_up(&mut west.events).await;
    link_up(&mut east.events).await;
}

#[tokio::test]
async fn connections_beyond_the_handshake_limit_are_closed_at_once() {
    use chinwag_gateway::MAX_HANDSHAKES;
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    pki::init_cluster(dir.path(), &[dc("east"), dc("west")]).unwrap();
    let west = west_on(dir.path(), "127.0.0.1:0".parse().unwrap()).await;
    // Connections that never begin a TLS handshake, as a flood would.
    let mut idle = Vec::new();
    for _ in 0..MAX_HANDSHAKES + 8 {
        idle.push(tokio::net::TcpStream::connect(west.addr).await.unwrap());
    }
    let mut byte = [0u8; 1];
    for extra in &mut idle[MAX_HANDSHAKES..] {
        let read = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "a connection past the limit was not closed"
        );
    }
    let waiting = tokio::time::timeout(Duration::from_millis(300), idle[0].read(&mut byte)).await;
    assert!(
        waiting.is_err(),
        "a connection within the limit is still given its handshake"
    );
    // Once they go, their places are free again: a peer links well before the idle
    // connections' handshakes would have timed out.
    drop(idle);
    let started = std::time::Instant::now();
    let mut west = west;
    let mut east = start(
        "east",
        files(dir.path(), "east"),
        vec![(dc("west"), west.addr.to_string())],
    )
    .await;
    assert_eq!(link_up(&mut east.events).await.0, dc("west"));
    assert_eq!(link_up(&mut west.events).await.0, dc("east"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "linked only after {:?}",
        started.elapsed()
    );
}
