//! Routing and session delivery: `cargo bench -p chinwag-core --bench routing`.
//!
//! `delivery/fanout-N`: a committed message handed to the router for N coordinates (a
//! user's devices). `session/push`: a live session taking a pushed message and producing
//! its delivery.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chinwag_core::{
    AuthError, Authenticate, ClientMsgId, CommitListener, Coordinate, DcName, Delivery, Epoch, Message, MessageId,
    NodeName, Output, PushOutcome, Router, Session, SessionLimits, SharedMessage, UserId,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

struct Counting(AtomicU64);

impl Router for Counting {
    fn push(&self, _: &Coordinate, _: &SharedMessage) -> PushOutcome {
        self.0.fetch_add(1, Ordering::Relaxed);
        PushOutcome::Queued
    }
}

struct Anyone;

impl Authenticate for Anyone {
    fn authenticate(&self, _: &str, _: u64) -> Result<UserId, AuthError> {
        Ok(UserId::parse("bob").unwrap())
    }
}

fn coordinate(conn: u64) -> Coordinate {
    Coordinate {
        dc: DcName::parse("east").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        incarnation: 1,
        conn,
    }
}

fn message(seq: u64) -> SharedMessage {
    Arc::new(Message {
        id: MessageId {
            origin: DcName::parse("east").unwrap(),
            epoch: Epoch(1),
            seq,
        },
        seq,
        from: UserId::parse("alice").unwrap(),
        to: UserId::parse("bob").unwrap(),
        client_id: ClientMsgId::parse("c-1").unwrap(),
        text: "x".repeat(100),
        at_ms: 1,
    })
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    for n in [1u64, 3] {
        let delivery = Delivery::new(Counting(AtomicU64::new(0)));
        let coords: Vec<Coordinate> = (0..n).map(coordinate).collect();
        let msg = message(1);
        group.bench_function(format!("delivery/fanout-{n}"), |b| {
            b.iter(|| delivery.committed(black_box(&msg), &coords))
        });
    }
    let limits = Arc::new(SessionLimits {
        max_inflight: usize::MAX,
        ..SessionLimits::default()
    });
    let mut session = Session::new(limits, Arc::new(Anyone), coordinate(1), 0);
    session.on_text(r#"{"type":"login","token":"t"}"#, 0);
    while session.poll_output().is_some() {}
    session.on_joined(Ok(()));
    session.on_scanned(Ok(Vec::new()), 1);
    while session.poll_output().is_some() {}
    let mut seq = 0;
    group.bench_function("session/push", |b| {
        b.iter(|| {
            seq += 1;
            session.on_push(message(seq));
            while let Some(out) = session.poll_output() {
                if let Output::Deliver(m) = out {
                    black_box(m);
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
