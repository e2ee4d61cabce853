//! `kill -9` of a node again and again under steady load, with clients that reconnect and
//! retry as real ones do. Counts what the application sees: every acknowledged send must
//! arrive exactly once (a redelivery of the same message id is deduplicated by id, as the
//! protocol asks of clients) and in the order it was accepted.
//!
//! `CHINWAG_KILLS` sets the number of kills (default 5; `docs/reliability.md` records 20):
//!
//! ```sh
//! CHINWAG_KILLS=20 cargo nextest run -p chinwag --test crash --no-capture
//! ```

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chinwag_client::{ConnectOptions, Connection};
use chinwag_proto::{ClientFrame, ServerFrame};
use common::*;

/// Sends in flight at once.
const WINDOW: usize = 32;
/// The steady load.
const RATE_PER_SEC: u64 = 2_000;

#[derive(Default)]
struct Ledger {
    /// Sends the server acknowledged, by sequence number.
    acked: BTreeSet<u64>,
    /// Message ids the application has seen, and the send each carried.
    seen_ids: HashSet<String>,
    /// Sends delivered to the application (once per send, under any id).
    delivered: BTreeMap<u64, String>,
    /// The same send delivered under a second message id: a real duplicate.
    duplicated: u64,
    /// The same message id delivered again after a reconnect (dropped by id).
    redelivered: u64,
    /// A send delivered after one accepted later than it.
    reordered: u64,
    highest: Option<u64>,
    /// Sends the server refused with an error.
    refused: u64,
}

async fn connect(url: &str, token: &str, options: &ConnectOptions, stop: &AtomicBool) -> Option<Connection> {
    loop {
        if let Ok((conn, _)) = Connection::login_with(url, token, options).await {
            return Some(conn);
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `k0`, `k1`, ... until `stop`, then until every send is acknowledged. After each
/// reconnect it sends again, with the same client id (and seq, if `numbered`), whatever
/// was not acknowledged.
async fn sender(
    url: String,
    token: String,
    numbered: bool,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
) {
    let mut next = 0u64;
    let mut unacked: BTreeSet<u64> = BTreeSet::new();
    let started = Instant::now();
    let options = ConnectOptions {
        device: numbered.then(|| "phone".to_owned()),
        ..ConnectOptions::default()
    };
    while let Some(mut conn) = connect(&url, &token, &options, &done).await {
        let mut in_flight: BTreeSet<u64> = BTreeSet::new();
        'conn: loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping && unacked.is_empty() {
                return;
            }
            // Resend what the last connection left unanswered, then new sends.
            let mut batch: Vec<u64> = unacked.difference(&in_flight).copied().collect();
            // A steady rate: new sends only as they fall due.
            let due = started.elapsed().as_millis() as u64 * RATE_PER_SEC / 1000;
            while !stopping && unacked.len() < WINDOW && next < due {
                unacked.insert(next);
                batch.push(next);
                next += 1;
            }
            for n in batch {
                let frame = ClientFrame::Send {
                    to: "sink".into(),
                    client_id: format!("k{n}"),
                    text: format!("{n}"),
                    seq: numbered.then_some(n + 1),
                };
                if conn.send(&frame).await.is_err() {
                    break 'conn;
                }
                in_flight.insert(n);
            }
            match tokio::time::timeout(Duration::from_millis(5), conn.recv()).await {
                Ok(Ok(ServerFrame::Sent { client_id, .. })) => {
                    let n: u64 = client_id[1..].parse().unwrap();
                    unacked.remove(&n);
                    in_flight.remove(&n);
                    ledger.lock().unwrap().acked.insert(n);
                }
                // Refused: count it, and send it again.
                Ok(Ok(ServerFrame::Error { client_id: Some(c), .. })) => {
                    in_flight.remove(&c[1..].parse().unwrap());
                    ledger.lock().unwrap().refused += 1;
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => break 'conn,
            }
        }
    }
}

/// Receives and acknowledges (in batches, as a busy client would) until `done`,
/// reconnecting whenever the node goes away.
async fn receiver(url: String, token: String, ledger: Arc<Mutex<Ledger>>, done: Arc<AtomicBool>) {
    while let Some(mut conn) = connect(&url, &token, &ConnectOptions::default(), &done).await {
        let mut acks = Vec::new();
        loop {
            if done.load(Ordering::Relaxed) {
                return;
            }
            let frame = match tokio::time::timeout(Duration::from_millis(20), conn.recv()).await {
                Ok(Ok(frame)) => Some(frame),
                Ok(Err(_)) => break,
                Err(_) => None,
            };
            let quiet = frame.is_none();
            if let Some(ServerFrame::Message { id, text, .. }) = frame {
                ledger.lock().unwrap().record(text.parse().unwrap(), &id);
                acks.push(id);
            }
            if (acks.len() >= 64 || quiet) && !acks.is_empty() && conn.ack(std::mem::take(&mut acks)).await.is_err() {
                break;
            }
        }
    }
}

impl Ledger {
    fn record(&mut self, n: u64, id: &str) {
        if !self.seen_ids.insert(id.to_owned()) {
            self.redelivered += 1;
        } else if self.delivered.insert(n, id.to_owned()).is_some() {
            self.duplicated += 1;
        } else {
            if self.highest.is_some_and(|h| n < h) {
                self.reordered += 1;
            }
            self.highest = self.highest.max(Some(n));
        }
    }
}

#[tokio::test]
async fn kill_9_under_load_loses_and_duplicates_nothing() {
    kill_9_under_load(false).await;
}

/// The same with a sender that numbers its sends: its retries are recognised by the
/// windows the store rebuilds from the journal after each kill.
#[tokio::test]
async fn kill_9_under_load_loses_and_duplicates_no_numbered_send() {
    kill_9_under_load(true).await;
}

async fn kill_9_under_load(numbered: bool) {
    let kills: usize = std::env::var("CHINWAG_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    // No limit may refuse a send here: a refused send retried later is rightly accepted
    // after later ones, and would read as reordering.
    // Small checkpoints, so that kills also land during checkpoints and just after them.
    let limits = "[limits]\nrate_per_sec = 100000\nburst = 100000\nuser_rate_per_sec = 100000\nuser_burst = 100000\nmailbox_max_messages = 10000000\n[store]\ncheckpoint_mib = 1\n";
    let mut node = Node::start_in(dir.path(), limits);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let send = tokio::spawn(sender(
        node.url(),
        node.token("source"),
        numbered,
        ledger.clone(),
        stop.clone(),
        done.clone(),
    ));
    let receive = tokio::spawn(receiver(node.url(), node.token("sink"), ledger.clone(), done.clone()));

    let started = Instant::now();
    for round in 0..kills {
        // Let load build up, at a different point of the commit cycle each round.
        tokio::time::sleep(Duration::from_millis(300 + 137 * (round as u64 % 5))).await;
        let acked = ledger.lock().unwrap().acked.len();
        node.kill9();
        node.restart();
        println!("kill {}: {acked} acknowledged so far", round + 1);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    // Everything acknowledged must arrive; give it time, bounded.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let l = ledger.lock().unwrap();
            let missing = l.acked.iter().filter(|n| !l.delivered.contains_key(n)).count();
            if send.is_finished() && missing == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{missing} acknowledged sends never arrived");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.store(true, Ordering::Relaxed);
    send.await.unwrap();
    receive.await.unwrap();

    let l = ledger.lock().unwrap();
    println!(
        "{kills} kills (numbered: {numbered}) in {:.1?}: {} acknowledged, {} delivered, 0 lost, {} duplicated, {} reordered, {} redelivered by id, {} refused",
        started.elapsed(),
        l.acked.len(),
        l.delivered.len(),
        l.duplicated,
        l.reordered,
        l.redelivered,
        l.refused
    );
    assert!(
        l.acked.len() > 100 * kills,
        "too little load to mean anything: {}",
        l.acked.len()
    );
    assert_eq!(l.duplicated, 0, "a send delivered under two message ids");
    assert_eq!(l.refused, 0, "sends refused");
    assert_eq!(l.reordered, 0, "a send delivered after a later one");
}
