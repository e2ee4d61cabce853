//! Stores replicating to each other through their streams, with the real apply logic:
//! whatever order other DCs' entries arrive in, every store ends with the same mailboxes
//! and coordinates, and nothing acknowledged comes back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use chinwag_core::{ClientMsgId, Coordinate};
use chinwag_replication::Log;
use proptest::prelude::*;

use super::*;
use crate::writer::TRUNCATE_MAX;

#[derive(Default)]
struct Seen(Mutex<Vec<SharedMessage>>);

impl CommitListener for Seen {
    fn committed(&self, msg: &SharedMessage, _: &[Coordinate]) {
        self.0.lock().unwrap().push(msg.clone());
    }
}

struct Dc {
    _dir: tempfile::TempDir,
    store: EmbeddedStore,
    seen: Arc<Seen>,
}

fn dc(name: &str) -> Dc {
    let dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Seen::default());
    let options = StoreOptions {
        dc: DcName::parse(name).unwrap(),
        node: NodeName::parse("n1").unwrap(),
        mailbox_max_messages: 1_000,
        commit_batch_max: 64,
        queue: 1024,
        dedup_window: Duration::from_secs(3600),
        replicate: true,
        memory: crate::StoreMemory::default(),
        journal_dir: None,
    };
    let store = EmbeddedStore::open(dir.path(), options, seen.clone(), Box::new(|_| {})).unwrap();
    Dc { _dir: dir, store, seen }
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn msg(from: &str, to: &str, client_id: &str) -> NewMessage {
    NewMessage {
        from: user(from),
        to: user(to),
        client_id: ClientMsgId::parse(client_id).unwrap(),
        text: format!("{from}:{client_id}"),
        at_ms: unix_ms(),
        seq: None,
    }
}

/// Copies everything `from` has of `stream` that `to` lacks.
async fn pull(to: &Dc, from: &Dc, stream: &StreamId) {
    let (applied, _) = to.store.replication_state().unwrap();
    let next = applied.get(stream) + 1;
    let entries = from.store.read(stream, next, 10_000, usize::MAX);
    if !entries.is_empty() {
        to.store.ingest(stream.clone(), next, entries).await.unwrap();
    }
}

/// `to` merges a snapshot of `from`.
async fn merge(to: &Dc, from: &Dc) {
    let (applied, items) = from.store.snapshot().unwrap();
    to.store.merge_snapshot(applied, items).await.unwrap();
}

async fn mailbox(d: &Dc, who: &str) -> BTreeSet<String> {
    d.store
        .scan(user(who), 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id.to_string())
        .collect()
}

#[tokio::test]
async fn a_message_replicates_with_its_id_and_is_pushed_on_arrival() {
    let (east, west) = (dc("east"), dc("west"));
    let receipt = east.store.append(msg("alice", "bob", "c1")).await.unwrap();
    pull(&west, &east, east.store.stream()).await;
    let pushed = west.seen.0.lock().unwrap().clone();
    assert_eq!(pushed.len(), 1, "the arriving entry is handed to the commit listener");
    assert_eq!(pushed[0].id, receipt.id);
    assert_eq!(pushed[0].text, "alice:c1");
    assert_eq!(mailbox(&west, "bob").await, BTreeSet::from([receipt.id.to_string()]));
    // A retry of the same send in the other DC is recognised.
    assert_eq!(
        west.store.append(msg("alice", "bob", "c1")).await.unwrap().id,
        receipt.id
    );
}

#[tokio::test]
async fn an_ack_in_one_dc_deletes_everywhere() {
    let (east, west) = (dc("east"), dc("west"));
    east.store.append(msg("alice", "bob", "c1")).await.unwrap();
    pull(&west, &east, east.store.stream()).await;
    let page = west.store.scan(user("bob"), 0, 10).await.unwrap();
    west.store.ack(user("bob"), vec![page[0].seq]).await.unwrap();
    pull(&east, &west, west.store.stream()).await;
    assert!(mailbox(&east, "bob").await.is_empty());
    assert_eq!(east.store.stats().mailbox_depth, 0);
}

/// east stores a message for bob, west acknowledges it, and north hears west's ack
/// before east's message: returns (east, north).
async fn an_ack_ahead_of_its_message() -> (Dc, Dc) {
    let (east, west, north) = (dc("east"), dc("west"), dc("north"));
    east.store.append(msg("alice", "bob", "c1")).await.unwrap();
    pull(&west, &east, east.store.stream()).await;
    let page = west.store.scan(user("bob"), 0, 10).await.unwrap();
    west.store.ack(user("bob"), vec![page[0].seq]).await.unwrap();
    pull(&north, &west, west.store.stream()).await;
    (east, north)
}

#[tokio::test]
async fn an_ack_that_overtakes_its_message_prevents_its_resurrection() {
    let (east, north) = an_ack_ahead_of_its_message().await;
    pull(&north, &east, east.store.stream()).await;
    assert!(mailbox(&north, "bob").await.is_empty());
    assert!(
        north.seen.0.lock().unwrap().is_empty(),
        "nothing pushed for an acknowledged message"
    );
}

#[tokio::test]
async fn coordinates_replicate_and_restarts_retract_them() {
    let dir = tempfile::tempdir().unwrap();
    let west = dc("west");
    let options = StoreOptions {
        dc: DcName::parse("east").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        mailbox_max_messages: 10,
        commit_batch_max: 64,
        queue: 64,
        dedup_window: Duration::from_secs(60),
        replicate: true,
        memory: crate::StoreMemory::default(),
        journal_dir: None,
    };
    let open = || EmbeddedStore::open(dir.path(), options.clone(), Arc::new(Seen::default()), Box::new(|_| {}));
    let east = open().unwrap();
    let at = Coordinate {
        dc: DcName::parse("east").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        incarnation: east.incarnation(),
        conn: 1,
    };
    east.add_coordinate(user("bob"), at.clone()).await.unwrap();
    let stream = east.stream().clone();
    let ship = |east: &EmbeddedStore| {
        let (applied, _) = west.store.replication_state().unwrap();
        let next = applied.get(&stream) + 1;
        (next, east.read(&stream, next, 100, usize::MAX))
    };
    let (next, entries) = ship(&east);
    west.store.ingest(stream.clone(), next, entries).await.unwrap();
    assert_eq!(west.store.coordinates(&user("bob")), vec![at.clone()]);
    // A crash and restart of east: its new incarnation retracts the old coordinate.
    drop(east);
    let east = crate::tests::open_when_free(open).await.unwrap();
    let (next, entries) = ship(&east);
    west.store.ingest(stream.clone(), next, entries).await.unwrap();
    assert!(west.store.coordinates(&user("bob")).is_empty());
}

/// `user` online at connection `conn` of east's node n1 (incarnation 1).
fn online_in_east(user_name: &str, conn: u64) -> (UserId, Coordinate) {
    let at = Coordinate {
        dc: DcName::parse("east").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        incarnation: 1,
        conn,
    };
    (user(user_name), at)
}

/// East's stream in the life that began at `epoch`.
fn east_life(epoch: u32) -> StreamId {
    StreamId::new(DcName::parse("east").unwrap(), Epoch(epoch))
}

/// Ingests into `to` one entry of `stream` at `seq`: `user` online at `at`.
async fn ingest_online(to: &Dc, stream: &StreamId, seq: u64, (user, at): (UserId, Coordinate)) {
    let entry = schema::Entry::Online { user, at }.encode();
    to.store.ingest(stream.clone(), seq, vec![entry]).await.unwrap();
}

#[tokio::test]
async fn a_rebuilt_dc_leaves_no_coordinates_of_its_earlier_life() {
    let west = dc("west");
    let (old, new) = (east_life(100), east_life(200));
    let (bob, carol, dave) = (
        online_in_east("bob", 1),
        online_in_east("carol", 1),
        online_in_east("dave", 2),
    );
    ingest_online(&west, &old, 1, bob.clone()).await;
    assert_eq!(west.store.coordinates(&bob.0), vec![bob.1.clone()]);
    // East lost its data and started again: its first new entry retires what its earlier
    // life announced, which nothing would ever retract.
    ingest_online(&west, &new, 1, carol.clone()).await;
    assert!(west.store.coordinates(&bob.0).is_empty());
    assert_eq!(west.store.coordinates(&carol.0), vec![carol.1.clone()]);
    // The rest of the earlier life, relayed late, brings back no one.
    ingest_online(&west, &old, 2, dave.clone()).await;
    assert!(west.store.coordinates(&dave.0).is_empty());
    assert_eq!(west.store.coordinates(&carol.0), vec![carol.1]);
}

#[tokio::test]
async fn presence_comes_from_a_dcs_newest_life_whatever_order_its_lives_arrive_in() {
    // A DC catching up hears of east's third life first, then of the two before it.
    let west = dc("west");
    let (carol, bob, dave) = (
        online_in_east("carol", 1),
        online_in_east("bob", 1),
        online_in_east("dave", 1),
    );
    ingest_online(&west, &east_life(300), 1, carol.clone()).await;
    ingest_online(&west, &east_life(100), 1, bob.clone()).await;
    ingest_online(&west, &east_life(200), 1, dave.clone()).await;
    assert_eq!(west.store.coordinates(&carol.0), vec![carol.1]);
    assert!(west.store.coordinates(&bob.0).is_empty());
    assert!(west.store.coordinates(&dave.0).is_empty());
}

#[tokio::test]
async fn a_dc_takes_no_presence_from_its_own_earlier_lives() {
    // East's own earlier streams come back to it after a rebuild, with the coordinates of
    // connections that no longer exist (their numbers may now be other users'); one of
    // them began while the clock was ahead, at a later epoch than today's.
    let east = dc("east");
    let (bob, carol) = (online_in_east("bob", 1), online_in_east("carol", 1));
    east.store
        .add_coordinate(carol.0.clone(), carol.1.clone())
        .await
        .unwrap();
    for life in [100, 200, u32::MAX] {
        ingest_online(&east, &east_life(life), 1, bob.clone()).await;
    }
    assert!(east.store.coordinates(&bob.0).is_empty());
    assert_eq!(east.store.coordinates(&carol.0), vec![carol.1]);
}

#[tokio::test]
async fn a_snapshot_further_along_an_earlier_life_does_not_replace_presence() {
    let (west, north) = (dc("west"), dc("north"));
    let (bob, carol) = (online_in_east("bob", 1), online_in_east("carol", 1));
    ingest_online(&west, &east_life(200), 1, carol.clone()).await;
    // North has heard only of east's earlier life, and further along it than west.
    let old = east_life(100);
    ingest_online(&north, &old, 1, bob.clone()).await;
    merge(&west, &north).await;
    assert_eq!(west.store.coordinates(&carol.0), vec![carol.1]);
    assert!(west.store.coordinates(&bob.0).is_empty());
}

#[tokio::test]
async fn a_snapshot_that_covers_an_overtaken_message_leaves_no_tombstone() {
    // north keeps a tombstone for east's message...
    let (east, north) = an_ack_ahead_of_its_message().await;
    assert_eq!(north.store.tables.gone.iter().count(), 1);
    // ...which east's message, arriving in a snapshot rather than from the log, will
    // never consume: the merge drops it.
    merge(&north, &east).await;
    assert_eq!(north.store.tables.gone.iter().count(), 0);
    assert!(mailbox(&north, "bob").await.is_empty());
}

#[tokio::test]
async fn a_late_joiner_catches_up_from_a_snapshot() {
    let (east, west, north) = (dc("east"), dc("west"), dc("north"));
    let kept = east.store.append(msg("alice", "bob", "c1")).await.unwrap();
    east.store.append(msg("alice", "bob", "c2")).await.unwrap();
    west.store.append(msg("carol", "bob", "c3")).await.unwrap();
    pull(&east, &west, west.store.stream()).await;
    // bob acknowledges the second message in east.
    let page = east.store.scan(user("bob"), 0, 10).await.unwrap();
    east.store.ack(user("bob"), vec![page[1].seq]).await.unwrap();
    let (dave, online) = online_in_east("dave", 9);
    east.store.add_coordinate(dave, online.clone()).await.unwrap();

    merge(&north, &east).await;
    assert_eq!(mailbox(&north, "bob").await, mailbox(&east, "bob").await);
    assert!(mailbox(&north, "bob").await.contains(&kept.id.to_string()));
    assert_eq!(north.store.coordinates(&user("dave")), vec![online]);
    let (north_applied, _) = north.store.replication_state().unwrap();
    let (east_applied, _) = east.store.replication_state().unwrap();
    assert!(north_applied.covers(&east_applied));
    // The arriving messages were handed to the commit listener, like any other.
    assert_eq!(north.seen.0.lock().unwrap().len(), 2);
    // Merging the same snapshot again changes nothing.
    merge(&north, &east).await;
    assert_eq!(north.store.stats().mailbox_depth, 2);
}

#[tokio::test]
async fn a_snapshot_carries_acknowledgements_the_receiver_missed() {
    let (east, west) = (dc("east"), dc("west"));
    east.store.append(msg("alice", "bob", "c1")).await.unwrap();
    pull(&west, &east, east.store.stream()).await;
    let page = east.store.scan(user("bob"), 0, 10).await.unwrap();
    east.store.ack(user("bob"), vec![page[0].seq]).await.unwrap();
    // West never pulls east's ack entry; a snapshot of east tells it instead.
    merge(&west, &east).await;
    assert!(mailbox(&west, "bob").await.is_empty());
}

#[tokio::test]
async fn a_retry_accepted_in_two_dcs_converges_on_one_copy() {
    let (east, west) = (dc("east"), dc("west"));
    // The same send reached both DCs before either heard of the other.
    let a = east.store.append(msg("alice", "bob", "same")).await.unwrap();
    let b = west.store.append(msg("alice", "bob", "same")).await.unwrap();
    assert_ne!(a.id, b.id);
    pull(&west, &east, east.store.stream()).await;
    pull(&east, &west, west.store.stream()).await;
    let keep = a.id.clone().min(b.id.clone()).to_string();
    assert_eq!(mailbox(&east, "bob").await, BTreeSet::from([keep.clone()]));
    assert_eq!(mailbox(&west, "bob").await, BTreeSet::from([keep]));
}

#[tokio::test]
async fn a_client_id_reused_after_the_window_is_a_new_message_in_every_dc() {
    let (east, west) = (dc("east"), dc("west"));
    let old = NewMessage {
        at_ms: 1_000,
        seq: None,
        ..msg("alice", "bob", "c1")
    };
    east.store.append(old).await.unwrap();
    pull(&west, &east, east.store.stream()).await;
    // The same client id, long past the window: a new message at east, and at west too,
    // though west still holds the old record (nothing compacted it away).
    let again = east.store.append(msg("alice", "bob", "c1")).await.unwrap();
    assert!(!again.duplicate);
    pull(&west, &east, east.store.stream()).await;
    assert_eq!(mailbox(&west, "bob").await.len(), 2);
    assert_eq!(mailbox(&west, "bob").await, mailbox(&east, "bob").await);
}

#[tokio::test]
async fn entries_after_a_gap_are_not_applied() {
    let (east, west) = (dc("east"), dc("west"));
    for i in 0..3 {
        east.store.append(msg("alice", "bob", &format!("c{i}"))).await.unwrap();
    }
    let stream = east.store.stream().clone();
    let third = east.store.read(&stream, 3, 1, usize::MAX);
    assert_eq!(west.store.ingest(stream.clone(), 3, third).await.unwrap(), 0);
    assert!(mailbox(&west, "bob").await.is_empty());
    pull(&west, &east, &stream).await;
    assert_eq!(mailbox(&west, "bob").await.len(), 3);
}

#[tokio::test]
async fn truncated_logs_no_longer_serve_old_entries() {
    let east = dc("east");
    for i in 0..5 {
        east.store.append(msg("alice", "bob", &format!("c{i}"))).await.unwrap();
    }
    let stream = east.store.stream().clone();
    east.store.truncate(stream.clone(), 3).await.unwrap();
    // Make the (non-durable) truncation visible by committing something after it.
    east.store.append(msg("alice", "bob", "after")).await.unwrap();
    assert!(east.store.read(&stream, 1, 10, usize::MAX).is_empty());
    assert_eq!(east.store.read(&stream, 4, 10, usize::MAX).len(), 3);
    let (_, truncated) = east.store.replication_state().unwrap();
    assert_eq!(truncated.get(&stream), 3);
}

#[tokio::test]
async fn a_long_log_is_dropped_a_bounded_part_per_commit() {
    let east = dc("east");
    let stream = east.store.stream().clone();
    let head = 2 * TRUNCATE_MAX + 50;
    let sends = (0..head).map(|i| east.store.append(msg("alice", "bob", &format!("c{i}"))));
    futures_util::future::try_join_all(sends).await.unwrap();
    let dropped = || east.store.replication_state().unwrap().1.get(&stream);
    east.store.truncate(stream.clone(), head).await.unwrap();
    let mut seen = vec![dropped()];
    for i in 0..3 {
        east.store
            .append(msg("alice", "bob", &format!("after{i}")))
            .await
            .unwrap();
        seen.push(dropped());
    }
    // Each commit drops TRUNCATE_MAX entries plus twice what it logs (an append logs
    // one), and later commits carry on without being asked again.
    assert_eq!(seen, [TRUNCATE_MAX, 2 * TRUNCATE_MAX + 2, head, head]);
    assert_eq!(east.store.read(&stream, head + 1, 10, usize::MAX).len(), 3);
}

#[tokio::test]
async fn truncation_keeps_up_with_logs_that_grow_faster_than_its_fixed_part() {
    let west = dc("west");
    let stream = east_life(100);
    let batch = 3 * TRUNCATE_MAX;
    for round in 0..10 {
        let entries = (0..batch)
            .map(|i| {
                let (user, at) = online_in_east(&format!("u{round}x{i}"), i);
                schema::Entry::Online { user, at }.encode()
            })
            .collect();
        let applied = west
            .store
            .ingest(stream.clone(), round * batch + 1, entries)
            .await
            .unwrap();
        west.store.truncate(stream.clone(), applied).await.unwrap();
    }
    let (applied, truncated) = west.store.replication_state().unwrap();
    let kept = applied.get(&stream) - truncated.get(&stream);
    assert_eq!(applied.get(&stream), 10 * batch);
    assert!(kept <= batch, "{kept} entries kept");
}

#[tokio::test]
async fn a_snapshot_that_moves_a_stream_past_the_log_leaves_no_entries_behind() {
    let (east, west, north) = (dc("east"), dc("west"), dc("north"));
    let stream = east.store.stream().clone();
    // More than one truncation's worth, so that the merge must drop it all at once.
    let (held, total) = (TRUNCATE_MAX + 50, TRUNCATE_MAX + 53);
    for i in 0..total {
        east.store.append(msg("alice", "bob", &format!("c{i}"))).await.unwrap();
        if i + 1 == held {
            pull(&north, &east, &stream).await;
        }
    }
    pull(&west, &east, &stream).await;
    assert_eq!(north.store.read(&stream, 1, 1_000, usize::MAX).len() as u64, held);
    // North learns of the last three entries from west's snapshot, not from a log: its
    // log of east's stream now starts after them, and what it held must not linger below.
    merge(&north, &west).await;
    let (applied, truncated) = north.store.replication_state().unwrap();
    assert_eq!((applied.get(&stream), truncated.get(&stream)), (total, total));
    assert_eq!(
        north.store.tables.log.iter().count(),
        0,
        "log entries left below the truncation"
    );
    assert_eq!(mailbox(&north, "bob").await.len() as u64, total);
}

/// One step of a random multi-DC history.
#[derive(Debug, Clone)]
enum Step {
    /// `to` merges a snapshot of `from`'s whole state.
    Snapshot {
        to: usize,
        from: usize,
    },
    Send {
        dc: usize,
        from: u8,
        to: u8,
    },
    /// The recipient acknowledges the oldest message it has in this DC.
    Ack {
        dc: usize,
        who: u8,
    },
    Online {
        dc: usize,
        who: u8,
    },
    /// `to` applies what `from` has of the stream of `origin`.
    Pull {
        to: usize,
        from: usize,
        origin: usize,
    },
}

fn step(n: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..n, 0u8..3, 0u8..3).prop_map(|(dc, from, to)| Step::Send { dc, from, to }),
        2 => (0..n, 0u8..3).prop_map(|(dc, who)| Step::Ack { dc, who }),
        1 => (0..n, 0u8..3).prop_map(|(dc, who)| Step::Online { dc, who }),
        5 => (0..n, 0..n, 0..n).prop_map(|(to, from, origin)| Step::Pull { to, from, origin }),
        1 => (0..n, 0..n).prop_map(|(to, from)| Step::Snapshot { to, from }),
    ]
}

async fn run_history(steps: Vec<Step>) {
    let dcs = [dc("east"), dc("west"), dc("north")];
    let streams: Vec<StreamId> = dcs.iter().map(|d| d.store.stream().clone()).collect();
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut sent = 0;
    for step in steps {
        match step {
            Step::Send { dc, from, to } => {
                sent += 1;
                let m = msg(&format!("u{from}"), &format!("u{to}"), &format!("k{sent}"));
                dcs[dc].store.append(m).await.unwrap();
            }
            Step::Ack { dc, who } => {
                let page = dcs[dc].store.scan(user(&format!("u{who}")), 0, 1).await.unwrap();
                if let Some(m) = page.first() {
                    acked.insert(m.id.to_string());
                    dcs[dc].store.ack(m.to.clone(), vec![m.seq]).await.unwrap();
                }
            }
            Step::Online { dc, who } => {
                let at = Coordinate {
                    dc: dcs[dc].store.dc.clone(),
                    node: NodeName::parse("n1").unwrap(),
                    incarnation: 1,
                    conn: sent,
                };
                dcs[dc]
                    .store
                    .add_coordinate(user(&format!("u{who}")), at)
                    .await
                    .unwrap();
            }
            Step::Pull { to, from, origin } => {
                if to != from && to != origin {
                    pull(&dcs[to], &dcs[from], &streams[origin]).await;
                }
            }
            Step::Snapshot { to, from } => {
                if to != from {
                    merge(&dcs[to], &dcs[from]).await;
                }
            }
        }
    }
    // Heal: everyone pulls everything, twice round.
    for _ in 0..2 {
        for to in 0..3 {
            for (origin, stream) in streams.iter().enumerate() {
                if origin != to {
                    pull(&dcs[to], &dcs[origin], stream).await;
                }
            }
        }
    }
    let mut views = Vec::new();
    for d in &dcs {
        let mut view = BTreeMap::new();
        for who in 0..3 {
            let name = format!("u{who}");
            let ids = mailbox(d, &name).await;
            assert!(
                ids.is_disjoint(&acked),
                "{} resurrected an acknowledged message",
                d.store.dc
            );
            view.insert(name.clone(), (ids, d.store.coordinates(&user(&name)).len()));
        }
        views.push(view);
        // Every stream is applied everywhere now: no message is still awaited, so no
        // tombstone may be left waiting for one.
        assert_eq!(d.store.tables.gone.iter().count(), 0, "{} kept tombstones", d.store.dc);
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[1], views[2]);
    let total: usize = views[0].values().map(|(ids, _)| ids.len()).sum();
    assert_eq!(
        total + acked.len(),
        sent as usize,
        "every message is in the mailboxes or acknowledged"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The merge laws, observed on real stores: applying the same entries in any
    /// interleaving of streams gives the same state (commutative, associative), and
    /// applying them again changes nothing (idempotent).
    #[test]
    fn replicas_converge_whatever_the_order(steps in proptest::collection::vec(step(3), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_history(steps));
    }
}
