//! Frame decode and encode: `cargo bench -p chinwag-proto --bench frames`.

use chinwag_proto::{MessageFrame, ServerFrame, decode_client, encode_server};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Elements(1));
    let text = "x".repeat(100);
    let send = format!(r#"{{"type":"send","to":"bob","client_id":"c-12345","text":"{text}"}}"#);
    group.bench_function("decode/send", |b| b.iter(|| decode_client(black_box(&send)).unwrap()));
    let ack = r#"{"type":"ack","ids":["east.tp5qvq.1","east.tp5qvq.2","east.tp5qvq.3","east.tp5qvq.4"]}"#;
    group.bench_function("decode/ack4", |b| b.iter(|| decode_client(black_box(ack)).unwrap()));
    group.bench_function("decode/bad_json", |b| {
        b.iter(|| decode_client(black_box("{\"type\":\"send\",")).unwrap_err())
    });
    let msg = MessageFrame {
        id: "east.tp5qvq.123456",
        from: "alice",
        to: "bob",
        text: &text,
        at: 1_795_774_510_973,
        client_id: "c-12345",
    };
    group.bench_function("encode/message", |b| b.iter(|| black_box(&msg).encode()));
    let sent = ServerFrame::Sent {
        client_id: "c-12345".into(),
        id: "east.tp5qvq.123456".into(),
        at: 1_795_774_510_973,
    };
    group.bench_function("encode/sent", |b| b.iter(|| encode_server(black_box(&sent))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
