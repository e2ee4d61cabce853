//! Protocol v1 messaging against a real node.

mod common;

/// Runs a test body twice: on one node, and on three DCs with the users spread over them.
macro_rules! on_both {
    ($name:ident, $config:expr, |$place:ident| $body:block) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn one_node() {
                let $place = Place::single($config).await;
                $body
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn three_dcs() {
                let $place = Place::spread($config).await;
                $body
            }
        }
    };
}

use std::time::Duration;

use chinwag_proto::{ClientFrame, ServerFrame};
use common::*;

on_both!(online_message_is_pushed_and_acknowledged, "", |place| {
    let mut bob = place.login("bob").await;
    let mut alice = place.login("alice").await;
    let sent = alice.send_message("bob", "c-1", "hello bob").await.unwrap();
    assert!(chinwag_core::MessageId::parse(&sent.id).is_some(), "{sent:?}");
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
    assert_eq!(place.metric("chinwag_mailbox_depth").await, 0.0);
});

on_both!(offline_messages_wait_in_the_mailbox, "", |place| {
    let mut alice = place.login("alice").await;
    for i in 0..3 {
        alice
            .send_message("carol", &format!("c{i}"), &format!("m{i}"))
            .await
            .unwrap();
    }
    assert_eq!(place.metric("chinwag_mailbox_depth").await, 3.0);
    let mut carol = place.login("carol").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (id, from, text) = next_message(&mut carol).await;
        assert_eq!((from.as_str(), text), ("alice", format!("m{i}")));
        ids.push(id);
    }
    carol.ack(ids).await.unwrap();
    assert_eq!(place.metric("chinwag_mailbox_depth").await, 0.0);
    drop(carol);
    let mut carol = place.login("carol").await;
    assert_silent(&mut carol, Duration::from_millis(500)).await;
});

on_both!(unacknowledged_messages_come_back_after_reconnect, "", |place| {
    let mut alice = place.login("alice").await;
    alice.send_message("bob", "a", "first").await.unwrap();
    alice.send_message("bob", "b", "second").await.unwrap();
    let mut bob = place.login("bob").await;
    let (first, _, _) = next_message(&mut bob).await;
    let (_, _, text) = next_message(&mut bob).await;
    assert_eq!(text, "second");
    bob.ack(vec![first]).await.unwrap();
    bob.close().await.unwrap();
    let mut bob = place.login("bob").await;
    let (_, _, text) = next_message(&mut bob).await;
    assert_eq!(text, "second", "only the unacknowledged message is redelivered");
    assert_silent(&mut bob, Duration::from_millis(300)).await;
});

on_both!(a_retry_gets_the_same_ack_and_is_delivered_once, "", |place| {
    let mut alice = place.login("alice").await;
    let first = alice.send_message("bob", "same-id", "once").await.unwrap();
    // A retry on a new connection, as after a lost ack.
    let mut alice2 = place.login("alice").await;
    let again = alice2.send_message("bob", "same-id", "once").await.unwrap();
    assert_eq!(first, again);
    let mut bob = place.login("bob").await;
    let (id, _, _) = next_message(&mut bob).await;
    assert_eq!(id, first.id);
    assert_silent(&mut bob, Duration::from_millis(300)).await;
    assert_eq!(place.metric("chinwag_messages_in_total").await, 1.0);
});

on_both!(a_numbered_retry_gets_the_same_ack_and_is_delivered_once, "", |place| {
    let phone = chinwag_client::ConnectOptions {
        device: Some("phone".into()),
        ..Default::default()
    };
    let mut alice = place.login_with("alice", &phone).await;
    let first = alice.send_numbered("bob", "n-1", 1, "once").await.unwrap();
    alice.send_numbered("bob", "n-2", 2, "twice?").await.unwrap();
    // A retry on a new connection, as after a lost ack: the number decides.
    let mut alice2 = place.login_with("alice", &phone).await;
    let again = alice2.send_numbered("bob", "n-1", 1, "once").await.unwrap();
    assert_eq!(first, again);
    // The same number from another device is another send.
    let laptop = chinwag_client::ConnectOptions {
        device: Some("laptop".into()),
        ..Default::default()
    };
    let mut alice3 = place.login_with("alice", &laptop).await;
    let other = alice3.send_numbered("bob", "l-1", 1, "from the laptop").await.unwrap();
    assert_ne!(other.id, first.id);
    let mut bob = place.login("bob").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_message(&mut bob).await.2);
    }
    got.sort();
    assert_eq!(got, ["from the laptop", "once", "twice?"]);
    assert_silent(&mut bob, Duration::from_millis(300)).await;
    assert_eq!(place.metric("chinwag_messages_in_total").await, 3.0);
});

on_both!(every_device_gets_it_live_and_one_ack_clears_it, "", |place| {
    let mut phone = place.login("bob").await;
    let mut laptop = place.login("bob").await;
    assert_eq!(place.metric("chinwag_coordinates").await, 2.0);
    let mut alice = place.login("alice").await;
    let sent = alice.send_message("bob", "x", "to all devices").await.unwrap();
    let (on_phone, _, _) = next_message(&mut phone).await;
    let (on_laptop, _, _) = next_message(&mut laptop).await;
    assert_eq!((&on_phone, &on_laptop), (&sent.id, &sent.id));
    phone.ack(vec![on_phone]).await.unwrap();
    // A third device that connects later does not get an acknowledged message.
    let mut tablet = place.login("bob").await;
    assert_silent(&mut tablet, Duration::from_millis(300)).await;
});

on_both!(an_unacked_message_stays_for_other_devices, "", |place| {
    let mut phone = place.login("bob").await;
    let mut alice = place.login("alice").await;
    alice.send_message("bob", "x", "kept").await.unwrap();
    next_message(&mut phone).await;
    // The phone saw it but never acknowledged it: the next device gets it too.
    let mut laptop = place.login("bob").await;
    let (_, _, text) = next_message(&mut laptop).await;
    assert_eq!(text, "kept");
});

on_both!(one_senders_messages_arrive_in_order, "", |place| {
    let mut alice = place.login("alice").await;
    let mut bob = place.login("bob").await;
    // Pipelined: all sends go out before any ack is read.
    let n = 150;
    for i in 0..n {
        alice
            .send(&ClientFrame::Send {
                to: "bob".into(),
                client_id: format!("c{i}"),
                text: format!("{i}"),
                seq: None,
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
});

on_both!(order_holds_across_offline_and_online_delivery, "", |place| {
    let mut alice = place.login("alice").await;
    for i in 0..20 {
        alice
            .send_message("bob", &format!("o{i}"), &format!("{i}"))
            .await
            .unwrap();
    }
    let mut bob = place.login("bob").await;
    // Keep sending while bob's mailbox is being read.
    for i in 20..40 {
        alice
            .send(&ClientFrame::Send {
                to: "bob".into(),
                client_id: format!("o{i}"),
                text: format!("{i}"),
                seq: None,
            })
            .await
            .unwrap();
    }
    for i in 0..40 {
        let (_, _, text) = next_message(&mut bob).await;
        assert_eq!(text, format!("{i}"));
    }
});

on_both!(
    a_large_mailbox_is_delivered_through_the_window,
    "[limits]\nmax_inflight = 8\nrate_per_sec = 10000\nburst = 10000\n",
    |place| {
        let mut alice = place.login("alice").await;
        for i in 0..50 {
            alice
                .send_message("bob", &format!("w{i}"), &format!("{i}"))
                .await
                .unwrap();
        }
        let mut bob = place.login("bob").await;
        for i in 0..50 {
            let (id, _, text) = next_message(&mut bob).await;
            assert_eq!(text, format!("{i}"));
            bob.send(&ClientFrame::Ack { ids: vec![id] }).await.unwrap();
        }
    }
);

on_both!(sending_to_yourself_reaches_your_other_devices, "", |place| {
    let mut phone = place.login("alice").await;
    let mut laptop = place.login("alice").await;
    phone.send_message("alice", "note", "remember the milk").await.unwrap();
    let (_, from, text) = next_message(&mut laptop).await;
    assert_eq!((from.as_str(), text.as_str()), ("alice", "remember the milk"));
});

on_both!(ping_answers_pong, "", |place| {
    let mut conn = chinwag_client::Connection::connect(&place.url("anyone")).await.unwrap();
    conn.send(&ClientFrame::Ping { nonce: Some(42) }).await.unwrap();
    assert_eq!(next(&mut conn).await, ServerFrame::Pong { nonce: Some(42) });
});

on_both!(
    a_full_mailbox_refuses_with_mailbox_full,
    "[limits]\nmailbox_max_messages = 2\n",
    |place| {
        let mut alice = place.login("alice").await;
        alice.send_message("bob", "1", "x").await.unwrap();
        alice.send_message("bob", "2", "x").await.unwrap();
        let err = alice.send_message("bob", "3", "x").await.unwrap_err();
        assert!(err.to_string().contains("mailbox_full"), "{err}");
        assert_others_unaffected(&place, "mf").await;
    }
);

on_both!(the_sender_gets_a_receipt_when_the_recipient_acknowledges, "", |place| {
    let mut alice = place.login_with_receipts("alice").await;
    // Another device of alice's that did not ask for receipts.
    let mut alice_quiet = place.login("alice").await;
    let mut bob = place.login("bob").await;
    let sent = alice.send_message("bob", "r-1", "did you get this?").await.unwrap();
    let (id, _, _) = next_message(&mut bob).await;
    assert_eq!(id, sent.id);
    // No receipt before the recipient acknowledges.
    assert_silent(&mut alice, Duration::from_millis(300)).await;
    bob.ack(vec![id.clone()]).await.unwrap();
    loop {
        match next(&mut alice).await {
            ServerFrame::Delivered { ids } => {
                assert_eq!(ids, vec![id]);
                break;
            }
            ServerFrame::Acked { .. } => {}
            other => panic!("expected a receipt, got {other:?}"),
        }
    }
    assert_silent(&mut alice_quiet, Duration::from_millis(300)).await;
});
