//! Numbered sends through the whole store: recognised by device and seq, with no
//! idempotency record of their own, after checkpoints and crashes alike.

use chinwag_core::{DeviceId, DeviceSeq, MessageId, StoreError};

use super::*;
use crate::tests::{crash_copy, new, open_when_free, options, try_open, user};

/// `from`'s send number `seq` from `device` to bob, with client id `client_id`.
fn numbered(from: &str, device: &str, seq: u64, client_id: &str) -> NewMessage {
    NewMessage {
        seq: Some(DeviceSeq {
            device: DeviceId::parse(device).unwrap(),
            seq,
        }),
        ..new(from, "bob", client_id, &format!("{from}/{device}/{seq}"))
    }
}

fn open(dir: &Path, replicate: bool) -> EmbeddedStore {
    try_open(
        dir,
        StoreOptions {
            replicate,
            ..options(100_000)
        },
    )
    .unwrap()
}

#[tokio::test]
async fn numbered_retries_are_recognised_by_device_and_seq_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    let first = store.append(numbered("alice", "phone", 1, "c1")).await.unwrap();
    let second = store.append(numbered("alice", "phone", 2, "c2")).await.unwrap();
    assert!(!first.duplicate && !second.duplicate);
    // The seq decides, whatever the client id.
    let again = store.append(numbered("alice", "phone", 2, "another")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!((again.id, again.at_ms), (second.id.clone(), second.at_ms));
    // Another device, another sender: other numbers.
    for other in [
        numbered("alice", "laptop", 2, "c2"),
        numbered("carol", "phone", 2, "c2"),
    ] {
        assert!(!store.append(other).await.unwrap().duplicate);
    }
    // Nor is a numbered send's client id remembered on its own.
    assert!(
        !store
            .append(new("alice", "bob", "c1", "plain"))
            .await
            .unwrap()
            .duplicate
    );
    assert_eq!(store.scan(user("bob"), 0, 100).await.unwrap().len(), 5);
    let stats = store.engine_stats();
    assert_eq!((stats.device_windows, stats.window_receipts), (3, 4));

    // A clean stop wrote every idempotency record and window out: one record (the plain
    // send's), one window per device.
    let store = close_and_reopen(store, dir.path(), options(100_000)).await;
    assert_eq!(store.tables.dedup.iter().count(), 1);
    assert_eq!(store.tables.seqs.iter().count(), 3);
    let again = store.append(numbered("alice", "phone", 1, "c1")).await.unwrap();
    assert_eq!((again.duplicate, again.id), (true, first.id));
}

#[tokio::test]
async fn a_numbered_send_too_far_below_its_devices_highest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    store.append(numbered("alice", "phone", 5_000, "a")).await.unwrap();
    let oldest_kept = 5_000 - crate::numbered::WINDOW + 1;
    match store.append(numbered("alice", "phone", oldest_kept - 1, "b")).await {
        Err(StoreError::SeqTooOld { seq, highest, .. }) => assert_eq!((seq, highest), (oldest_kept - 1, 5_000)),
        other => panic!("{other:?}"),
    }
    // Inside the window, a seq never seen is a send that never arrived: new.
    assert!(
        !store
            .append(numbered("alice", "phone", oldest_kept, "c"))
            .await
            .unwrap()
            .duplicate
    );
    assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap().len(), 2);
}

/// A device silent for a whole dedup window loses its window when fjall next compacts
/// the `seqs` keyspace; the others keep theirs.
#[tokio::test]
async fn a_silent_devices_window_is_dropped_by_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions {
        dedup_window: std::time::Duration::from_secs(60),
        ..options(1_000)
    };
    let store = try_open(dir.path(), options()).unwrap();
    let silent = NewMessage {
        at_ms: 1_000,
        ..numbered("alice", "old-phone", 1, "a")
    };
    store.append(silent).await.unwrap();
    let kept = store.append(numbered("alice", "phone", 1, "b")).await.unwrap();
    let store = close_and_reopen(store, dir.path(), options()).await;
    assert_eq!(store.tables.seqs.iter().count(), 2);
    // The checkpoint wrote the windows to a memtable; only tables are compacted.
    store.tables.seqs.rotate_memtable_and_wait().unwrap();
    store.tables.seqs.major_compact().unwrap();
    assert_eq!(store.tables.seqs.iter().count(), 1);
    let again = store.append(numbered("alice", "phone", 1, "b")).await.unwrap();
    assert_eq!((again.duplicate, again.id), (true, kept.id));
}

/// With peers, twins are found by client id, so a numbered send keeps its idempotency
/// record too, and where the window cannot tell, the record decides.
#[tokio::test]
async fn with_peers_a_numbered_send_also_keeps_its_idempotency_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), true);
    let first = store.append(numbered("alice", "phone", 1, "c1")).await.unwrap();
    let plain = store.append(new("alice", "bob", "c1", "again")).await.unwrap();
    assert_eq!((plain.duplicate, plain.id), (true, first.id));
    store.append(numbered("alice", "phone", 5_000, "c2")).await.unwrap();
    // Below the window: not refused, since the record of `c1` is still there to say...
    let below = store.append(numbered("alice", "phone", 1, "c1")).await.unwrap();
    assert!(below.duplicate);
    // ...and a client id without a record is new.
    assert!(
        !store
            .append(numbered("alice", "phone", 2, "c3"))
            .await
            .unwrap()
            .duplicate
    );
}

/// Windows are let go at checkpoints once more than a few are in memory (4 in tests) and
/// read back from the tables when their device sends again: twelve devices, checkpoints
/// every few messages, and every retry still recognised, before and after a crash copy.
#[tokio::test]
async fn windows_let_go_are_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    let mut first = Vec::new();
    for seq in 1..=3 {
        for device in 0..12 {
            let device = format!("d{device}");
            let receipt = store.append(numbered("alice", &device, seq, "c")).await.unwrap();
            first.push((device, seq, receipt.id));
        }
    }
    store.settle().await;
    let resident = store.engine_stats().device_windows;
    assert!(resident < 12, "no window was let go: {resident} in memory");
    let copy = crash_copy(dir.path());
    for store in [store, open(copy.path(), false)] {
        for (device, seq, id) in &first {
            let again = store.append(numbered("alice", device, *seq, "retry")).await.unwrap();
            assert_eq!((again.duplicate, &again.id), (true, id), "{device} {seq}");
        }
    }
}

/// Receipts reach a device's window at checkpoints; in between they are only in the
/// journal, and a restart after a crash merges them in. Either way a retry is answered
/// with the first attempt's id.
#[tokio::test]
async fn numbered_retries_are_recognised_after_crashes_before_and_after_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    // Three sends: fewer than a checkpoint takes in tests, so only in the journal.
    let mut first = send(&store, 1..=3).await;
    store.settle().await;
    assert_eq!(store.tables.seqs.iter().count(), 0, "no checkpoint yet");
    recognised_after_a_crash(dir.path(), &first).await;

    // Enough for several checkpoints, and a few after the last; across three blocks.
    first.extend(send(&store, 4..=150).await);
    store.settle().await;
    assert_eq!(
        store.tables.seqs.iter().count(),
        3,
        "checkpoints wrote the window's blocks"
    );
    recognised_after_a_crash(dir.path(), &first).await;
}

async fn close_and_reopen(store: EmbeddedStore, dir: &Path, options: StoreOptions) -> EmbeddedStore {
    store.close().await;
    drop(store);
    open_when_free(|| try_open(dir, options.clone())).await.unwrap()
}

/// Sends alice's numbers `seqs` from her phone to bob; returns their ids.
async fn send(store: &EmbeddedStore, seqs: std::ops::RangeInclusive<u64>) -> Vec<MessageId> {
    let mut ids = Vec::new();
    for seq in seqs {
        let receipt = store
            .append(numbered("alice", "phone", seq, &format!("c{seq}")))
            .await
            .unwrap();
        assert!(!receipt.duplicate);
        ids.push(receipt.id);
    }
    ids
}

/// On a crash copy of the settled store in `dir`: the journal's receipts are merged into
/// the window, and each of alice's sends `first` (numbers 1, 2, …) is recognised.
async fn recognised_after_a_crash(dir: &Path, first: &[MessageId]) {
    let copy = crash_copy(dir);
    let reopened = open(copy.path(), false);
    assert_eq!(reopened.tables.seq_receipts.iter().count(), 0, "receipts left unmerged");
    for (seq, id) in (1..).zip(first) {
        let again = reopened.append(numbered("alice", "phone", seq, "retry")).await.unwrap();
        assert!(again.duplicate, "seq {seq} stored twice");
        assert_eq!(&again.id, id, "seq {seq}");
    }
    assert_eq!(reopened.scan(user("bob"), 0, 200).await.unwrap().len(), first.len());
}

/// A store of format 5 kept each window whole under its device key. Opened by this build
/// it is marked format 6, its windows still answer retries, and the next checkpoint writes
/// them in blocks and removes the whole one.
#[tokio::test]
async fn a_store_of_format_5_is_upgraded_and_its_windows_rewritten_in_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), false);
    let first = send(&store, 1..=100).await;
    store.close().await;
    drop(store);
    make_format_5(dir.path());

    let store = open_when_free(|| try_open(dir.path(), options(100_000))).await.unwrap();
    let format = store.tables.meta.get(schema::FORMAT).unwrap();
    assert_eq!(
        format.and_then(|v| schema::decode_u64(&v)),
        Some(schema::FORMAT_VERSION)
    );
    for (seq, id) in (1..).zip(&first) {
        let again = store.append(numbered("alice", "phone", seq, "retry")).await.unwrap();
        assert!(again.duplicate && &again.id == id, "seq {seq}");
    }
    store.close().await;
    let keys: Vec<usize> = store.tables.seqs.iter().map(|g| g.key().unwrap().len()).collect();
    assert_eq!(keys.len(), 2, "blocks 0 and 1, the whole window gone: {keys:?}");
    assert!(keys.iter().all(|&len| len == phone_key().len() + 8), "{keys:?}");
}

/// alice's phone's device key.
fn phone_key() -> Vec<u8> {
    schema::device_key(&user("alice"), &DeviceId::parse("phone").unwrap(), 0)
}

/// Rewrites the closed store in `dir` as format 5 left it: alice's phone's window whole
/// under its device key.
fn make_format_5(dir: &Path) {
    let db = fjall::Database::builder(dir.join(crate::STORE_DIR)).open().unwrap();
    let ks = |name| db.keyspace(name, fjall::KeyspaceCreateOptions::default).unwrap();
    let (meta, seqs) = (ks(schema::META), ks(schema::SEQS));
    let mut whole = crate::numbered::Window::new(chinwag_core::DcName::parse("local").unwrap());
    let blocks: Vec<_> = seqs.prefix(phone_key()).map(|g| g.into_inner().unwrap()).collect();
    assert_eq!(blocks.len(), 2, "checkpoints wrote blocks 0 and 1");
    for (key, bytes) in blocks {
        whole.merge(&crate::numbered::Window::decode(&bytes).unwrap());
        seqs.remove(key).unwrap();
    }
    seqs.insert(phone_key(), whole.encode()).unwrap();
    meta.insert(schema::FORMAT, schema::encode_u64(schema::FORMAT_WHOLE_WINDOWS))
        .unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}
