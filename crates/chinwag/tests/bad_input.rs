//! Every kind of bad input gets its documented answer, the node stays up, and other users
//! are not affected. One test per case.

mod common;

use std::time::Duration;

use chinwag_client::tungstenite::Message as WsMessage;
use chinwag_client::{ClientError, ConnectOptions, Connection};
use chinwag_proto::{ClientFrame, ErrorCode, ServerFrame};
use common::*;

fn node_with(config: &str) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), config);
    (dir, node)
}

fn node() -> (tempfile::TempDir, Node) {
    node_with("")
}

/// Sends raw text on a logged-in connection and returns the error code it gets back.
async fn raw_error(conn: &mut Connection, text: &str) -> ErrorCode {
    conn.send_raw(WsMessage::text(text)).await.unwrap();
    next_error(conn).await.0
}

/// The connection still works after an error that must not close it.
async fn assert_still_usable(conn: &mut Connection) {
    conn.send(&ClientFrame::Ping { nonce: Some(7) }).await.unwrap();
    assert_eq!(next(conn).await, ServerFrame::Pong { nonce: Some(7) });
}

/// The server ends the connection with this close code.
async fn assert_closed_with(conn: &mut Connection, code: u16) {
    loop {
        match next_or_close(conn).await {
            Err(ClientError::Closed(Some((got, _)))) => return assert_eq!(got, code),
            Err(other) => panic!("expected close {code}, got {other}"),
            Ok(_) => {}
        }
    }
}

#[tokio::test]
async fn malformed_json() {
    let (_dir, node) = node();
    let mut conn = node.login("mallory").await;
    assert_eq!(raw_error(&mut conn, "{\"type\": \"send\", ").await, ErrorCode::BadJson);
    assert_eq!(raw_error(&mut conn, "not json at all").await, ErrorCode::BadJson);
    assert_still_usable(&mut conn).await;
    assert_others_unaffected(&node, "json").await;
}

#[tokio::test]
async fn unknown_frame_type() {
    let (_dir, node) = node();
    let mut conn = node.login("mallory").await;
    assert_eq!(
        raw_error(&mut conn, r#"{"type":"subscribe","topic":"x"}"#).await,
        ErrorCode::UnknownType
    );
    assert_still_usable(&mut conn).await;
    assert_others_unaffected(&node, "unknown").await;
}

#[tokio::test]
async fn missing_fields() {
    let (_dir, node) = node();
    let mut conn = node.login("mallory").await;
    assert_eq!(
        raw_error(&mut conn, r#"{"type":"send","to":"bob","text":"no id"}"#).await,
        ErrorCode::BadFrame
    );
    assert_eq!(raw_error(&mut conn, r#"{"to":"bob"}"#).await, ErrorCode::BadFrame);
    assert_eq!(raw_error(&mut conn, r#"{"type":"ack"}"#).await, ErrorCode::BadFrame);
    assert_still_usable(&mut conn).await;
    assert_others_unaffected(&node, "missing").await;
}

#[tokio::test]
async fn mistyped_fields() {
    let (_dir, node) = node();
    let mut conn = node.login("mallory").await;
    let cases = [
        r#"{"type":"send","to":42,"client_id":"c","text":"x"}"#,
        r#"{"type":"send","to":"bob","client_id":"c","text":["x"]}"#,
        r#"{"type":"ack","ids":"local.1"}"#,
        r#"{"type":"ping","nonce":"soon"}"#,
        r#"{"type":1}"#,
        r#"[1,2,3]"#,
    ];
    for case in cases {
        assert_eq!(raw_error(&mut conn, case).await, ErrorCode::BadFrame, "{case}");
    }
    assert_still_usable(&mut conn).await;
    assert_others_unaffected(&node, "mistyped").await;
}

#[tokio::test]
async fn invalid_values_in_a_send() {
    let (_dir, node) = node_with("[limits]\nmax_text_bytes = 100\n");
    let mut conn = node.login("mallory").await;
    let err = conn.send_message("not a user!", "c1", "x").await.unwrap_err();
    assert!(err.to_string().contains("bad_recipient"), "{err}");
    let err = conn.send_message("bob", "has space", "x").await.unwrap_err();
    assert!(err.to_string().contains("bad_client_id"), "{err}");
    let err = conn.send_message("bob", "c3", &"x".repeat(101)).await.unwrap_err();
    assert!(err.to_string().contains("text_too_large"), "{err}");
    let ids: Vec<String> = (0..1025).map(|i| format!("local.{i}")).collect();
    conn.send(&ClientFrame::Ack { ids }).await.unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::TooManyIds);
    assert_still_usable(&mut conn).await;
    assert_others_unaffected(&node, "values").await;
}

#[tokio::test]
async fn binary_frames() {
    let (_dir, node) = node();
    let mut conn = node.login("mallory").await;
    conn.send_raw(WsMessage::binary(vec![0u8, 159, 146, 150]))
        .await
        .unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::BinaryFrame);
    assert_still_usable(&mut conn).await;
    assert_others_unaffected(&node, "binary").await;
}

#[tokio::test]
async fn frame_over_the_limit_closes_with_1009() {
    let (_dir, node) = node();
    let mut bystander = node.login("bystander").await;
    let mut conn = node.login("mallory").await;
    let huge = format!(
        r#"{{"type":"send","to":"bystander","client_id":"c","text":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    conn.send_raw(WsMessage::text(huge)).await.unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::FrameTooLarge);
    assert_closed_with(&mut conn, 1009).await;
    assert_silent(&mut bystander, Duration::from_millis(200)).await;
    assert_others_unaffected(&node, "huge").await;
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 0.0);
}

#[tokio::test]
async fn a_frame_just_under_the_limit_is_fine() {
    let (_dir, node) = node_with("[limits]\nmax_text_bytes = 60000\n");
    let mut conn = node.login("alice").await;
    let text = "y".repeat(60_000);
    conn.send_message("bob", "big", &text).await.unwrap();
    let mut bob = node.login("bob").await;
    let (_, _, got) = next_message(&mut bob).await;
    assert_eq!(got.len(), 60_000);
}

#[tokio::test]
async fn garbage_and_forged_tokens_close_with_1008() {
    let (_dir, node) = node();
    let other_dir = tempfile::tempdir().unwrap();
    let forged = token_for(other_dir.path(), "alice", Duration::from_secs(60));
    for token in ["garbage", "", "a.b.c", forged.as_str()] {
        let err = Connection::login(&node.url(), token)
            .await
            .err()
            .expect("login must fail");
        match err {
            ClientError::Server { code, .. } => assert_eq!(code, ErrorCode::BadToken, "{token}"),
            other => panic!("expected bad_token for {token:?}, got {other}"),
        }
    }
    let mut conn = Connection::connect(&node.url()).await.unwrap();
    conn.send(&ClientFrame::Login {
        token: forged,
        receipts: false,
        device: None,
    })
    .await
    .unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::BadToken);
    assert_closed_with(&mut conn, 1008).await;
    assert_others_unaffected(&node, "token").await;
    assert_eq!(node.metric("chinwag_logins_total").await, 2.0);
}

#[tokio::test]
async fn expired_token_closes_with_1008() {
    let (_dir, node) = node();
    let expired = token_for(&node.dir.join("data"), "alice", Duration::ZERO);
    let mut conn = Connection::connect(&node.url()).await.unwrap();
    conn.send(&ClientFrame::Login {
        token: expired,
        receipts: false,
        device: None,
    })
    .await
    .unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::TokenExpired);
    assert_closed_with(&mut conn, 1008).await;
    assert_others_unaffected(&node, "expired").await;
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, ClientError>, expected: ErrorCode) {
    match result {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, expected),
        other => panic!("expected {expected}, got {other:?}"),
    }
}

/// Numbered sends: a device name must be valid, a seq needs a device and starts at 1, and
/// one too far below the device's highest is refused rather than stored twice.
#[tokio::test]
async fn bad_devices_and_seqs() {
    let (_dir, node) = node();
    let numbered = |device: &str| ConnectOptions {
        device: Some(device.into()),
        ..ConnectOptions::default()
    };
    let bad_name = Connection::login_with(&node.url(), &node.token("alice"), &numbered("a phone")).await;
    assert_refused(bad_name.map(|_| ()), ErrorCode::BadDevice);
    let mut plain = node.login("alice").await;
    assert_refused(plain.send_numbered("bob", "n1", 1, "x").await, ErrorCode::BadSeq);
    assert_still_usable(&mut plain).await;
    let (mut phone, _) = Connection::login_with(&node.url(), &node.token("alice"), &numbered("phone"))
        .await
        .unwrap();
    assert_refused(phone.send_numbered("bob", "n0", 0, "x").await, ErrorCode::BadSeq);
    phone.send_numbered("bob", "n5000", 5_000, "x").await.unwrap();
    assert_refused(phone.send_numbered("bob", "n1", 1, "x").await, ErrorCode::SeqTooOld);
    assert_still_usable(&mut phone).await;
    assert_others_unaffected(&node, "seq").await;
}

#[tokio::test]
async fn sending_before_login_is_refused() {
    let (_dir, node) = node();
    let mut conn = Connection::connect(&node.url()).await.unwrap();
    conn.send(&ClientFrame::Send {
        to: "bob".into(),
        client_id: "early".into(),
        text: "hi".into(),
        seq: None,
    })
    .await
    .unwrap();
    assert_eq!(
        next_error(&mut conn).await,
        (ErrorCode::Unauthenticated, Some("early".into()))
    );
    conn.send(&ClientFrame::Ack {
        ids: vec!["local.1".into()],
    })
    .await
    .unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::Unauthenticated);
    // Logging in afterwards still works, and nothing was stored.
    conn.send(&ClientFrame::Login {
        token: node.token("late"),
        receipts: false,
        device: None,
    })
    .await
    .unwrap();
    assert!(matches!(next(&mut conn).await, ServerFrame::Welcome { .. }));
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 0.0);
    assert_others_unaffected(&node, "early").await;
}

#[tokio::test]
async fn logging_in_twice_is_refused() {
    let (_dir, node) = node();
    let mut conn = node.login("alice").await;
    conn.send(&ClientFrame::Login {
        token: node.token("bob"),
        receipts: false,
        device: None,
    })
    .await
    .unwrap();
    assert_eq!(next_error(&mut conn).await.0, ErrorCode::AlreadyAuthenticated);
    assert_still_usable(&mut conn).await;
}

#[tokio::test]
async fn a_client_over_its_rate_limit_is_throttled_alone() {
    let (_dir, node) = node_with("[limits]\nrate_per_sec = 5\nburst = 10\n");
    let mut flooder = node.login("flooder").await;
    for i in 0..30 {
        flooder
            .send(&ClientFrame::Send {
                to: "victim".into(),
                client_id: format!("f{i}"),
                text: "spam".into(),
                seq: None,
            })
            .await
            .unwrap();
    }
    let (mut sent, mut limited, mut retry_hint) = (0, 0, None);
    while sent + limited < 30 {
        match next(&mut flooder).await {
            ServerFrame::Sent { .. } => sent += 1,
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                retry_after_ms,
                client_id,
                ..
            } => {
                assert!(client_id.is_some());
                retry_hint = retry_after_ms;
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    // The login took one token of the burst of 10.
    assert!((9..=11).contains(&sent), "{sent} accepted");
    assert!(retry_hint.is_some_and(|ms| ms > 0 && ms <= 200));
    assert_others_unaffected(&node, "rate").await;
    // The limit refills.
    tokio::time::sleep(Duration::from_millis(400)).await;
    flooder.send_message("victim", "later", "ok now").await.unwrap();
}

#[tokio::test]
async fn silent_connections_are_dropped_at_the_login_timeout() {
    let (_dir, node) = node_with("[limits]\nlogin_timeout = \"1s\"\n");
    let mut idle = Connection::connect(&node.url()).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(next_error(&mut idle).await.0, ErrorCode::LoginTimeout);
    assert_closed_with(&mut idle, 1008).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_others_unaffected(&node, "slow").await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_drops_only_that_connection() {
    let (_dir, node) = node();
    let mut bob = node.login("bob").await;
    let mut conn = node.login("mallory").await;
    // A text frame whose payload is not UTF-8 violates RFC 6455; tungstenite refuses to
    // build one, so send the bytes as a raw frame.
    let frame = chinwag_client::tungstenite::protocol::frame::Frame::message(
        vec![0xff, 0xfe, 0xfd],
        chinwag_client::tungstenite::protocol::frame::coding::OpCode::Data(
            chinwag_client::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    conn.send_raw(WsMessage::Frame(frame)).await.unwrap();
    assert!(next_or_close(&mut conn).await.is_err(), "connection must end");
    assert_silent(&mut bob, Duration::from_millis(200)).await;
    assert_others_unaffected(&node, "utf8").await;
}

#[tokio::test]
async fn plain_http_to_the_websocket_path_is_refused() {
    let (_dir, node) = node();
    let (status, _) = http_request(&node.http("/v1/ws")).await;
    assert!((400..500).contains(&status), "status {status}");
    assert_others_unaffected(&node, "http").await;
}

#[tokio::test]
async fn development_sign_in_is_off_by_default_and_checks_its_input_when_on() {
    let (_dir, off) = node();
    let (status, body) = http_post_json(&off.http("/v1/dev/token"), r#"{"user":"mallory"}"#).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("dev_sign_in_disabled"), "{body}");

    let (_dir, on) = node_with("[dev]\nsign_in = true");
    for (input, code) in [
        (r#"{"user":"not valid"}"#, "bad_user"),
        (r#"{"name":"bob"}"#, "bad_request"),
        ("{", "bad_request"),
    ] {
        let (status, body) = http_post_json(&on.http("/v1/dev/token"), input).await;
        assert_eq!(status, 400, "{input}: {body}");
        assert!(body.contains(code), "{input}: {body}");
    }
    let (status, body) = http_post_json(&on.http("/v1/dev/token"), r#"{"user":"bob"}"#).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (_conn, welcome) = Connection::login(&on.url(), answer["token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(welcome.user, "bob");
}
