//! Writes the starting corpora of the fuzz targets into `fuzz/corpus/`:
//! `cargo run -p chinwag-fuzz --example seeds`. Fuzzing grows the corpora from there.

use std::path::Path;

use chinwag_core::{ClientMsgId, Coordinate, DcName, Epoch, NodeName, UserId};
use chinwag_replication::{StreamId, VersionVector, Wire};
use chinwag_store::Entry;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
}

fn client_frames() {
    let frames = [
        ("login", r#"{"type":"login","token":"user:alice"}"#),
        ("send", r#"{"type":"send","to":"bob","client_id":"c1","text":"hello"}"#),
        ("ack", r#"{"type":"ack","ids":["fz.1.1","fz.1.2"]}"#),
        ("ping", r#"{"type":"ping","nonce":7}"#),
        ("unknown", r#"{"type":"shout","text":"x"}"#),
        ("bad-json", r#"{"type":"send","#),
        ("mistyped", r#"{"type":"send","to":5,"client_id":[],"text":null}"#),
    ];
    for (name, frame) in frames {
        write("client_frame", name, frame.as_bytes());
    }
    // A whole conversation, frames separated by 0xFF.
    let mut session = Vec::new();
    for (_, frame) in &frames[..4] {
        session.extend_from_slice(frame.as_bytes());
        session.push(0xFF);
    }
    write("client_frame", "session", &session);
}

fn inter_dc() {
    let east = DcName::parse("east").unwrap();
    let stream = StreamId::new(east.clone(), Epoch(3));
    let mut applied = VersionVector::default();
    applied.advance(&stream, 9);
    let user = |s: &str| UserId::parse(s).unwrap();
    let at = Coordinate {
        dc: east.clone(),
        node: NodeName::parse("n1").unwrap(),
        incarnation: 2,
        conn: 5,
    };
    let entries = vec![
        Entry::Put {
            to: user("bob"),
            from: user("alice"),
            client_id: ClientMsgId::parse("c1").unwrap(),
            text: "hi".into(),
            at_ms: 1,
        }
        .encode(),
        Entry::Online {
            user: user("bob"),
            at: at.clone(),
        }
        .encode(),
        Entry::Offline { user: user("bob"), at }.encode(),
    ];
    let messages = [
        (
            "hello",
            Wire::Hello {
                dc: east.clone(),
                stream: stream.clone(),
                applied: applied.clone(),
            },
        ),
        (
            "digest",
            Wire::Digest {
                applied: applied.clone(),
                unreachable: vec![DcName::parse("west").unwrap()],
                mailbox_depth: 12,
            },
        ),
        (
            "entries",
            Wire::Entries {
                stream: stream.clone(),
                first: 1,
                entries,
            },
        ),
        ("need", Wire::Need { stream, from: 4 }),
        (
            "snapshot",
            Wire::Snapshot {
                applied,
                items: vec![vec![1, 2, 3]],
                last: true,
            },
        ),
    ];
    for (name, msg) in messages {
        write("inter_dc", name, &chinwag_replication::wire::encode(&msg));
    }
}

fn tokens() {
    let key = chinwag_auth::TokenKey::from_secret(chinwag_fuzz::FUZZ_KEY.to_vec()).unwrap();
    let policy = chinwag_auth::TokenPolicy {
        issuer: Some("chinwag".into()),
        audience: Some("fuzz".into()),
    };
    let bob = UserId::parse("bob").unwrap();
    let now = chinwag_fuzz::FUZZ_NOW_MS - 60_000;
    let valid = chinwag_auth::mint(&key, &bob, std::time::Duration::from_secs(3600), now, &policy);
    write("token", "valid", valid.as_bytes());
    let expired = chinwag_auth::mint(&key, &bob, std::time::Duration::from_secs(1), now, &policy);
    write("token", "expired", expired.as_bytes());
    let other = chinwag_auth::TokenKey::from_secret(vec![7; 32]).unwrap();
    let forged = chinwag_auth::mint(&other, &bob, std::time::Duration::from_secs(3600), now, &policy);
    write("token", "other-key", forged.as_bytes());
    // alg "none", unsigned.
    write(
        "token",
        "alg-none",
        b"eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJib2IiLCJleHAiOjk5OTk5OTk5OTl9.",
    );
    write("token", "garbage", b"not.a.token");
}

fn main() {
    client_frames();
    inter_dc();
    tokens();
}
