//! The bodies of the fuzz targets in `fuzz/`, as plain functions of bytes.
//!
//! libFuzzer drives them under `cargo fuzz`; `tests/corpus.rs` replays every committed
//! corpus input through the same functions under `cargo test`, so an input that once
//! found a bug keeps guarding against it without any fuzzing tool installed.
//!
//! Each target checks more than "does not panic": decoders must round-trip what they
//! accept, and the state machines behind them must stay within their invariants.

use std::sync::{Arc, LazyLock};

use chinwag_auth::{TokenKey, TokenPolicy, Verifier};
use chinwag_core::{AuthError, Authenticate, Coordinate, DcName, NodeName, Output, Session, SessionLimits, UserId};
use chinwag_proto::ServerFrame;
use chinwag_replication::{Action, Config, Log, Replicator, StreamId, VersionVector, Wire};

/// Separates frames within one input: it can never occur in UTF-8 text.
const FRAME_BREAK: u8 = 0xFF;

/// Client frames, one after another, into a session: first as a stranger, then logged in.
pub fn client_frames(data: &[u8]) {
    let frames: Vec<&str> = data
        .split(|b| *b == FRAME_BREAK)
        .filter_map(|f| std::str::from_utf8(f).ok())
        .collect();
    for text in &frames {
        check_decoder(text);
    }
    for logged_in in [false, true] {
        let mut session = session();
        let mut now = 1_000;
        if logged_in {
            session.on_text(r#"{"type":"login","token":"user:fuzz"}"#, now);
            drain(&mut session);
            session.on_joined(Ok(()));
            drain(&mut session);
        }
        for text in &frames {
            now += 7;
            session.on_text(text, now);
            drain(&mut session);
        }
        session.on_timeout(now + 100_000);
        drain(&mut session);
    }
}

/// Whatever the decoder accepts, it must give back unchanged after encoding.
fn check_decoder(text: &str) {
    match chinwag_proto::decode_client(text) {
        Ok(frame) => {
            let again = chinwag_proto::encode_client(&frame);
            assert_eq!(chinwag_proto::decode_client(&again).as_ref(), Ok(&frame), "{again}");
        }
        Err(e) => assert!(!e.detail.is_empty(), "an error without a detail for {text:?}"),
    }
}

/// Tokens are `user:<id>` here; the real verifier has its own target.
struct FuzzAuth;

impl Authenticate for FuzzAuth {
    fn authenticate(&self, token: &str, _now_ms: u64) -> Result<UserId, AuthError> {
        let user = token
            .strip_prefix("user:")
            .ok_or_else(|| AuthError::Invalid("not a fuzz token".into()))?;
        UserId::parse(user).map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

fn session() -> Session {
    let limits = SessionLimits {
        rate_per_sec: 1_000,
        burst: 1_000,
        ..SessionLimits::default()
    };
    let coordinate = Coordinate {
        dc: DcName::parse("fz").expect("valid"),
        node: NodeName::parse("n1").expect("valid"),
        incarnation: 1,
        conn: 1,
    };
    Session::new(Arc::new(limits), Arc::new(FuzzAuth), coordinate, 1_000)
}

/// Takes every output, checking what the session may say, and answers the store
/// operations it asks for as a store would.
fn drain(session: &mut Session) {
    let mut steps = 0;
    while let Some(output) = session.poll_output() {
        steps += 1;
        assert!(steps < 100_000, "a session that never stops talking");
        match output {
            Output::Frame(ServerFrame::Error { message, .. }) => assert!(!message.is_empty()),
            Output::Append(new) => {
                assert!(new.text.len() <= SessionLimits::default().max_text_bytes);
                session.on_appended(
                    &new.client_id,
                    Err(chinwag_core::StoreError::Unavailable("fuzzing".into())),
                );
            }
            Output::Scan { .. } => session.on_scanned(Ok(Vec::new()), 1),
            Output::Ack { ids, .. } => session.on_acked(ids, Ok(())),
            Output::Join { .. } => session.on_joined(Ok(())),
            Output::Frame(_) | Output::Deliver(_) | Output::Ping | Output::Close { .. } => {}
        }
    }
}

/// A frame from a peer DC: decoded, validated, and handed to a replicator, whose actions
/// are carried out as far as they concern decoding (entries are decoded as the store
/// would).
pub fn inter_dc_frame(data: &[u8]) {
    let Ok(msg) = chinwag_replication::wire::decode(data) else {
        return;
    };
    let again = chinwag_replication::wire::encode(&msg);
    assert_eq!(chinwag_replication::wire::decode(&again).as_ref(), Ok(&msg));
    if let Wire::Entries { entries, .. } = &msg {
        for entry in entries {
            if let Ok(decoded) = chinwag_store::Entry::decode(entry) {
                assert_eq!(chinwag_store::Entry::decode(&decoded.encode()).ok(), Some(decoded));
            }
        }
    }
    let me = DcName::parse("fz").expect("valid");
    let peer = DcName::parse("peer").expect("valid");
    let stream = StreamId::new(me.clone(), chinwag_core::Epoch(1));
    let config = Config::wan(me, stream, vec![peer.clone()]);
    let mut replicator = Replicator::new(config, VersionVector::default(), VersionVector::default(), 0);
    replicator.on_connected(&peer, 1);
    replicator.on_message(&peer, msg, 2, &EmptyLog);
    replicator.on_tick(10_000, &EmptyLog);
    let mut steps = 0;
    while let Some(action) = replicator.poll_action() {
        steps += 1;
        assert!(steps < 100_000, "a replicator that never stops acting");
        if let Action::Send { msg, .. } = action {
            let bytes = chinwag_replication::wire::encode(&msg);
            assert!(
                chinwag_replication::wire::decode(&bytes).is_ok(),
                "we sent what we refuse: {msg:?}"
            );
        }
    }
}

struct EmptyLog;

impl Log for EmptyLog {
    fn read(&self, _: &StreamId, _: u64, _: usize, _: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }
}

/// The key the token target's verifier trusts; the corpus holds tokens signed with it.
pub const FUZZ_KEY: &[u8; 32] = b"chinwag fuzzing key, 32 bytes!!!";
/// The verifier's clock: tokens in the corpus expire after it.
pub const FUZZ_NOW_MS: u64 = 1_800_000_000_000;

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    let key = TokenKey::from_secret(FUZZ_KEY.to_vec()).expect("32 bytes");
    let policy = TokenPolicy {
        issuer: Some("chinwag".into()),
        audience: Some("fuzz".into()),
    };
    Verifier::new(&key, &policy)
});

/// A login token, verified as the server verifies it. Whatever is accepted must carry
/// the key's own HS256 signature over exactly its header and payload, and a valid user.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(user) = VERIFIER.authenticate(text, FUZZ_NOW_MS) else {
        return;
    };
    assert!(UserId::parse(user.as_str()).is_ok());
    let (signed, signature) = text.rsplit_once('.').expect("an accepted token has a signature");
    let key = jsonwebtoken::EncodingKey::from_secret(FUZZ_KEY);
    let expected = jsonwebtoken::crypto::sign(signed.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
        .expect("HS256 signing cannot fail");
    assert_eq!(
        signature, expected,
        "a token verified without the key's signature: {text:?}"
    );
}
