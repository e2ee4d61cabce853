//! What a long run of messages costs the store in compaction:
//! `cargo bench -p chinwag-store --bench sustained -- [MESSAGES [WINDOW_SECONDS]]`
//! (default 20,000,000 messages and the server's 24-hour dedup window; the run also ends
//! after 30 minutes).
//!
//! 64 callers append messages among 1,000 users as fast as the store takes them, and
//! every message is acknowledged (deleted) once committed, as a recipient online would.
//! So the mailbox stays small and what accumulates is what accumulates on a busy node:
//! the idempotency records of the dedup window. Every million messages it prints the
//! append rate, the time fjall spent compacting in that million and the shape of the
//! dedup table, and fjall's CPU time so far. fjall's CPU per million messages is the
//! figure to compare between builds or windows (its compaction time also counts waits for
//! the core); it grows with the records held (docs/performance.md).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chinwag_core::{ClientMsgId, CommitListener, Coordinate, NewMessage, SharedMessage, Store, UserId};
use chinwag_store::EmbeddedStore;
use tokio::sync::mpsc;

const USERS: u64 = 1_000;
const CALLERS: u64 = 64;
const REPORT_EVERY: u64 = 1_000_000;
const AT_MOST: Duration = Duration::from_secs(30 * 60);

/// Hands each committed message to the acknowledging task.
struct Recipients(mpsc::UnboundedSender<(UserId, u64)>);

impl CommitListener for Recipients {
    fn committed(&self, msg: &SharedMessage, _: &[Coordinate]) {
        let _ = self.0.send((msg.to.clone(), msg.seq));
    }
}

fn main() {
    // cargo adds flags of its own (`--bench`), so the numbers are picked out in order.
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<u64>().ok());
    let total = numbers.next().unwrap_or(20_000_000);
    let window = Duration::from_secs(numbers.next().unwrap_or(24 * 3600));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(total, window));
}

async fn run(total: u64, window: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let (committed, to_ack) = mpsc::unbounded_channel();
    let options = common::options(window);
    let listener = Arc::new(Recipients(committed));
    let store = Arc::new(EmbeddedStore::open(dir.path(), options, listener, Box::new(|_| {})).unwrap());
    let users: Arc<Vec<UserId>> = Arc::new(
        (0..USERS)
            .map(|i| UserId::parse(&format!("user{i}")).unwrap())
            .collect(),
    );
    let acker = tokio::spawn(acknowledge(store.clone(), to_ack));
    let next = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + AT_MOST;
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| tokio::spawn(append(store.clone(), users.clone(), next.clone(), total, until)))
        .collect();
    println!("dedup window {} s", window.as_secs());
    report(&store, &next, total, until).await;
    for caller in callers {
        caller.await.unwrap();
    }
    store.close().await;
    drop(store);
    acker.await.unwrap();
}

async fn append(store: Arc<EmbeddedStore>, users: Arc<Vec<UserId>>, next: Arc<AtomicU64>, total: u64, until: Instant) {
    let text = "x".repeat(100);
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= total || Instant::now() > until {
            return;
        }
        let msg = NewMessage {
            from: users[(n % USERS) as usize].clone(),
            to: users[((n * 7 + 1) % USERS) as usize].clone(),
            client_id: ClientMsgId::parse(&format!("m{n:x}")).unwrap(),
            text: text.clone(),
            at_ms: now_ms(),
            seq: None,
        };
        store.append(msg).await.unwrap();
    }
}

/// Acknowledges committed messages in groups per user, as recipients' acks arrive.
async fn acknowledge(store: Arc<EmbeddedStore>, mut committed: mpsc::UnboundedReceiver<(UserId, u64)>) {
    let mut batch = Vec::new();
    while committed.recv_many(&mut batch, 4096).await > 0 {
        let mut by_user: HashMap<UserId, Vec<u64>> = HashMap::new();
        for (user, seq) in batch.drain(..) {
            by_user.entry(user).or_default().push(seq);
        }
        for (user, seqs) in by_user {
            if store.ack(user, seqs).await.is_err() {
                return; // closed at the end of the run
            }
        }
    }
}

async fn report(store: &EmbeddedStore, next: &AtomicU64, total: u64, until: Instant) {
    println!("messages  append/s  compaction s (this million)  dedup: MB, tables, level-0 runs  fjall CPU s (total)");
    let (mut mark, mut last_time, mut last_compaction) = (REPORT_EVERY, Instant::now(), 0);
    while mark <= total && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if next.load(Ordering::Relaxed) < mark {
            continue;
        }
        let engine = store.engine_stats();
        let dedup = engine.keyspaces.iter().find(|k| k.name == "dedup").unwrap();
        let rate = REPORT_EVERY as f64 / last_time.elapsed().as_secs_f64();
        println!(
            "{mark:>8}  {rate:>8.0}  {:>27.1}  {:>6.0} {:>3} {:>3}  {:>8.1}",
            (engine.compaction_micros - last_compaction) as f64 / 1e6,
            dedup.disk_bytes as f64 / 1e6,
            dedup.tables,
            dedup.level0_runs,
            fjall_cpu_seconds(),
        );
        (mark, last_time, last_compaction) = (mark + REPORT_EVERY, Instant::now(), engine.compaction_micros);
    }
}

/// CPU time of fjall's worker threads so far (Linux; 0 elsewhere).
fn fjall_cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ticks: u64 = tasks
        .flatten()
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("fjall")))
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    ticks as f64 / 100.0
}

fn now_ms() -> u64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    u64::try_from(since.as_millis()).unwrap()
}
