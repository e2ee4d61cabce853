//! Replication hot paths: `cargo bench -p chinwag-replication --bench replication`.
//!
//! `wire/encode|decode-256`: a batch of 256 entries of ~200 bytes, the unit in which
//! entries cross the WAN. `merge/vv-N`: merging the version vectors of N DCs.
//! `receive/256`: a replicator taking a batch and producing its apply.

use chinwag_core::{DcName, Epoch};
use chinwag_replication::wire::{decode, encode};
use chinwag_replication::{Action, Config, Log, Replicator, StreamId, VersionVector, Wire};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

struct NoLog;

impl Log for NoLog {
    fn read(&self, _: &StreamId, _: u64, _: usize, _: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }
}

fn stream(i: usize) -> StreamId {
    StreamId::new(DcName::parse(&format!("dc{i}")).unwrap(), Epoch(7))
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("replication");
    let batch = Wire::Entries {
        stream: stream(0),
        first: 1,
        entries: vec![vec![7u8; 200]; 256],
    };
    let bytes = encode(&batch);
    group.throughput(Throughput::Elements(256));
    group.bench_function("wire/encode-256", |b| b.iter(|| encode(black_box(&batch))));
    group.bench_function("wire/decode-256", |b| b.iter(|| decode(black_box(&bytes)).unwrap()));
    group.throughput(Throughput::Elements(1));
    for n in [5usize, 100] {
        let a: VersionVector = (0..n).map(|i| (stream(i), i as u64 * 3)).collect();
        let b_vv: VersionVector = (0..n).map(|i| (stream(i), i as u64 * 2 + 5)).collect();
        group.bench_function(format!("merge/vv-{n}"), |b| {
            b.iter(|| {
                let mut m = a.clone();
                m.merge(black_box(&b_vv));
                m
            })
        });
    }
    group.throughput(Throughput::Elements(256));
    let names: Vec<DcName> = (0..5).map(|i| DcName::parse(&format!("dc{i}")).unwrap()).collect();
    let mut first = 1;
    let mut replicator = Replicator::new(
        Config::wan(names[1].clone(), stream(1), names.clone()),
        VersionVector::default(),
        VersionVector::default(),
        0,
    );
    group.bench_function("receive/256", |b| {
        b.iter(|| {
            let msg = Wire::Entries {
                stream: stream(0),
                first,
                entries: vec![vec![7u8; 200]; 256],
            };
            replicator.on_message(&names[0], msg, 0, &NoLog);
            while let Some(action) = replicator.poll_action() {
                if let Action::Apply { stream, entries, .. } = action {
                    first += entries.len() as u64;
                    replicator.on_applied(&stream, first - 1, &NoLog);
                }
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
