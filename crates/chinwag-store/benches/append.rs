//! Durable mailbox append throughput: `cargo bench -p chinwag-store --bench append`.
//!
//! Every append here is acknowledged only after its group commit is on disk, exactly as
//! the server acknowledges a send. `sequential` is one caller waiting for each append in
//! turn (bounded by fsync latency); `concurrent/N` is N callers at once, as N connections
//! would be (this is what group commit is for); `pipelined` is one caller keeping 256
//! appends in flight, as one fast connection does.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chinwag_core::{ClientMsgId, CommitListener, Coordinate, NewMessage, SharedMessage, Store, UserId};
use chinwag_store::EmbeddedStore;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

struct Ignore;

impl CommitListener for Ignore {
    fn committed(&self, _: &SharedMessage, _: &[Coordinate]) {}
}

const RECIPIENTS: u64 = 1_000;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<EmbeddedStore>,
    users: Vec<UserId>,
    counter: AtomicU64,
    text: String,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = common::options(Duration::from_secs(3600));
        let store = EmbeddedStore::open(dir.path(), options, Arc::new(Ignore), Box::new(|_| {})).unwrap();
        Self {
            _dir: dir,
            store: Arc::new(store),
            users: (0..RECIPIENTS)
                .map(|i| UserId::parse(&format!("user{i}")).unwrap())
                .collect(),
            counter: AtomicU64::new(0),
            // 100-byte bodies, as in the load tests.
            text: "x".repeat(100),
        }
    }

    fn message(&self) -> NewMessage {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let users = self.users.len() as u64;
        NewMessage {
            from: self.users[(n % users) as usize].clone(),
            to: self.users[((n + 1) % users) as usize].clone(),
            client_id: ClientMsgId::parse(&format!("c{n}")).unwrap(),
            text: self.text.clone(),
            at_ms: 1_800_000_000_000,
            seq: None,
        }
    }
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let fixture = Arc::new(Fixture::new());
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));

    group.bench_function("sequential", |b| {
        b.to_async(&runtime).iter(|| {
            let fixture = fixture.clone();
            async move { fixture.store.append(fixture.message()).await.unwrap() }
        })
    });

    for callers in [16u64, 256, 1024] {
        group.bench_function(format!("concurrent/{callers}"), |b| {
            b.iter_custom(|iters| {
                let fixture = fixture.clone();
                runtime.block_on(async move {
                    let started = Instant::now();
                    let tasks: Vec<_> = (0..callers)
                        .map(|caller| {
                            let fixture = fixture.clone();
                            let mine = iters / callers + u64::from(caller < iters % callers);
                            tokio::spawn(async move {
                                for _ in 0..mine {
                                    fixture.store.append(fixture.message()).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    started.elapsed()
                })
            })
        });
    }

    group.bench_function("pipelined/256", |b| {
        b.iter_custom(|iters| {
            let fixture = fixture.clone();
            runtime.block_on(async move {
                let started = Instant::now();
                let mut in_flight = FuturesOrdered::new();
                let done = |r: Option<Result<chinwag_core::Receipt, chinwag_core::StoreError>>| r.unwrap().unwrap();
                for _ in 0..iters {
                    if in_flight.len() == 256 {
                        done(in_flight.next().await);
                    }
                    in_flight.push_back(fixture.store.append(fixture.message()));
                }
                while !in_flight.is_empty() {
                    done(in_flight.next().await);
                }
                started.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
