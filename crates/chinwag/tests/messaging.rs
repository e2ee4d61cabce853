//! Protocol v1 messaging against a real node.

mod common;

use std::time::Duration;

use chinwag_proto::{ClientFrame, ServerFrame};
use common::*;

fn node() -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "");
    (dir, node)
}

#[tokio::test]
async fn online_message_is_pushed_and_acknowledged() {
    let (_dir, node) = node();
    let mut bob = node.login("bob").await;
    let mut alice = node.login("alice").await;
    let sent = alice.send_message("bob", "c-1", "hello bob").await.unwrap();
    assert!(sent.id.starts_with("local."), "{sent:?}");
    match next(&mut bob).await {
        ServerFrame::Message {
            id,
            from,
            to,
            text,
            client_id,
            at,
        } => {
            assert_eq!(
                (id.as_str(), from.as_str(), to.as_str()),
                (sent.id.as_str(), "alice", "bob")
            );
            assert_eq!((text.as_str(), client_id.as_str(), at), ("hello bob", "c-1", sent.at));
        }
        other => panic!("{other:?}"),
    }
    bob.ack(vec![sent.id]).await.unwrap();
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 0.0);
}

#[tokio::test]
async fn offline_messages_wait_in_the_mailbox() {
    let (_dir, node) = node();
    let mut alice = node.login("alice").await;
    for i in 0..3 {
        alice
            .send_message("carol", &format!("c{i}"), &format!("m{i}"))
            .await
            .unwrap();
    }
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 3.0);
    let mut carol = node.login("carol").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (id, from, text) = next_message(&mut carol).await;
        assert_eq!((from.as_str(), text), ("alice", format!("m{i}")));
        ids.push(id);
    }
    carol.ack(ids).await.unwrap();
    assert_eq!(node.metric("chinwag_mailbox_depth").await, 0.0);
    drop(carol);
    let mut carol = node.login("carol").await;
    assert_silent(&mut carol, Duration::from_millis(500)).await;
}

#[tokio::test]
async fn unacknowledged_messages_come_back_after_reconnect() {
    let (_dir, node) = node();
    let mut alice = node.login("alice").await;
    alice.send_message("bob", "a", "first").await.unwrap();
    alice.send_message("bob", "b", "second").await.unwrap();
    let mut bob = node.login("bob").await;
    let (first, _, _) = next_message(&mut bob).await;
    let (_, _, text) = next_message(&mut bob).await;
    assert_eq!(text, "second");
    bob.ack(vec![first]).await.unwrap();
    bob.close().await.unwrap();
    let mut bob = node.login("bob").await;
    let (_, _, text) = next_message(&mut bob).await;
    assert_eq!(text, "second", "only the unacknowledged message is redelivered");
    assert_silent(&mut bob, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_retry_gets_the_same_ack_and_is_delivered_once() {
    let (_dir, node) = node();
    let mut alice = node.login("alice").await;
    let first = alice.send_message("bob", "same-id", "once").await.unwrap();
    // A retry on a new connection, as after a lost ack.
    let mut alice2 = node.login("alice").await;
    let again = alice2.send_message("bob", "same-id", "once").await.unwrap();
    assert_eq!(first, again);
    let mut bob = node.login("bob").await;
    let (id, _, _) = next_message(&mut bob).await;
    assert_eq!(id, first.id);
    assert_silent(&mut bob, Duration::from_millis(300)).await;
    assert_eq!(node.metric("chinwag_messages_in_total").await, 1.0);
}

#[tokio::test]
async fn every_device_gets_it_live_and_one_ack_clears_it() {
    let (_dir, node) = node();
    let mut phone = node.login("bob").await;
    let mut laptop = node.login("bob").await;
    assert_eq!(node.metric("chinwag_coordinates").await, 2.0);
    let mut alice = node.login("alice").await;
    let sent = alice.send_message("bob", "x", "to all devices").await.unwrap();
    let (on_phone, _, _) = next_message(&mut phone).await;
    let (on_laptop, _, _) = next_message(&mut laptop).await;
    assert_eq!((&on_phone, &on_laptop), (&sent.id, &sent.id));
    phone.ack(vec![on_phone]).await.unwrap();
    // A third device that connects later does not get an acknowledged message.
    let mut tablet = node.login("bob").await;
    assert_silent(&mut tablet, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_unacked_message_stays_for_other_devices() {
    let (_dir, node) = node();
    let mut phone = node.login("bob").await;
    let mut alice = node.login("alice").await;
    alice.send_message("bob", "x", "kept").await.unwrap();
    next_message(&mut phone).await;
    // The phone saw it but never acknowledged it: the next device gets it too.
    let mut laptop = node.login("bob").await;
    let (_, _, text) = next_message(&mut laptop).await;
    assert_eq!(text, "kept");
}

#[tokio::test]
async fn one_senders_messages_arrive_in_order() {
    let (_dir, node) = node();
    let mut alice = node.login("alice").await;
    let mut bob = node.login("bob").await;
    // Pipelined: all sends go out before any ack is read.
    let n = 150;
    for i in 0..n {
        alice
            .send(&ClientFrame::Send {
                to: "bob".into(),
                client_id: format!("c{i}"),
                text: format!("{i}"),
            })
            .await
            .unwrap();
    }
    let mut acks = 0;
    while acks < n {
        match next(&mut alice).await {
            ServerFrame::Sent { client_id, .. } => {
                assert_eq!(client_id, format!("c{acks}"), "sent acks out of order");
                acks += 1;
            }
            ServerFrame::Error { code, .. } => panic!("send refused: {code}"),
            _ => {}
        }
    }
    let mut ids = Vec::new();
    for i in 0..n {
        let (id, _, text) = next_message(&mut bob).await;
        assert_eq!(text, format!("{i}"));
        ids.push(id);
    }
    bob.ack(ids).await.unwrap();
}

#[tokio::test]
async fn order_holds_across_offline_and_online_delivery() {
    let (_dir, node) = node();
    let mut alice = node.login("alice").await;
    for i in 0..20 {
        alice
            .send_message("bob", &format!("o{i}"), &format!("{i}"))
            .await
            .unwrap();
    }
    let mut bob = node.login("bob").await;
    // Keep sending while bob's mailbox is being read.
    for i in 20..40 {
        alice
            .send(&ClientFrame::Send {
                to: "bob".into(),
                client_id: format!("o{i}"),
                text: format!("{i}"),
            })
            .await
            .unwrap();
    }
    for i in 0..40 {
        let (_, _, text) = next_message(&mut bob).await;
        assert_eq!(text, format!("{i}"));
    }
}

#[tokio::test]
async fn a_large_mailbox_is_delivered_through_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(
        dir.path(),
        "[limits]\nmax_inflight = 8\nrate_per_sec = 10000\nburst = 10000\n",
    );
    let mut alice = node.login("alice").await;
    for i in 0..50 {
        alice
            .send_message("bob", &format!("w{i}"), &format!("{i}"))
            .await
            .unwrap();
    }
    let mut bob = node.login("bob").await;
    for i in 0..50 {
        let (id, _, text) = next_message(&mut bob).await;
        assert_eq!(text, format!("{i}"));
        bob.send(&ClientFrame::Ack { ids: vec![id] }).await.unwrap();
    }
}

#[tokio::test]
async fn sending_to_yourself_reaches_your_other_devices() {
    let (_dir, node) = node();
    let mut phone = node.login("alice").await;
    let mut laptop = node.login("alice").await;
    phone.send_message("alice", "note", "remember the milk").await.unwrap();
    let (_, from, text) = next_message(&mut laptop).await;
    assert_eq!((from.as_str(), text.as_str()), ("alice", "remember the milk"));
}

#[tokio::test]
async fn ping_answers_pong() {
    let (_dir, node) = node();
    let mut conn = chinwag_client::Connection::connect(&node.url()).await.unwrap();
    conn.send(&ClientFrame::Ping { nonce: Some(42) }).await.unwrap();
    assert_eq!(next(&mut conn).await, ServerFrame::Pong { nonce: Some(42) });
}

#[tokio::test]
async fn a_full_mailbox_refuses_with_mailbox_full() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_in(dir.path(), "[limits]\nmailbox_max_messages = 2\n");
    let mut alice = node.login("alice").await;
    alice.send_message("bob", "1", "x").await.unwrap();
    alice.send_message("bob", "2", "x").await.unwrap();
    let err = alice.send_message("bob", "3", "x").await.unwrap_err();
    assert!(err.to_string().contains("mailbox_full"), "{err}");
    assert_others_unaffected(&node, "mf").await;
}
