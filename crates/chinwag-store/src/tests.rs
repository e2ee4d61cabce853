use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use chinwag_core::ClientMsgId;

use super::*;

#[derive(Default)]
struct Recorder(Mutex<Vec<(u64, usize)>>);

impl CommitListener for Recorder {
    fn committed(&self, msg: &SharedMessage, online: &[Coordinate]) {
        self.0.lock().unwrap().push((msg.seq, online.len()));
    }
}

impl Recorder {
    fn seqs(&self) -> Vec<u64> {
        self.0.lock().unwrap().iter().map(|(s, _)| *s).collect()
    }
}

pub(crate) fn options(mailbox_max_messages: u64) -> StoreOptions {
    options_with_window(mailbox_max_messages, Duration::from_secs(3600))
}

fn options_with_window(mailbox_max_messages: u64, dedup_window: Duration) -> StoreOptions {
    StoreOptions {
        dc: DcName::parse("local").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        mailbox_max_messages,
        commit_batch_max: 64,
        queue: 1024,
        dedup_window,
        replicate: false,
        memory: SMALL_CHECKPOINTS,
        journal_dir: None,
    }
}

/// A checkpoint whenever held messages and their recipients reach 8, so that tests
/// see messages both held and in fjall.
pub(crate) const SMALL_CHECKPOINTS: StoreMemory = StoreMemory {
    memtable_bytes: 4 * 1024 * 1024,
    cache_bytes: 32 * 1024 * 1024,
    checkpoint_bytes: 8 * 1024,
};

fn open(dir: &Path, max: u64) -> (EmbeddedStore, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let store = EmbeddedStore::open(dir, options(max), recorder.clone(), Box::new(|_| {})).unwrap();
    (store, recorder)
}

pub(crate) fn try_open(dir: &Path, options: StoreOptions) -> Result<EmbeddedStore, OpenError> {
    EmbeddedStore::open(dir, options, Arc::new(Recorder::default()), Box::new(|_| {}))
}

pub(crate) fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

pub(crate) fn new(from: &str, to: &str, client_id: &str, text: &str) -> NewMessage {
    NewMessage {
        from: user(from),
        to: user(to),
        client_id: ClientMsgId::parse(client_id).unwrap(),
        text: text.into(),
        at_ms: unix_ms(),
        seq: None,
    }
}

fn coordinate(incarnation: u64, conn: u64) -> Coordinate {
    Coordinate {
        dc: DcName::parse("local").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        incarnation,
        conn,
    }
}

#[tokio::test]
async fn append_scan_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = open(dir.path(), 100);
    let a = store.append(new("alice", "bob", "c1", "one")).await.unwrap();
    let b = store.append(new("alice", "bob", "c2", "two")).await.unwrap();
    store.append(new("alice", "carol", "c3", "other")).await.unwrap();
    assert!(!a.duplicate && a.id.seq < b.id.seq);
    assert_eq!(
        a.id.to_string(),
        format!("local.{}.{}", store.stream().epoch(), a.id.seq)
    );

    let page = store.scan(user("bob"), 0, 10).await.unwrap();
    let texts: Vec<&str> = page.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(texts, ["one", "two"]);
    assert_eq!(page[0].from, user("alice"));
    assert_eq!(page[0].id, a.id);
    assert_eq!(store.scan(user("bob"), page[0].seq, 10).await.unwrap().len(), 1);
    assert_eq!(store.scan(user("bob"), 0, 1).await.unwrap().len(), 1);
    assert_eq!(store.stats().mailbox_depth, 3);

    store.ack(user("bob"), vec![page[0].seq, 9_999]).await.unwrap();
    let left = store.scan(user("bob"), 0, 10).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].text, "two");
    assert_eq!(store.stats().mailbox_depth, 2);
    // Another user cannot acknowledge bob's messages.
    store.ack(user("carol"), vec![left[0].seq]).await.unwrap();
    assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap().len(), 1);
    assert_eq!(recorder.seqs().len(), 3);
}

/// The scheduling policy (`/proc` `stat` field 41) of each of this process's threads named
/// `name`, compared as the kernel keeps names: their first 15 bytes.
#[cfg(target_os = "linux")]
fn thread_policies(name: &str) -> Vec<u32> {
    let kept = &name[..name.len().min(15)];
    let mut policies = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(path.join("comm")),
            std::fs::read_to_string(path.join("stat")),
        ) else {
            continue; // the thread ended meanwhile
        };
        if comm.trim_end() == kept {
            let after_name = &stat[stat.rfind(')').unwrap() + 2..];
            // Fields after the name start at field 3.
            policies.push(after_name.split_whitespace().nth(41 - 3).unwrap().parse().unwrap());
        }
    }
    policies
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_writer_thread_runs_under_sched_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    // Answered by the writer, so it has started and set its policy.
    store.append(new("alice", "bob", "c1", "one")).await.unwrap();
    let policies = thread_policies(WRITER_THREAD);
    assert!(!policies.is_empty(), "no writer thread found");
    assert!(
        policies.iter().all(|&p| p == libc::SCHED_BATCH as u32),
        "writer policies: {policies:?}"
    );
}

/// Appends about 3 MiB to bob's mailbox.
async fn append_three_mib(store: &EmbeddedStore) {
    for i in 0..1_000 {
        store
            .append(new("alice", "bob", &format!("c{i}"), &"x".repeat(3_000)))
            .await
            .unwrap();
    }
}

/// Whether fjall writes a table file for the mailbox within `within`.
async fn a_mailbox_table_within(store: &EmbeddedStore, within: Duration) -> bool {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if store.tables.mailbox.table_count() > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Appends about 3 MiB to bob's mailbox and says whether fjall wrote a table file for it
/// within 3 s: it does soon after a memtable fills.
async fn three_mib_reach_a_table(store: &EmbeddedStore) -> bool {
    append_three_mib(store).await;
    a_mailbox_table_within(store, Duration::from_secs(3)).await
}

fn with_memtable_bytes(bytes: u64) -> StoreOptions {
    StoreOptions {
        memory: crate::StoreMemory {
            memtable_bytes: bytes,
            ..SMALL_CHECKPOINTS
        },
        ..options(1_000_000)
    }
}

fn with_memtable(mib: u64) -> StoreOptions {
    with_memtable_bytes(mib * 1024 * 1024)
}

#[tokio::test]
async fn the_memtable_size_is_the_one_configured_at_each_open() {
    // 64 MiB: 3 MiB stay in memory.
    let dir = tempfile::tempdir().unwrap();
    let store = try_open(dir.path(), with_memtable(64)).unwrap();
    assert!(!three_mib_reach_a_table(&store).await);
    // Created with 64 MiB and reopened with 1: the 1 MiB applies.
    let dir = tempfile::tempdir().unwrap();
    try_open(dir.path(), with_memtable(64)).unwrap().close().await;
    let store = try_open(dir.path(), with_memtable(1)).unwrap();
    assert!(three_mib_reach_a_table(&store).await);
}

/// Runs `f` as if the process had one core (the first it may use), then lets every
/// thread of the process run on all of them again: fjall, opened inside, starts one
/// worker thread (it starts one per core it may use, up to four), which then still runs
/// alongside the others.
fn as_if_on_one_core<T>(f: impl FnOnce() -> T) -> T {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: the sets are plain bitmasks owned by this frame; 0 names this thread.
    let all = unsafe {
        let mut all: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(libc::sched_getaffinity(0, size, &mut all), 0);
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &all))
            .unwrap();
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(first, &mut one);
        assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
        all
    };
    let result = f();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let tid: libc::pid_t = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        // SAFETY: as above; a thread that has ended meanwhile only makes this fail.
        unsafe { libc::sched_setaffinity(tid, size, &all) };
    }
    result
}

/// A memtable rebuilt from the journal at open is sealed and written out if it is over
/// the limit, without waiting for a write.
#[tokio::test]
async fn a_memtable_replayed_over_the_limit_is_written_out_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = try_open(dir.path(), with_memtable(64)).unwrap();
    append_three_mib(&store).await;
    assert_eq!(store.tables.mailbox.table_count(), 0);
    store.close().await;
    drop(store);
    let store = try_open(dir.path(), with_memtable(1)).unwrap();
    assert!(
        a_mailbox_table_within(&store, Duration::from_secs(10)).await,
        "the replayed memtable stayed in memory"
    );
}

/// Appends from `from` until `stop`, each awaited before the next, so commits follow
/// each other as closely as one sender can make them.
async fn append_until(store: Arc<EmbeddedStore>, from: &'static str, stop: Arc<AtomicBool>) {
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let msg = new(from, "bob", &format!("c{i}"), &"x".repeat(100));
        store.append(msg).await.unwrap();
        i += 1;
    }
}

const SMALL_MEMTABLE: u64 = 64 * 1024;

/// The tests that hold a compaction share [`expiry::hold`]; they take turns.
static HOLDING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A store with small memtables, the dedup window whose compactions a test can hold, and
/// one fjall worker thread, as on one core (the benchmarks): the case in which fjall's
/// own rotation hung.
fn open_small(dir: &Path) -> Arc<EmbeddedStore> {
    let options = StoreOptions {
        dedup_window: expiry::hold::WINDOW,
        ..with_memtable_bytes(SMALL_MEMTABLE)
    };
    Arc::new(as_if_on_one_core(|| try_open(dir, options).unwrap()))
}

/// Lets a held compaction go when dropped, a failed assertion included.
struct Held;

impl Drop for Held {
    fn drop(&mut self) {
        expiry::hold::HOLD.store(false, Ordering::SeqCst);
    }
}

/// Holds fjall's next compaction of the dedup table, as a long compaction under load
/// holds fjall's worker, and returns once it is held.
async fn hold_a_compaction(store: &EmbeddedStore) -> Held {
    use expiry::hold::{HELD, HOLD};
    HOLD.store(true, Ordering::SeqCst);
    let held = Held;
    // Overlapping tables at level 0 of the dedup table start its compaction, once there
    // are four. Eight records (two senders, far apart) are enough for the spill thread to
    // write one table; each is written out before the next, so no memtable is waiting
    // when the compaction begins; another is written only if none has begun within 2 s
    // (writing one while a compaction is held would wait for it).
    for table in 0.. {
        assert!(table < 20, "no dedup compaction started");
        for i in 0..4 {
            for from in ["a", "z"] {
                store
                    .append(new(from, "bob", &format!("c{table}-{i}"), "x"))
                    .await
                    .unwrap();
            }
        }
        let dedup = store.tables.dedup.clone();
        tokio::task::spawn_blocking(move || dedup.rotate_memtable_and_wait())
            .await
            .unwrap()
            .unwrap();
        for _ in 0..200 {
            if HELD.load(Ordering::SeqCst) {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    unreachable!()
}

/// Four senders committing until stopped.
struct Senders {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Senders {
    fn start(store: &Arc<EmbeddedStore>) -> Senders {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = ["s1", "s2", "s3", "s4"]
            .map(|from| tokio::spawn(append_until(store.clone(), from, stop.clone())))
            .into();
        Senders { stop, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

/// The largest size the mailbox's active memtable is seen at, sampled every 5 ms until
/// `done` says so (given that size) or `at_most` has gone by.
async fn largest_memtable(store: &EmbeddedStore, at_most: Duration, done: impl Fn(u64) -> bool) -> u64 {
    let until = std::time::Instant::now() + at_most;
    let mut largest = 0;
    while !done(largest) && std::time::Instant::now() < until {
        largest = largest.max(store.tables.mailbox.tree.active_memtable().size());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    largest
}

/// `Tables::all` is the list the writer seals memtables from; a keyspace missing from it
/// would never be written out in a format-3 store.
#[tokio::test]
async fn every_keyspace_is_among_those_whose_memtables_are_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    let sealed: Vec<_> = store.tables.all().iter().map(|k| k.name().clone()).collect();
    let mut all = store.tables.db.list_keyspace_names();
    all.sort();
    let mut listed = sealed.clone();
    listed.sort();
    listed.dedup();
    assert_eq!(listed.len(), sealed.len(), "a keyspace listed twice");
    assert_eq!(listed, all);
}

#[tokio::test]
async fn engine_stats_name_every_keyspace_and_follow_its_memtable_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let store = try_open(dir.path(), with_memtable(1)).unwrap();
    let mut names: Vec<_> = store.engine_stats().keyspaces.into_iter().map(|k| k.name).collect();
    names.sort();
    let mut all: Vec<_> = store
        .tables
        .db
        .list_keyspace_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    all.sort();
    assert_eq!(names, all);
    let before = store.engine_stats();
    let mailbox = |stats: &crate::EngineStats| stats.keyspaces.iter().find(|k| k.name == schema::MAILBOX).cloned();
    assert_eq!(mailbox(&before).unwrap().tables, 0, "{before:?}");
    append_three_mib(&store).await;
    assert!(a_mailbox_table_within(&store, Duration::from_secs(3)).await);
    let after = store.engine_stats();
    let written = mailbox(&after).unwrap();
    assert!(written.tables >= 1 && written.disk_bytes > 0, "{written:?}");
    assert!(written.memtable_bytes < 1024 * 1024, "{written:?}");
    // Idempotency records reach fjall as whole tables, never through its memtable.
    store.settle().await;
    let settled = store.engine_stats();
    let dedup = settled.keyspaces.iter().find(|k| k.name == schema::DEDUP).unwrap();
    assert!(dedup.tables >= 1 && dedup.memtable_bytes == 0, "{dedup:?}");
    assert!(after.journals >= 1, "{after:?}");
    assert_eq!(after.writer_queue, 0, "every append was answered");
}

/// A keyspace's compaction shape (level-0 threshold, table size, level ratios) as fjall
/// keeps it in the keyspace's configuration.
fn compaction_shape(keyspace: &fjall::Keyspace) -> (u8, u64, Vec<f32>) {
    let config: HashMap<String, Vec<u8>> = keyspace
        .config
        .compaction_strategy
        .get_config()
        .into_iter()
        .map(|(k, v)| (String::from_utf8(k.to_vec()).unwrap(), v.to_vec()))
        .collect();
    let ratios = &config["leveled_level_ratio_policy"];
    let ratios = ratios[1..]
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let target = u64::from_le_bytes(config["leveled_target_size"][..].try_into().unwrap());
    (config["leveled_l0_threshold"][0], target, ratios)
}

#[tokio::test]
async fn idempotency_records_are_compacted_in_small_levels_that_grow_by_four() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    let dedup_shape = (4, 8 * 1024 * 1024, vec![4.0]);
    assert_eq!(compaction_shape(&store.tables.dedup), dedup_shape);
    // The other keyspaces keep fjall's default.
    assert_eq!(
        compaction_shape(&store.tables.mailbox),
        (4, 64 * 1024 * 1024, vec![10.0])
    );
    store.close().await;
    drop(store);
    let (store, _) = reopen(dir.path()).await;
    assert_eq!(
        compaction_shape(&store.tables.dedup),
        dedup_shape,
        "kept across a restart"
    );
}

/// Seals the mailbox's memtable and waits until it is written out; panics if that takes
/// longer than 15 s (on a thread of its own, which a hung fjall would never let finish).
fn written_out_soon(store: &EmbeddedStore) {
    let mailbox = store.tables.mailbox.clone();
    let (done, written) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(mailbox.rotate_memtable_and_wait()));
    let result = written.recv_timeout(Duration::from_secs(15));
    result.expect("no memtable written out in 15 s").unwrap();
}

/// fjall 3.1's own memtable rotation could leave its only worker thread waiting on
/// itself after a long compaction under steady commits, after which nothing was written
/// out again (see `Tables::seal_full`). Here a compaction of the dedup table is held
/// while commits go on until the mailbox memtable has stretched past six times its limit
/// (without the fix, enough commits to fill fjall's queue), then let go: memtables must
/// be sealed and written out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memtables_are_still_written_out_after_a_long_compaction_under_load() {
    let _turn = HOLDING.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_small(dir.path());
    let held = hold_a_compaction(&store).await;
    let senders = Senders::start(&store);
    let largest = largest_memtable(&store, Duration::from_secs(30), |l| l > 6 * SMALL_MEMTABLE).await;
    let engine = store.engine_stats();
    drop(held);
    tokio::time::sleep(Duration::from_secs(2)).await;
    senders.stop().await;
    assert!(
        largest > 6 * SMALL_MEMTABLE,
        "the memtable never stretched: {largest} bytes"
    );
    // What the metrics showed while the compaction was held.
    assert!(engine.compactions_running >= 1, "{engine:?}");
    let mailbox = engine.keyspaces.iter().find(|k| k.name == schema::MAILBOX).unwrap();
    assert!(mailbox.sealed_memtables >= 1, "{mailbox:?}");
    let active = store.tables.mailbox.tree.active_memtable().size();
    assert!(
        active < 8 * SMALL_MEMTABLE,
        "the mailbox memtable grew to {active} bytes"
    );
    written_out_soon(&store);
}

/// A store created before the store sealed its own memtables (format 2) still has fjall's
/// trigger at its creation size, which an oversized memtable would set off on every
/// commit: its memtables never stretch, even while the worker is held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memtables_of_a_store_from_before_its_own_rotation_never_stretch() {
    let _turn = HOLDING.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = open_small(dir.path());
    // As an older build left it. (Its keyspaces keep fjall's trigger off: this checks
    // the store's own rule only.)
    let meta = &store.tables.meta;
    meta.insert(schema::FORMAT, schema::encode_u64(schema::FORMAT_FJALL_ROTATION))
        .unwrap();
    store.close().await;
    drop(store);
    let store = open_small(dir.path());
    let held = hold_a_compaction(&store).await;
    let senders = Senders::start(&store);
    // Under the stretch rule a second sealed memtable could not exist before the first
    // stretched to 8 times the limit.
    let mailbox = &store.tables.mailbox;
    let largest = largest_memtable(&store, Duration::from_secs(20), |_| {
        mailbox.sealed_memtable_count() >= 2
    })
    .await;
    let sealed = mailbox.sealed_memtable_count();
    drop(held);
    senders.stop().await;
    assert!(sealed >= 2, "only {sealed} memtable sealed in 20 s");
    assert!(
        largest < 2 * SMALL_MEMTABLE,
        "the memtable stretched to {largest} bytes"
    );
}

#[tokio::test]
async fn retries_are_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = open(dir.path(), 100);
    let first = store.append(new("alice", "bob", "same", "hello")).await.unwrap();
    let again = store.append(new("alice", "bob", "same", "hello")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!((again.id, again.at_ms), (first.id.clone(), first.at_ms));
    assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap().len(), 1);
    assert_eq!(recorder.seqs(), vec![first.id.seq]);
    // The same client id from another sender is a different message.
    let other = store.append(new("dave", "bob", "same", "hi")).await.unwrap();
    assert!(!other.duplicate);
    // Still a duplicate after the original was acknowledged.
    store.ack(user("bob"), vec![first.id.seq]).await.unwrap();
    assert!(
        store
            .append(new("alice", "bob", "same", "hello"))
            .await
            .unwrap()
            .duplicate
    );
}

#[tokio::test]
async fn concurrent_retries_in_one_batch_store_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.append(new("alice", "bob", "x", "t")).await.unwrap() })
        })
        .collect();
    let mut fresh = 0;
    for t in tasks {
        if !t.await.unwrap().duplicate {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1);
    assert_eq!(store.scan(user("bob"), 0, 100).await.unwrap().len(), 1);
}

#[tokio::test]
async fn full_mailbox_refuses_then_accepts_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 2);
    store.append(new("a", "bob", "1", "x")).await.unwrap();
    let second = store.append(new("a", "bob", "2", "x")).await.unwrap();
    let err = store.append(new("a", "bob", "3", "x")).await.unwrap_err();
    assert_eq!(
        err,
        StoreError::MailboxFull {
            user: user("bob"),
            limit: 2
        }
    );
    // A refused message is not remembered as sent: the retry can succeed later.
    store.ack(user("bob"), vec![second.id.seq]).await.unwrap();
    assert!(!store.append(new("a", "bob", "3", "x")).await.unwrap().duplicate);
}

#[tokio::test]
async fn commits_reach_the_listener_in_seq_order_with_coordinates() {
    let dir = tempfile::tempdir().unwrap();
    let (store, recorder) = open(dir.path(), 10_000);
    let store = Arc::new(store);
    store.add_coordinate(user("bob"), coordinate(1, 1)).await.unwrap();
    store.add_coordinate(user("bob"), coordinate(1, 2)).await.unwrap();
    assert_eq!(store.coordinates(&user("bob")).len(), 2);
    assert_eq!(store.stats().coordinates, 2);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.append(new("alice", "bob", &format!("c{i}"), "t")).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seen = recorder.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 200);
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "listener saw seqs out of order"
    );
    assert!(seen.iter().all(|(_, online)| *online == 2));
    store.remove_coordinate(user("bob"), coordinate(1, 1)).await.unwrap();
    assert_eq!(store.coordinates(&user("bob")), vec![coordinate(1, 2)]);
}

#[tokio::test]
async fn reopening_keeps_messages_and_drops_old_coordinates() {
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let (store, _) = open(dir.path(), 100);
        assert_eq!(store.incarnation(), 1);
        store.add_coordinate(user("bob"), coordinate(1, 1)).await.unwrap();
        let last = store.append(new("alice", "carol", "c1", "kept")).await.unwrap();
        // Not closed: as after a crash, only what was committed counts.
        drop(store);
        last
    };
    // The writer thread may still hold the file for a moment after the drop.
    let (store, _) = reopen(dir.path()).await;
    assert_eq!(store.incarnation(), 2);
    assert!(store.coordinates(&user("bob")).is_empty());
    assert_eq!(
        store.stats(),
        StoreStats {
            mailbox_depth: 1,
            coordinates: 0,
            replicated_in: 0,
            online_users: Default::default(),
        }
    );
    let page = store.scan(user("carol"), 0, 10).await.unwrap();
    assert_eq!(page[0].text, "kept");
    let next = store.append(new("alice", "carol", "c2", "new")).await.unwrap();
    assert!(next.id.seq > last.id.seq, "seqs must never be reused");
    assert!(
        store
            .append(new("alice", "carol", "c1", "kept"))
            .await
            .unwrap()
            .duplicate
    );
}

async fn reopen(dir: &Path) -> (EmbeddedStore, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let open = || EmbeddedStore::open(dir, options(100), recorder.clone(), Box::new(|_| {}));
    let store = open_when_free(open).await.unwrap_or_else(|e| panic!("{e}"));
    (store, recorder)
}

/// Opens as soon as a store dropped a moment ago has let go of its locks (its threads
/// end shortly after the drop); any other outcome is returned.
pub(crate) async fn open_when_free(
    open: impl Fn() -> Result<EmbeddedStore, OpenError>,
) -> Result<EmbeddedStore, OpenError> {
    for _ in 0..100 {
        match open() {
            Err(OpenError::Locked { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
            other => return other,
        }
    }
    panic!("store stayed locked")
}

#[tokio::test]
async fn a_second_open_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, _) = open(dir.path(), 100);
    let err = try_open(dir.path(), options(100)).err().expect("second open must fail");
    assert!(matches!(err, OpenError::Locked { .. }), "{err}");
}

/// A data directory holding an empty store, closed so that a test can damage or rewrite
/// it before opening it again.
async fn created_and_closed() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    store.close().await;
    drop(store);
    dir
}

#[tokio::test]
async fn a_damaged_version_file_is_reported_as_corrupt() {
    let dir = created_and_closed().await;
    std::fs::write(dir.path().join(STORE_DIR).join("version"), b"garbage!").unwrap();
    let err = try_open(dir.path(), options(100))
        .err()
        .expect("a damaged store must not open");
    assert!(matches!(err, OpenError::Corrupt { .. }), "{err}");
}

#[tokio::test]
async fn closed_store_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    store.close().await;
    assert_eq!(store.append(new("a", "b", "c", "t")).await, Err(StoreError::Closed));
}

#[tokio::test]
async fn dedup_entries_expire_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = try_open(dir.path(), options_with_window(100, Duration::from_secs(60))).unwrap();
    // Stamped at 1 s after the epoch: far outside the window of a retry sent now. Its
    // record is still in the table (nothing has been compacted), but it is not a match.
    let old = NewMessage {
        at_ms: 1_000,
        seq: None,
        ..new("alice", "bob", "old", "x")
    };
    let first = store.append(old).await.unwrap();
    store.ack(user("bob"), vec![first.id.seq]).await.unwrap();
    let again = store.append(new("alice", "bob", "old", "x")).await.unwrap();
    assert!(!again.duplicate, "an expired idempotency key is a new message");
    // A recent one is still remembered.
    let recent = new("alice", "bob", "recent", "x");
    store.append(recent.clone()).await.unwrap();
    assert!(store.append(recent).await.unwrap().duplicate);
}

#[tokio::test]
async fn compaction_drops_expired_dedup_entries_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = try_open(dir.path(), options_with_window(1_000, Duration::from_secs(60))).unwrap();
    let (old, recent) = (user("old"), user("recent"));
    for i in 0..200 {
        let expired = NewMessage {
            at_ms: 1_000,
            seq: None,
            ..new("old", "bob", &format!("c{i}"), "x")
        };
        store.append(expired).await.unwrap();
        store.append(new("recent", "bob", &format!("c{i}"), "x")).await.unwrap();
    }
    // All of them in fjall: the last few are still held in memory until a checkpoint.
    store.close().await;
    drop(store);
    let store = try_open(dir.path(), options_with_window(1_000, Duration::from_secs(60))).unwrap();
    let dedup = &store.tables.dedup;
    let count = |sender: &UserId| dedup.prefix(schema::user_prefix(sender, 0)).count();
    // Written in many small tables, some compacted (and the expired dropped) already.
    assert_eq!(count(&recent), 200);
    dedup.major_compact().unwrap();
    assert_eq!((count(&old), count(&recent)), (0, 200));
    // What compaction kept still answers retries, after a restart too.
    store.close().await;
    drop(store);
    let store = try_open(dir.path(), options_with_window(1_000, Duration::from_secs(60))).unwrap();
    assert!(store.append(new("recent", "bob", "c7", "x")).await.unwrap().duplicate);
}

/// Idempotency records are held in memory, then written to fjall in bulk by another
/// thread, and checkpoints empty the journal that also has them: a retry must be
/// recognised, with the first attempt's id, wherever its record is at the time, and after
/// a crash.
#[tokio::test]
async fn retries_are_recognised_wherever_their_records_are() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 1_000);
    let mut first = Vec::new();
    // 40 records: several bulk writes of 8, and checkpoints every few messages (8 KiB),
    // the store settled now and then.
    let text = "x".repeat(500);
    for chunk in [0..1, 1..8, 8..15, 15..22, 22..29, 29..36, 36..40] {
        first.extend(alice_to_bob(&store, chunk, &text).await);
        store.settle().await;
    }
    let in_fjall = store
        .tables
        .dedup
        .prefix(schema::user_prefix(&user("alice"), 0))
        .count();
    assert!(in_fjall >= 8, "{in_fjall} records written to fjall");
    retries_recognised(&store, &first).await;
    store.settle().await;
    recognised_after_a_crash(dir.path(), &first).await;
}

/// A checkpoint does not wait for idempotency records to reach fjall: it carries them
/// into the emptied journal, where a crash right after it finds them.
#[tokio::test]
async fn records_a_checkpoint_carries_are_recognised_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 1_000);
    // Six held messages, their recipient and its depth reach the checkpoint limit of 8;
    // six records stay below the 8 that are written out at once.
    let first = alice_to_bob(&store, 0..6, "x").await;
    // The checkpoint follows the answer to the last append.
    store.settle().await;
    assert_eq!(
        store.tables.mailbox.iter().count(),
        6,
        "no checkpoint wrote the messages"
    );
    assert_eq!(store.tables.dedup.iter().count(), 0, "records were written to fjall");
    recognised_after_a_crash(dir.path(), &first).await;
}

/// On a crash copy of the settled store in `dir`: bob's mailbox holds exactly alice's
/// messages `first`, and each retry of them is recognised.
async fn recognised_after_a_crash(dir: &Path, first: &[chinwag_core::MessageId]) {
    let copy = crash_copy(dir);
    let (reopened, _) = open(copy.path(), 1_000);
    retries_recognised(&reopened, first).await;
    assert_eq!(reopened.scan(user("bob"), 0, 100).await.unwrap().len(), first.len());
}

/// When the spill thread falls behind (here it is stalled), a checkpoint waits for it
/// rather than carry ever more records into each new journal, until the carried records
/// alone would fill it and sends were refused.
#[tokio::test]
async fn a_checkpoint_waits_for_a_spill_thread_that_fell_behind() {
    use crate::deferred::hold;
    let dir = tempfile::tempdir().unwrap();
    let memory = StoreMemory {
        checkpoint_bytes: hold::CAPACITY as u64 * 1024,
        ..SMALL_CHECKPOINTS
    };
    let store = try_open(
        dir.path(),
        StoreOptions {
            memory,
            ..options(100_000)
        },
    )
    .unwrap();
    hold::HOLD.store(true, Ordering::SeqCst);
    let release = tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        hold::HOLD.store(false, Ordering::SeqCst);
    });
    // About 45 bytes each, 1,500 records are twice what the journal holds (36 KiB).
    let first = alice_to_bob(&store, 0..1_500, "x").await;
    release.await.unwrap();
    assert_eq!(store.scan(user("bob"), 0, 2_000).await.unwrap().len(), first.len());
}

/// Appends alice's messages `c{i}` to bob, `i` in `range`; returns their ids.
async fn alice_to_bob(
    store: &EmbeddedStore,
    range: std::ops::Range<usize>,
    text: &str,
) -> Vec<chinwag_core::MessageId> {
    let mut ids = Vec::new();
    for i in range {
        ids.push(
            store
                .append(new("alice", "bob", &format!("c{i}"), text))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

/// Retries alice's messages `c0`, `c1`, … to bob, which were first stored as `first`.
async fn retries_recognised(store: &EmbeddedStore, first: &[chinwag_core::MessageId]) {
    for (i, id) in first.iter().enumerate() {
        let again = store
            .append(new("alice", "bob", &format!("c{i}"), "again"))
            .await
            .unwrap();
        assert!(again.duplicate, "c{i} stored twice");
        assert_eq!(&again.id, id, "c{i}");
    }
}

/// Damage to the journal: the store must either refuse to open with a clear error or
/// open with every acknowledged message; it must never panic or silently lose data.
#[tokio::test]
async fn damaged_journals_are_reported_or_fully_recovered() {
    for (name, damage) in [("truncated", Damage::Truncate), ("overwritten", Damage::Garbage)] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path(), 100_000);
            for i in 0..500 {
                store
                    .append(new("alice", "bob", &format!("c{i}"), &"x".repeat(200)))
                    .await
                    .unwrap();
            }
            store.close().await;
        }
        let journal = std::fs::read_dir(dir.path().join(STORE_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "jnl"))
            .expect("a journal file");
        damage.apply(&journal);
        let result = try_open(dir.path(), options(100_000));
        match result {
            Err(OpenError::Corrupt { .. }) => {}
            Err(e) => panic!("{name}: expected a corruption report, got {e}"),
            Ok(store) => {
                let page = store.scan(user("bob"), 0, 1000).await.unwrap();
                assert_eq!(page.len(), 500, "{name}: damage silently lost messages");
            }
        }
    }
}

#[tokio::test]
async fn damaged_table_files_are_reported_never_silently_lost() {
    for (name, damage) in [("truncated", Damage::Truncate), ("overwritten", Damage::Garbage)] {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = open(dir.path(), 100_000);
            for i in 0..500 {
                store
                    .append(new("alice", "bob", &format!("c{i}"), &"x".repeat(200)))
                    .await
                    .unwrap();
            }
            // Move the mailbox from the journal into a table file, which is what gets damaged.
            store.tables.mailbox.rotate_memtable_and_wait().unwrap();
            store.close().await;
        }
        let tables: Vec<PathBuf> = walk(&dir.path().join(STORE_DIR))
            .into_iter()
            .filter(|p| p.components().any(|c| c.as_os_str() == "tables"))
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 40_000))
            .collect();
        assert!(!tables.is_empty(), "no table file big enough to damage");
        for table in &tables {
            damage.apply(table);
        }
        match try_open(dir.path(), options(100_000)) {
            Err(OpenError::Corrupt { detail, .. }) => println!("{name}: refused to open: {detail}"),
            Err(e) => panic!("{name}: expected a corruption report, got {e}"),
            // Opening may succeed if the damage is only found on reading: then reading
            // must fail loudly, or return everything.
            Ok(store) => match store.scan(user("bob"), 0, 1000).await {
                Err(e) => println!("{name}: opened, reading fails: {e}"),
                Ok(page) => assert_eq!(page.len(), 500, "{name}: damage silently lost messages"),
            },
        }
    }
}

/// A copy of the store as a crash would leave it now: every file as the kernel holds it,
/// nothing of what the process has not written yet. The store must be settled
/// (`EmbeddedStore::settle`). fjall's background work (a compaction the last write set
/// off) may still create, rename and delete files meanwhile, and a copy that straddles
/// such a change is no state a crash could leave, so a copy during which the files
/// changed is taken again.
pub(crate) fn crash_copy(dir: &Path) -> tempfile::TempDir {
    for _ in 0..100 {
        let files = walk(dir);
        let copy = tempfile::tempdir().unwrap();
        let whole = files.iter().all(|file| {
            let to = copy.path().join(file.strip_prefix(dir).unwrap());
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            match std::fs::copy(file, &to) {
                Ok(_) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => panic!("copying {}: {e}", file.display()),
            }
        });
        if whole && walk(dir) == files {
            return copy;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the files of {} kept changing for a second", dir.display());
}

/// Appends five messages to bob (fewer than a checkpoint takes in tests, so all are held
/// in memory and in the journal only) and acknowledges the first; returns a crash copy.
async fn crashed_with_held_messages() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    for i in 0..5 {
        store
            .append(new("alice", "bob", &format!("c{i}"), &format!("m{i}")))
            .await
            .unwrap();
    }
    let first = store.scan(user("bob"), 0, 1).await.unwrap()[0].seq;
    store.ack(user("bob"), vec![first]).await.unwrap();
    assert_eq!(store.tables.mailbox.iter().count(), 0, "the messages reached fjall");
    // Idle already: six held messages and recipients, and a journal of about 1 KiB, call
    // for no checkpoint. (Settling would add a record of its own, which is not what the
    // cuts below must hit.)
    crash_copy(dir.path())
}

/// A commit that holds its messages in memory changes nothing in fjall, not even the
/// counters, unless fjall is due a sync (see `Writer::write_counters`): the journal alone
/// keeps them, so a crash must find them there and never hand out a seq twice, before a
/// checkpoint or after one.
#[tokio::test]
async fn counters_of_commits_that_leave_fjall_alone_come_back_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let opened = std::time::Instant::now();
    let (store, _) = open(dir.path(), 100);
    let meta = |store: &EmbeddedStore| {
        let get = |key| store.tables.meta.get(key).unwrap().map(|v| v.to_vec());
        (get(schema::NEXT_SEQ), get(schema::COMMITS))
    };
    let before = meta(&store);
    let seqs = append_to_bob(&store, 0..5).await;
    if opened.elapsed() < writer::FJALL_SYNC_EVERY {
        assert_eq!(meta(&store), before, "fjall's counters are untouched");
    }
    let copy = crash_copy(dir.path());
    let (after, _) = open(copy.path(), 100);
    seqs_continue(&after, &seqs, 5).await;
    // Past a few checkpoints (every 8 held messages, recipients and depths here), then a crash
    // before the next.
    let mut seqs = append_to_bob(&store, 5..25).await;
    store.settle().await;
    seqs.extend(append_to_bob(&store, 25..28).await);
    let copy = crash_copy(dir.path());
    let (after, _) = open(copy.path(), 100);
    seqs_continue(&after, &seqs, 28).await;
    // A clean close ends with a checkpoint and leaves the journal empty: fjall alone.
    store.close().await;
    drop(store);
    let (reopened, _) = reopen(dir.path()).await;
    seqs_continue(&reopened, &seqs, 28).await;
}

/// Messages from alice to bob with client ids `c{i}`; returns their seqs.
async fn append_to_bob(store: &EmbeddedStore, ids: std::ops::Range<usize>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in ids {
        let receipt = store.append(new("alice", "bob", &format!("c{i}"), "m")).await.unwrap();
        seqs.push(receipt.id.seq);
    }
    seqs
}

/// A new message to bob gets a seq above all of `seqs`, and his mailbox holds
/// `held` messages before it, each in its own place.
async fn seqs_continue(store: &EmbeddedStore, seqs: &[u64], held: usize) {
    let next = store.append(new("alice", "bob", "next", "m")).await.unwrap();
    assert!(
        seqs.iter().all(|&seq| seq < next.id.seq),
        "{seqs:?} then {}",
        next.id.seq
    );
    let mailbox: Vec<u64> = (store.scan(user("bob"), 0, 100).await.unwrap().iter())
        .map(|m| m.seq)
        .collect();
    assert_eq!(mailbox.len(), held + 1, "{mailbox:?}");
}

#[tokio::test]
async fn after_a_crash_the_journal_brings_back_messages_held_in_memory() {
    let copy = crashed_with_held_messages().await;
    let (store, _) = open(copy.path(), 100);
    let texts: Vec<String> = (store.scan(user("bob"), 0, 10).await.unwrap().iter())
        .map(|m| m.text.clone())
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4"]);
    assert_eq!(store.mailbox_depth(), 4);
    let journal = copy.path().join(STORE_DIR).join(journal::FILE);
    assert_eq!(std::fs::metadata(journal).unwrap().len(), 0, "replayed, so emptied");
    assert!(
        store
            .append(new("alice", "bob", "c4", "again"))
            .await
            .unwrap()
            .duplicate
    );
}

#[tokio::test]
async fn a_store_journal_cut_short_or_damaged_is_reported_never_silently_lost() {
    use std::os::unix::fs::FileExt;
    type Cut = fn(&std::fs::File);
    let cuts: [(&str, Cut); 3] = [
        ("last record cut", |f| {
            f.set_len(f.metadata().unwrap().len() - 3).unwrap()
        }),
        ("emptied", |f| f.set_len(0).unwrap()),
        ("first record damaged", |f| f.write_all_at(b"?", 20).unwrap()),
    ];
    for (name, cut) in cuts {
        let copy = crashed_with_held_messages().await;
        let path = copy.path().join(STORE_DIR).join(journal::FILE);
        cut(&std::fs::OpenOptions::new().write(true).open(&path).unwrap());
        match try_open(copy.path(), options(100)) {
            Err(OpenError::Corrupt { .. }) => {}
            Err(e) => panic!("{name}: expected a corruption report, got {e}"),
            Ok(_) => panic!("{name}: opened without the acknowledged messages"),
        }
    }
}

/// A checkpoint that cannot put a new journal in place (here `journal.next` is a
/// directory, so the file cannot be created) fails as a whole: the journal keeps every
/// commit, and once it reaches its limit commits are refused with a clear error rather
/// than let it grow without bound. Once the obstacle is gone a checkpoint succeeds and
/// sends are taken again; no acknowledged message is lost, before or after a crash.
#[tokio::test]
async fn a_checkpoint_that_cannot_replace_the_journal_fails_safely() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100_000);
    let obstacle = dir.path().join(STORE_DIR).join(journal::NEXT);
    std::fs::create_dir(&obstacle).unwrap();
    let text = "x".repeat(200);
    let mut acknowledged = 0;
    let refusal = loop {
        assert!(acknowledged < 2_000, "the journal grew without bound");
        match store
            .append(new("alice", "bob", &format!("c{acknowledged}"), &text))
            .await
        {
            Ok(_) => acknowledged += 1,
            Err(e) => break e,
        }
    };
    assert!(refusal.to_string().contains("checkpoints fail"), "{refusal}");
    std::fs::remove_dir(&obstacle).unwrap();
    // A failed checkpoint is tried again a second later, at the next commit.
    let mut taken = false;
    for i in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if store
            .append(new("alice", "bob", &format!("after{i}"), "x"))
            .await
            .is_ok()
        {
            acknowledged += 1;
            taken = true;
            break;
        }
    }
    assert!(taken, "sends still refused 5 s after the obstacle was removed");
    assert_eq!(store.scan(user("bob"), 0, 10_000).await.unwrap().len(), acknowledged);
    store.settle().await;
    let copy = crash_copy(dir.path());
    let (reopened, _) = open(copy.path(), 100_000);
    assert_eq!(reopened.scan(user("bob"), 0, 10_000).await.unwrap().len(), acknowledged);
}

#[tokio::test]
async fn a_clean_close_leaves_the_journal_empty_and_the_messages_in_fjall() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    store.append(new("alice", "bob", "c1", "kept")).await.unwrap();
    store.close().await;
    let journal = dir.path().join(STORE_DIR).join(journal::FILE);
    assert_eq!(std::fs::metadata(journal).unwrap().len(), 0);
    assert_eq!(store.tables.mailbox.iter().count(), 1);
}

/// The files under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

enum Damage {
    Truncate,
    Garbage,
}

impl Damage {
    fn apply(&self, path: &Path) {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        match self {
            Damage::Truncate => file.set_len(40_000).unwrap(),
            Damage::Garbage => {
                file.seek(SeekFrom::Start(20_000)).unwrap();
                file.write_all(&[0xAB; 4096]).unwrap();
            }
        }
    }
}

#[tokio::test]
async fn appends_commit_in_call_order_not_poll_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 1_000);
    let pending: Vec<_> = (0..50)
        .map(|i| store.append(new("alice", "bob", &format!("c{i}"), "t")))
        .collect();
    let mut seqs = Vec::new();
    // Await the last call first.
    for fut in pending.into_iter().rev() {
        seqs.push(fut.await.unwrap().id.seq);
    }
    seqs.reverse();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

/// A store of the format before the journal opens, keeps its messages, and is marked
/// with the new format, so that an older build, which would not replay the journal,
/// refuses it from then on.
#[tokio::test]
async fn a_store_from_before_the_journal_is_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open(dir.path(), 100);
    store.append(new("alice", "bob", "c1", "kept")).await.unwrap();
    store
        .tables
        .meta
        .insert(schema::FORMAT, schema::encode_u64(schema::FORMAT_OWN_ROTATION))
        .unwrap();
    store.close().await;
    drop(store);
    let (store, _) = reopen(dir.path()).await;
    let format = store
        .tables
        .meta
        .get(schema::FORMAT)
        .unwrap()
        .and_then(|v| schema::decode_u64(&v));
    assert_eq!(format, Some(schema::FORMAT_VERSION));
    assert_eq!(store.scan(user("bob"), 0, 10).await.unwrap()[0].text, "kept");
}

#[tokio::test]
async fn a_store_of_an_unknown_format_is_refused() {
    let dir = created_and_closed().await;
    // As a newer version of chinwag would have left it.
    let db = fjall::Database::builder(dir.path().join(crate::STORE_DIR))
        .open()
        .unwrap();
    let meta = db
        .keyspace(schema::META, fjall::KeyspaceCreateOptions::default)
        .unwrap();
    meta.insert(schema::FORMAT, schema::encode_u64(schema::FORMAT_VERSION + 1))
        .unwrap();
    db.persist(fjall::PersistMode::SyncAll).unwrap();
    drop((meta, db));
    let err = try_open(dir.path(), options(2)).err().expect("must refuse");
    let found = schema::FORMAT_VERSION + 1;
    assert!(matches!(err, OpenError::Format { found: f, .. } if f == found), "{err}");
    assert!(err.to_string().contains("incompatible version"), "{err}");
}
