use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::ids::{DcName, Epoch, NodeName};
use crate::message::Message;
use crate::ratelimit::UserBuckets;

/// Accepts tokens of the form `user:<id>`, `expired` and nothing else.
struct PlainAuth;

impl Authenticate for PlainAuth {
    fn authenticate(&self, token: &str, _now_ms: u64) -> Result<UserId, AuthError> {
        if token == "expired" {
            return Err(AuthError::Expired);
        }
        let user = token
            .strip_prefix("user:")
            .ok_or_else(|| AuthError::Invalid("not a token".into()))?;
        UserId::parse(user).map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

fn coordinate() -> Coordinate {
    Coordinate {
        dc: DcName::parse("local").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        incarnation: 1,
        conn: 7,
    }
}

fn session_with(limits: SessionLimits) -> Session {
    Session::new(Arc::new(limits), Arc::new(PlainAuth), coordinate(), 0)
}

fn drain(s: &mut Session) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn error_codes(outputs: &[Output]) -> Vec<ErrorCode> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Frame(ServerFrame::Error { code, .. }) => Some(*code),
            _ => None,
        })
        .collect()
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn msg(seq: u64, to: &str) -> SharedMessage {
    Arc::new(Message {
        id: MessageId {
            origin: DcName::parse("local").unwrap(),
            epoch: Epoch(1),
            seq,
        },
        seq,
        from: user("alice"),
        to: user(to),
        client_id: ClientMsgId::parse(&format!("c{seq}")).unwrap(),
        text: format!("m{seq}"),
        at_ms: seq,
    })
}

/// Logs in as bob and completes the join; returns the first scan's limit.
fn logged_in(limits: SessionLimits) -> (Session, usize) {
    let mut s = session_with(limits);
    s.on_text(r#"{"type":"login","token":"user:bob"}"#, 0);
    assert_eq!(drain(&mut s), vec![Output::Join { user: user("bob") }]);
    assert!(!s.wants_input(), "no frames are read while joining");
    s.on_joined(Ok(()));
    let out = drain(&mut s);
    assert!(matches!(out[0], Output::Frame(ServerFrame::Welcome { .. })));
    let Output::Scan { after: 0, limit, .. } = out[1] else {
        panic!("expected the first page request, got {out:?}")
    };
    (s, limit)
}

#[test]
fn bad_and_expired_tokens_close_the_connection() {
    for (token, code) in [("nope", ErrorCode::BadToken), ("expired", ErrorCode::TokenExpired)] {
        let mut s = session_with(SessionLimits::default());
        s.on_text(&format!(r#"{{"type":"login","token":"{token}"}}"#), 0);
        let out = drain(&mut s);
        assert_eq!(error_codes(&out), vec![code]);
        assert_eq!(
            out.last(),
            Some(&Output::Close {
                code: 1008,
                reason: code.as_str()
            })
        );
        assert!(s.is_closed());
    }
}

#[test]
fn frames_before_login_are_refused_but_ping_works() {
    let mut s = session_with(SessionLimits::default());
    s.on_text(r#"{"type":"send","to":"bob","client_id":"c1","text":"x"}"#, 0);
    s.on_text(r#"{"type":"ack","ids":[]}"#, 0);
    s.on_text(r#"{"type":"ping","nonce":5}"#, 0);
    let out = drain(&mut s);
    assert_eq!(
        error_codes(&out),
        vec![ErrorCode::Unauthenticated, ErrorCode::Unauthenticated]
    );
    assert_eq!(out[2], Output::Frame(ServerFrame::Pong { nonce: Some(5) }));
    assert!(!s.is_closed());
}

#[test]
fn login_times_out() {
    let mut s = session_with(SessionLimits::default());
    assert_eq!(s.poll_timeout(), Some(10_000));
    s.on_timeout(9_999);
    assert!(drain(&mut s).is_empty());
    s.on_timeout(10_000);
    assert_eq!(error_codes(&drain(&mut s)), vec![ErrorCode::LoginTimeout]);
    assert!(s.is_closed());
}

#[test]
fn a_quiet_client_is_pinged_then_closed_unless_it_answers() {
    let limits = SessionLimits {
        ping_interval_ms: 1_000,
        idle_timeout_ms: 3_000,
        ..SessionLimits::default()
    };
    let (mut s, _) = logged_in(limits);
    assert_eq!(s.poll_timeout(), Some(1_000));
    s.on_timeout(1_000);
    assert_eq!(drain(&mut s), vec![Output::Ping]);
    assert_eq!(s.poll_timeout(), Some(3_000), "one ping, then the idle deadline");
    // The pong (or any frame) restarts the clock.
    s.on_heard(2_500);
    assert_eq!(s.poll_timeout(), Some(3_500));
    s.on_timeout(3_500);
    assert_eq!(drain(&mut s), vec![Output::Ping]);
    s.on_timeout(5_500);
    let out = drain(&mut s);
    assert_eq!(error_codes(&out), vec![ErrorCode::IdleTimeout]);
    assert_eq!(
        out.last(),
        Some(&Output::Close {
            code: 1001,
            reason: "idle_timeout"
        })
    );
    assert!(s.is_closed());
}

#[test]
fn a_user_is_limited_across_its_connections() {
    let limits = SessionLimits {
        user_rate_per_sec: 1,
        user_burst: 2,
        ..SessionLimits::default()
    };
    let users = Arc::new(UserBuckets::new(1, 2, 100));
    let phone = logged_in(limits.clone()).0.with_user_buckets(users.clone());
    let laptop = logged_in(limits).0.with_user_buckets(users);
    let mut sent = Vec::new();
    for (i, mut s) in [phone, laptop].into_iter().enumerate() {
        for j in 0..2 {
            s.on_text(
                &format!(r#"{{"type":"send","to":"al","client_id":"c{i}{j}","text":"x"}}"#),
                0,
            );
        }
        sent.push(drain(&mut s));
    }
    let appended = |out: &[Output]| out.iter().filter(|o| matches!(o, Output::Append(_))).count();
    assert_eq!(appended(&sent[0]), 2);
    assert_eq!(appended(&sent[1]), 0, "the second device shares the first one's budget");
    assert_eq!(
        error_codes(&sent[1]),
        vec![ErrorCode::RateLimited, ErrorCode::RateLimited]
    );
}

#[test]
fn second_login_is_refused() {
    let (mut s, _) = logged_in(SessionLimits::default());
    s.on_text(r#"{"type":"login","token":"user:carol"}"#, 0);
    assert_eq!(error_codes(&drain(&mut s)), vec![ErrorCode::AlreadyAuthenticated]);
    assert_eq!(s.user(), Some(&user("bob")));
}

#[test]
fn send_is_validated_then_appended_then_answered() {
    let (mut s, _) = logged_in(SessionLimits {
        max_text_bytes: 4,
        ..SessionLimits::default()
    });
    s.on_text(r#"{"type":"send","to":"b b","client_id":"c1","text":"x"}"#, 1);
    s.on_text(r#"{"type":"send","to":"carol","client_id":"","text":"x"}"#, 1);
    s.on_text(r#"{"type":"send","to":"carol","client_id":"c3","text":"12345"}"#, 1);
    assert_eq!(
        error_codes(&drain(&mut s)),
        vec![ErrorCode::BadRecipient, ErrorCode::BadClientId, ErrorCode::TextTooLarge]
    );
    s.on_text(r#"{"type":"send","to":"carol","client_id":"c4","text":"hi"}"#, 5);
    let out = drain(&mut s);
    let Output::Append(new) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!((new.from.as_str(), new.to.as_str(), new.at_ms), ("bob", "carol", 5));
    let receipt = Receipt {
        id: MessageId::parse("local.1.9").unwrap(),
        at_ms: 5,
        duplicate: false,
    };
    s.on_appended(&new.client_id, Ok(receipt));
    assert_eq!(
        drain(&mut s),
        vec![Output::Frame(ServerFrame::Sent {
            client_id: "c4".into(),
            id: "local.1.9".into(),
            at: 5
        })]
    );
}

/// A device named at login numbers its sends; without one, or from 0, `seq` is refused
/// and nothing is appended.
#[test]
fn numbered_sends_need_a_device_and_carry_it_to_the_store() {
    let mut s = session_with(SessionLimits::default());
    s.on_text(r#"{"type":"login","token":"user:bob","device":"a phone"}"#, 0);
    assert_eq!(error_codes(&drain(&mut s)), vec![ErrorCode::BadDevice]);
    assert!(
        !s.is_closed(),
        "a bad device name leaves the connection to log in again"
    );
    s.on_text(r#"{"type":"login","token":"user:bob","device":"phone"}"#, 0);
    assert_eq!(drain(&mut s), vec![Output::Join { user: user("bob") }]);
    s.on_joined(Ok(()));
    drain(&mut s);
    s.on_text(r#"{"type":"send","to":"carol","client_id":"c0","text":"x","seq":0}"#, 1);
    assert_eq!(error_codes(&drain(&mut s)), vec![ErrorCode::BadSeq]);
    s.on_text(r#"{"type":"send","to":"carol","client_id":"c1","text":"x","seq":7}"#, 1);
    let out = drain(&mut s);
    let [Output::Append(new)] = &out[..] else {
        panic!("{out:?}")
    };
    let expected = DeviceSeq {
        device: DeviceId::parse("phone").unwrap(),
        seq: 7,
    };
    assert_eq!(new.seq, Some(expected));
    s.on_appended(
        &new.client_id,
        Err(StoreError::SeqTooOld {
            seq: 7,
            highest: 2_000,
            window: 1_024,
        }),
    );
    assert_eq!(error_codes(&drain(&mut s)), vec![ErrorCode::SeqTooOld]);

    let (mut plain, _) = logged_in(SessionLimits::default());
    plain.on_text(r#"{"type":"send","to":"carol","client_id":"c1","text":"x","seq":7}"#, 1);
    assert_eq!(error_codes(&drain(&mut plain)), vec![ErrorCode::BadSeq]);
    plain.on_text(r#"{"type":"send","to":"carol","client_id":"c2","text":"x"}"#, 1);
    let out = drain(&mut plain);
    assert!(
        matches!(&out[..], [Output::Append(NewMessage { seq: None, .. })]),
        "{out:?}"
    );
}

#[test]
fn full_mailbox_is_reported_against_the_send() {
    let (mut s, _) = logged_in(SessionLimits::default());
    s.on_text(r#"{"type":"send","to":"carol","client_id":"c1","text":"hi"}"#, 0);
    let Some(Output::Append(new)) = s.poll_output() else {
        panic!()
    };
    s.on_appended(
        &new.client_id,
        Err(StoreError::MailboxFull {
            user: user("carol"),
            limit: 3,
        }),
    );
    let out = drain(&mut s);
    let Output::Frame(ServerFrame::Error { code, client_id, .. }) = &out[0] else {
        panic!()
    };
    assert_eq!((*code, client_id.as_deref()), (ErrorCode::MailboxFull, Some("c1")));
}

#[test]
fn rate_limit_drops_frames_but_not_acks() {
    let (mut s, _) = logged_in(SessionLimits {
        rate_per_sec: 1,
        burst: 3,
        ..SessionLimits::default()
    });
    // The login took one token.
    for _ in 0..3 {
        s.on_text(r#"{"type":"ping"}"#, 0);
    }
    s.on_text(r#"{"type":"ack","ids":["local.1.1"]}"#, 0);
    let out = drain(&mut s);
    assert_eq!(error_codes(&out), vec![ErrorCode::RateLimited]);
    let retry = out.iter().find_map(|o| match o {
        Output::Frame(ServerFrame::Error { retry_after_ms, .. }) => *retry_after_ms,
        _ => None,
    });
    assert_eq!(retry, Some(1000));
    assert!(matches!(out.last(), Some(Output::Frame(ServerFrame::Acked { .. }))));
    s.on_text(r#"{"type":"ping"}"#, 1000);
    assert!(error_codes(&drain(&mut s)).is_empty());
}

#[test]
fn too_many_ack_ids_is_an_error() {
    let (mut s, _) = logged_in(SessionLimits {
        max_ack_ids: 2,
        ..SessionLimits::default()
    });
    s.on_text(r#"{"type":"ack","ids":["a","b","c"]}"#, 0);
    assert_eq!(error_codes(&drain(&mut s)), vec![ErrorCode::TooManyIds]);
}

#[test]
fn pipelined_sends_stop_input_at_the_limit() {
    let (mut s, _) = logged_in(SessionLimits {
        max_pending_sends: 2,
        ..SessionLimits::default()
    });
    for i in 0..2 {
        assert!(s.wants_input());
        s.on_text(
            &format!(r#"{{"type":"send","to":"carol","client_id":"c{i}","text":"x"}}"#),
            0,
        );
    }
    assert!(!s.wants_input());
    s.on_appended(&ClientMsgId::parse("c0").unwrap(), Err(StoreError::Closed));
    assert!(s.wants_input());
}

#[test]
fn mailbox_then_live_then_ack() {
    let (mut s, limit) = logged_in(SessionLimits::default());
    // A push that races the first page is held, then deduplicated against it.
    s.on_push(msg(2, "bob"));
    s.on_scanned(Ok(vec![msg(1, "bob"), msg(2, "bob")]), limit);
    s.on_push(msg(3, "bob"));
    let delivered: Vec<u64> = drain(&mut s)
        .into_iter()
        .filter_map(|o| match o {
            Output::Deliver(m) => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(delivered, vec![1, 2, 3]);
    assert_eq!(s.inflight(), 3);
    s.on_text(r#"{"type":"ack","ids":["local.1.1","local.1.3","bogus"]}"#, 0);
    let out = drain(&mut s);
    assert_eq!(
        out,
        vec![Output::Ack {
            user: user("bob"),
            seqs: vec![1, 3],
            ids: vec!["local.1.1".into(), "local.1.3".into(), "bogus".into()]
        }]
    );
    assert_eq!(s.inflight(), 1);
}

#[test]
fn a_push_for_another_user_is_never_delivered() {
    let (mut s, limit) = logged_in(SessionLimits::default());
    s.on_scanned(Ok(vec![]), limit);
    drain(&mut s);
    s.on_push(msg(1, "carol"));
    assert_eq!(drain(&mut s), vec![]);
    // Nor does it move the cursor past bob's own first message.
    s.on_push(msg(1, "bob"));
    assert!(matches!(drain(&mut s)[..], [Output::Deliver(ref m)] if m.to == user("bob")));
}

#[test]
fn full_window_falls_back_to_the_mailbox() {
    let (mut s, limit) = logged_in(SessionLimits {
        max_inflight: 2,
        ..SessionLimits::default()
    });
    assert_eq!(limit, 2);
    s.on_scanned(Ok(vec![]), limit);
    s.on_push(msg(1, "bob"));
    s.on_push(msg(2, "bob"));
    s.on_push(msg(3, "bob"));
    assert_eq!(drain(&mut s).len(), 2);
    s.on_text(r#"{"type":"ack","ids":["local.1.1"]}"#, 0);
    let out = drain(&mut s);
    assert_eq!(
        out.last(),
        Some(&Output::Scan {
            user: user("bob"),
            after: 2,
            limit: 1
        })
    );
}

// ---------------------------------------------------------------------------------------
// A model of everything around a session: a mailbox with snapshot reads, a router with a
// bounded push queue that drops and flags, acks that land later. Random schedules of
// these must never make the session lose, duplicate or reorder a message.

#[derive(Debug, Clone)]
enum Step {
    /// Commit a message; `for_bob` false commits to someone else (a seq gap for bob).
    Commit { for_bob: bool },
    /// Hand the oldest queued push to the session.
    Push,
    /// Take the snapshot for the outstanding page request.
    Snapshot,
    /// Hand the snapshotted page to the session.
    Page,
    /// The client acknowledges the oldest `n` unacknowledged messages it has.
    ClientAck { n: usize },
    /// The oldest outstanding store ack commits.
    AckDone,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<bool>().prop_map(|b| Step::Commit { for_bob: b }),
        4 => Just(Step::Push),
        2 => Just(Step::Snapshot),
        2 => Just(Step::Page),
        2 => (1usize..4).prop_map(|n| Step::ClientAck { n }),
        2 => Just(Step::AckDone),
    ]
}

struct World {
    session: Session,
    next_seq: u64,
    mailbox: BTreeMap<u64, SharedMessage>,
    committed_for_bob: Vec<u64>,
    queue: VecDeque<SharedMessage>,
    queue_cap: usize,
    dropped: bool,
    request: Option<(u64, usize)>,
    snapshot: Option<(Vec<SharedMessage>, usize)>,
    client_unacked: VecDeque<SharedMessage>,
    store_acks: VecDeque<Vec<u64>>,
    delivered: Vec<u64>,
}

impl World {
    fn new(limits: SessionLimits, queue_cap: usize) -> Self {
        let mut session = session_with(limits);
        session.on_text(r#"{"type":"login","token":"user:bob"}"#, 0);
        let mut world = Self {
            session,
            next_seq: 1,
            mailbox: BTreeMap::new(),
            committed_for_bob: Vec::new(),
            queue: VecDeque::new(),
            queue_cap,
            dropped: false,
            request: None,
            snapshot: None,
            client_unacked: VecDeque::new(),
            store_acks: VecDeque::new(),
            delivered: Vec::new(),
        };
        world.collect();
        world.session.on_joined(Ok(()));
        world.collect();
        world
    }

    fn collect(&mut self) {
        while let Some(out) = self.session.poll_output() {
            match out {
                Output::Deliver(m) => {
                    assert!(
                        self.delivered.last().is_none_or(|&last| last < m.seq),
                        "out of order or duplicate: {} after {:?}",
                        m.seq,
                        self.delivered.last()
                    );
                    self.delivered.push(m.seq);
                    self.client_unacked.push_back(m);
                }
                Output::Scan { after, limit, .. } => {
                    assert!(self.request.is_none() && self.snapshot.is_none(), "two pages at once");
                    self.request = Some((after, limit));
                }
                Output::Ack { seqs, .. } => self.store_acks.push_back(seqs),
                Output::Close { .. } => panic!("session closed"),
                Output::Frame(_) | Output::Join { .. } | Output::Append(_) | Output::Ping => {}
            }
        }
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Commit { for_bob } => {
                let seq = self.next_seq;
                self.next_seq += 1;
                if *for_bob {
                    let m = msg(seq, "bob");
                    self.mailbox.insert(seq, m.clone());
                    self.committed_for_bob.push(seq);
                    if self.queue.len() < self.queue_cap {
                        self.queue.push_back(m);
                    } else {
                        self.dropped = true;
                    }
                }
            }
            Step::Push => {
                if let Some(m) = self.queue.pop_front() {
                    if std::mem::take(&mut self.dropped) {
                        self.session.on_push_dropped();
                    }
                    self.session.on_push(m);
                }
            }
            Step::Snapshot => {
                if let Some((after, limit)) = self.request.take() {
                    let page = self
                        .mailbox
                        .range(after + 1..)
                        .take(limit)
                        .map(|(_, m)| m.clone())
                        .collect();
                    self.snapshot = Some((page, limit));
                }
            }
            Step::Page => {
                if let Some((page, limit)) = self.snapshot.take() {
                    self.session.on_scanned(Ok(page), limit);
                }
            }
            Step::ClientAck { n } => {
                let ids: Vec<String> = (0..*n)
                    .filter_map(|_| self.client_unacked.pop_front())
                    .map(|m| format!("\"{}\"", m.id))
                    .collect();
                if !ids.is_empty() {
                    let frame = format!(r#"{{"type":"ack","ids":[{}]}}"#, ids.join(","));
                    self.session.on_text(&frame, 0);
                }
            }
            Step::AckDone => {
                if let Some(seqs) = self.store_acks.pop_front() {
                    for seq in seqs {
                        self.mailbox.remove(&seq);
                    }
                }
            }
        }
        self.collect();
    }

    /// Lets everything in flight finish, the client acking all it gets.
    fn settle(&mut self) {
        if std::mem::take(&mut self.dropped) {
            self.session.on_push_dropped();
            self.collect();
        }
        for _ in 0..10_000 {
            let idle = self.queue.is_empty()
                && self.request.is_none()
                && self.snapshot.is_none()
                && self.client_unacked.is_empty()
                && self.store_acks.is_empty();
            if idle {
                return;
            }
            for s in [
                Step::Push,
                Step::Snapshot,
                Step::Page,
                Step::ClientAck { n: 3 },
                Step::AckDone,
            ] {
                self.run(&s);
            }
        }
        panic!("did not settle");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_committed_message_is_delivered_once_in_order(
        steps in proptest::collection::vec(step(), 0..200),
        max_inflight in 1usize..6,
        push_buffer in 0usize..4,
        queue_cap in 0usize..4,
    ) {
        let limits = SessionLimits { max_inflight, push_buffer, ..SessionLimits::default() };
        let mut world = World::new(limits, queue_cap);
        for step in &steps {
            world.run(step);
        }
        world.settle();
        prop_assert_eq!(&world.delivered, &world.committed_for_bob);
        prop_assert!(world.mailbox.is_empty());
    }
}
