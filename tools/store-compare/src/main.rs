//! store-compare: measures redb, fjall and SQLite on chinwag's offline-mailbox
//! workload (durable appends, per-recipient range scans, acks/deletes, reopen,
//! disk size, and a steady-state append+delete mix).
//!
//! Run `store-compare --help` for the flags.

mod fjall_store;
mod redb_store;
mod sqlite_store;
mod store;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use store::{Msg, Result, Store, BODY_LEN, RECORD_LEN};

/// Page/block cache given to every engine, so none is starved or favoured.
pub const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// fjall per-keyspace memtable size; `None` keeps fjall's default (64 MiB).
pub static FJALL_MEMTABLE_BYTES: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

const BACKENDS: [&str; 3] = ["redb", "fjall", "sqlite"];

const HELP: &str = "\
store-compare: durable embedded-store benchmark for the offline-mailbox workload

USAGE: store-compare [FLAGS]

  --backends LIST       comma list of redb,fjall,sqlite          [redb,fjall,sqlite]
  --messages N          messages appended in phase 1             [200000]
  --senders N           distinct senders                          [1000]
  --recipients N        distinct recipients                       [1000]
  --batches LIST        messages per durable commit in phase 1    [1,16,256,1024]
                        (none = run only the mixed workload)
  --b1-cap N            message cap for the batch-size-1 run      [3000]
  --ack-batch N         deletes per durable commit in phase 3     [256]
  --mixed-backlog N     mailbox backlog before the mixed run      [20000]
  --mixed-rounds N      rounds of (append batch, delete batch)    [400]
  --mixed-batch N       messages per append / delete commit       [256]
  --no-mixed            skip the mixed run
  --dir PATH            parent for the per-run data directories   [/tmp/store-compare-<pid>]
  --keep                do not delete the data directories
  --csv PATH            append one CSV row per run to PATH
  --seed N              workload RNG seed                         [42]
  --repeat N            run every configuration N times (interleaved); report medians [1]
  --fjall-memtable-mib N  fjall max_memtable_size per keyspace    [fjall default, 64]
  --help                this text
";

#[derive(Clone)]
struct Args {
    backends: Vec<String>,
    messages: usize,
    senders: u32,
    recipients: u32,
    batches: Vec<usize>,
    b1_cap: usize,
    ack_batch: usize,
    mixed_backlog: usize,
    mixed_rounds: usize,
    mixed_batch: usize,
    mixed: bool,
    dir: PathBuf,
    dir_given: bool,
    keep: bool,
    csv: Option<PathBuf>,
    seed: u64,
    repeat: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        backends: BACKENDS.iter().map(|s| s.to_string()).collect(),
        messages: 200_000,
        senders: 1000,
        recipients: 1000,
        batches: vec![1, 16, 256, 1024],
        b1_cap: 3000,
        ack_batch: 256,
        mixed_backlog: 20_000,
        mixed_rounds: 400,
        mixed_batch: 256,
        mixed: true,
        dir: std::env::temp_dir().join(format!("store-compare-{}", std::process::id())),
        dir_given: false,
        keep: false,
        csv: None,
        seed: 42,
        repeat: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--backends" => {
                a.backends = val()?.split(',').map(|s| s.trim().to_string()).collect();
                for b in &a.backends {
                    if !BACKENDS.contains(&b.as_str()) {
                        return Err(format!("unknown backend {b}").into());
                    }
                }
            }
            "--messages" => a.messages = val()?.parse()?,
            "--senders" => a.senders = val()?.parse()?,
            "--recipients" => a.recipients = val()?.parse()?,
            "--batches" => {
                let v = val()?;
                a.batches = if v == "none" {
                    Vec::new()
                } else {
                    v.split(',')
                        .map(|s| s.trim().parse())
                        .collect::<std::result::Result<_, _>>()?
                };
            }
            "--b1-cap" => a.b1_cap = val()?.parse()?,
            "--ack-batch" => a.ack_batch = val()?.parse()?,
            "--mixed-backlog" => a.mixed_backlog = val()?.parse()?,
            "--mixed-rounds" => a.mixed_rounds = val()?.parse()?,
            "--mixed-batch" => a.mixed_batch = val()?.parse()?,
            "--no-mixed" => a.mixed = false,
            "--dir" => {
                a.dir = PathBuf::from(val()?);
                a.dir_given = true;
            }
            "--keep" => a.keep = true,
            "--csv" => a.csv = Some(PathBuf::from(val()?)),
            "--seed" => a.seed = val()?.parse()?,
            "--repeat" => a.repeat = val()?.parse()?,
            "--fjall-memtable-mib" => {
                let mib: u64 = val()?.parse()?;
                FJALL_MEMTABLE_BYTES
                    .set(Some(mib * 1024 * 1024))
                    .map_err(|_| "--fjall-memtable-mib given twice")?;
            }
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag {other}; see --help").into()),
        }
    }
    if a.batches.contains(&0) || a.ack_batch == 0 || a.mixed_batch == 0 {
        return Err("batch sizes must be positive".into());
    }
    if a.repeat == 0 {
        return Err("--repeat must be positive".into());
    }
    if a.senders == 0 || a.recipients == 0 {
        return Err("--senders and --recipients must be positive".into());
    }
    Ok(a)
}

// ---------------------------------------------------------------- workload

/// xorshift64*: small, deterministic, good enough for workload generation.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Builds `n` messages with sequence numbers `first_seq..`. Record layout
/// (RECORD_LEN = 200 bytes): sender u32 | client_id [16] | sent_at_ms u64 |
/// kind u16 | flags u16 | 68 bytes of header metadata | 100-byte body.
/// The body is random bytes, standing in for an end-to-end encrypted payload.
fn gen_messages(
    rng: &mut Rng,
    n: usize,
    first_seq: u64,
    senders: u32,
    recipients: u32,
) -> Vec<Msg> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let sender = rng.below(senders);
        let recipient = rng.below(recipients);
        let seq = first_seq + i as u64;
        let mut client_id = [0u8; 16];
        rng.fill(&mut client_id);
        let mut record = Vec::with_capacity(RECORD_LEN);
        record.extend_from_slice(&sender.to_be_bytes());
        record.extend_from_slice(&client_id);
        record.extend_from_slice(&(1_700_000_000_000u64 + seq * 7).to_be_bytes());
        record.extend_from_slice(&1u16.to_be_bytes());
        record.extend_from_slice(&0u16.to_be_bytes());
        let header_len = RECORD_LEN - BODY_LEN - record.len();
        // Header metadata: a mostly constant, compressible area (content type,
        // key id, ...) with a few varying bytes.
        let mut header = vec![b'h'; header_len];
        header[..8].copy_from_slice(&u64::from(recipient).to_be_bytes());
        record.extend_from_slice(&header);
        let mut body = [0u8; BODY_LEN];
        rng.fill(&mut body);
        record.extend_from_slice(&body);
        debug_assert_eq!(record.len(), RECORD_LEN);
        out.push(Msg {
            sender,
            recipient,
            seq,
            client_id,
            record,
        });
    }
    out
}

// ---------------------------------------------------------------- measurement helpers

#[derive(Default, Clone, Copy, Debug)]
struct Lat {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn latency(samples: &mut [Duration]) -> Lat {
    if samples.is_empty() {
        return Lat::default();
    }
    samples.sort_unstable();
    // Nearest-rank percentile.
    let pick = |p: f64| {
        let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
        samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1e3
    };
    Lat {
        p50_ms: pick(50.0),
        p99_ms: pick(99.0),
        max_ms: samples[samples.len() - 1].as_secs_f64() * 1e3,
    }
}

/// (apparent bytes, allocated bytes) of everything under `dir`.
fn dir_size(dir: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let md = entry.metadata()?;
            if md.is_dir() {
                stack.push(entry.path());
            } else {
                apparent += md.len();
                allocated += md.blocks() * 512;
            }
        }
    }
    Ok((apparent, allocated))
}

/// Bytes this process (all threads, including engine background workers) caused
/// to be written to the storage layer, from /proc/self/io `write_bytes`.
/// Returns 0 where that file is unavailable.
fn io_write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| {
                    l.strip_prefix("write_bytes:")
                        .map(|v| v.trim().parse().ok())
                })
                .flatten()
        })
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Baseline for the storage stack: latency of appending 4 KiB to a file and
/// calling fsync (`File::sync_all`), which bounds what any durable commit costs.
fn fsync_probe(dir: &Path, rounds: usize) -> Result<Lat> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let buf = [0x5au8; 4096];
    let mut lats = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_all()?;
        lats.push(t.elapsed());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(latency(&mut lats))
}

// ---------------------------------------------------------------- phases

#[derive(Default, Debug)]
struct PipelineResult {
    backend: String,
    batch: usize,
    messages: usize,
    append_secs: f64,
    append_lat: Lat,
    close_after_append_ms: f64,
    size_after_append: (u64, u64),
    append_write_bytes: u64,
    reopen_full_ms: f64,
    scan_secs: f64,
    scan_lat: Lat,
    ack_secs: f64,
    ack_lat: Lat,
    ack_write_bytes: u64,
    size_after_ack: (u64, u64),
    reopen_empty_ms: f64,
}

#[derive(Default, Debug)]
struct MixedResult {
    backend: String,
    rounds: usize,
    batch: usize,
    backlog: usize,
    secs: f64,
    append_lat: Lat,
    delete_lat: Lat,
    write_bytes: u64,
    /// Messages still queued after the run, and the time to scan them all.
    live_after: usize,
    scan_after_secs: f64,
    size_end: (u64, u64),
}

fn timed_open<S: Store>(dir: &Path) -> Result<(S, f64)> {
    let t = Instant::now();
    let s = S::open(dir)?;
    Ok((s, t.elapsed().as_secs_f64() * 1e3))
}

fn run_pipeline<S: Store>(
    name: &str,
    args: &Args,
    msgs: &[Msg],
    batch: usize,
    dir: &Path,
) -> Result<PipelineResult> {
    std::fs::create_dir_all(dir)?;
    let mut r = PipelineResult {
        backend: name.to_string(),
        batch,
        messages: msgs.len(),
        ..Default::default()
    };

    // Phase 1: append.
    let io0 = io_write_bytes();
    let mut store = S::open(dir)?;
    let mut lats = Vec::with_capacity(msgs.len() / batch + 1);
    let start = Instant::now();
    for chunk in msgs.chunks(batch) {
        let t = Instant::now();
        let n = store.append(chunk)?;
        lats.push(t.elapsed());
        if n != chunk.len() {
            return Err(format!("{name}: inserted {n} of {}", chunk.len()).into());
        }
    }
    r.append_secs = start.elapsed().as_secs_f64();
    r.append_lat = latency(&mut lats);
    let t = Instant::now();
    store.close()?;
    r.close_after_append_ms = t.elapsed().as_secs_f64() * 1e3;
    r.append_write_bytes = io_write_bytes() - io0;
    r.size_after_append = dir_size(dir)?;

    // Phase 4a: reopen with the full mailbox.
    let (mut store, ms) = timed_open::<S>(dir)?;
    r.reopen_full_ms = ms;

    // Expected contents, per recipient in seq order.
    let mut expected: Vec<Vec<u64>> = vec![Vec::new(); args.recipients as usize];
    for m in msgs {
        expected[m.recipient as usize].push(m.seq);
    }

    // Phase 2: scan every mailbox.
    let mut lats = Vec::with_capacity(expected.len());
    let mut seen = 0u64;
    let start = Instant::now();
    for (rcpt, want) in expected.iter().enumerate() {
        let t = Instant::now();
        let s = store.scan(rcpt as u32)?;
        lats.push(t.elapsed());
        if s.count != want.len() as u64 || s.depth != want.len() as u64 || !s.ordered {
            return Err(format!(
                "{name}: recipient {rcpt}: scanned {} (depth {}, ordered {}), expected {}",
                s.count,
                s.depth,
                s.ordered,
                want.len()
            )
            .into());
        }
        seen = seen.wrapping_add(s.checksum);
    }
    r.scan_secs = start.elapsed().as_secs_f64();
    r.scan_lat = latency(&mut lats);
    std::hint::black_box(seen);

    // Phase 3: ack (delete) everything, recipient by recipient, in commits of ack_batch.
    let keys: Vec<(u32, u64)> = expected
        .iter()
        .enumerate()
        .flat_map(|(rcpt, seqs)| seqs.iter().map(move |&s| (rcpt as u32, s)))
        .collect();
    let mut lats = Vec::with_capacity(keys.len() / args.ack_batch + 1);
    let io0 = io_write_bytes();
    let start = Instant::now();
    for chunk in keys.chunks(args.ack_batch) {
        let t = Instant::now();
        store.delete(chunk)?;
        lats.push(t.elapsed());
    }
    r.ack_secs = start.elapsed().as_secs_f64();
    r.ack_lat = latency(&mut lats);
    store.close()?;
    r.ack_write_bytes = io_write_bytes() - io0;
    r.size_after_ack = dir_size(dir)?;

    // Phase 4b: reopen the emptied store and check it is empty.
    let (mut store, ms) = timed_open::<S>(dir)?;
    r.reopen_empty_ms = ms;
    for rcpt in 0..args.recipients {
        let s = store.scan(rcpt)?;
        if s.count != 0 || s.depth != 0 {
            return Err(format!("{name}: recipient {rcpt} not empty after ack: {s:?}").into());
        }
    }
    store.close()?;
    Ok(r)
}

fn run_mixed<S: Store>(name: &str, args: &Args, dir: &Path) -> Result<MixedResult> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(args.seed ^ 0x6D_6978_6564);
    let total = args.mixed_backlog + args.mixed_rounds * args.mixed_batch;
    let msgs = gen_messages(&mut rng, total, 1, args.senders, args.recipients);
    let (backlog, live) = msgs.split_at(args.mixed_backlog);

    let mut store = S::open(dir)?;
    let mut queue: VecDeque<(u32, u64)> = VecDeque::with_capacity(total);
    // Untimed warm-up: build the steady-state backlog.
    for chunk in backlog.chunks(args.mixed_batch) {
        store.append(chunk)?;
        queue.extend(chunk.iter().map(|m| (m.recipient, m.seq)));
    }

    let mut alat = Vec::with_capacity(args.mixed_rounds);
    let mut dlat = Vec::with_capacity(args.mixed_rounds);
    let mut del: Vec<(u32, u64)> = Vec::with_capacity(args.mixed_batch);
    let io0 = io_write_bytes();
    let start = Instant::now();
    for chunk in live.chunks(args.mixed_batch) {
        let t = Instant::now();
        let n = store.append(chunk)?;
        alat.push(t.elapsed());
        if n != chunk.len() {
            return Err(format!("{name}: mixed append inserted {n} of {}", chunk.len()).into());
        }
        queue.extend(chunk.iter().map(|m| (m.recipient, m.seq)));

        // Ack the oldest messages (FIFO over the whole server).
        del.clear();
        for _ in 0..chunk.len() {
            del.push(queue.pop_front().expect("queue holds the backlog"));
        }
        let t = Instant::now();
        store.delete(&del)?;
        dlat.push(t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    let write_bytes = io_write_bytes() - io0;

    // Scan every mailbox after the churn (an LSM has to step over the delete
    // tombstones here) and check it equals the queue.
    let mut want = vec![0u64; args.recipients as usize];
    for &(rcpt, _) in &queue {
        want[rcpt as usize] += 1;
    }
    let scan_start = Instant::now();
    for rcpt in 0..args.recipients {
        let s = store.scan(rcpt)?;
        if s.count != want[rcpt as usize] || s.depth != s.count || !s.ordered {
            return Err(format!(
                "{name}: mixed: recipient {rcpt}: {s:?}, want {}",
                want[rcpt as usize]
            )
            .into());
        }
    }
    let scan_after_secs = scan_start.elapsed().as_secs_f64();
    store.close()?;
    Ok(MixedResult {
        backend: name.to_string(),
        rounds: alat.len(),
        batch: args.mixed_batch,
        backlog: args.mixed_backlog,
        secs,
        append_lat: latency(&mut alat),
        delete_lat: latency(&mut dlat),
        write_bytes,
        live_after: queue.len(),
        scan_after_secs,
        size_end: dir_size(dir)?,
    })
}

fn pipeline_for(
    name: &str,
    args: &Args,
    msgs: &[Msg],
    batch: usize,
    dir: &Path,
) -> Result<PipelineResult> {
    match name {
        "redb" => run_pipeline::<redb_store::RedbStore>(name, args, msgs, batch, dir),
        "fjall" => run_pipeline::<fjall_store::FjallStore>(name, args, msgs, batch, dir),
        "sqlite" => run_pipeline::<sqlite_store::SqliteStore>(name, args, msgs, batch, dir),
        _ => unreachable!(),
    }
}

fn mixed_for(name: &str, args: &Args, dir: &Path) -> Result<MixedResult> {
    match name {
        "redb" => run_mixed::<redb_store::RedbStore>(name, args, dir),
        "fjall" => run_mixed::<fjall_store::FjallStore>(name, args, dir),
        "sqlite" => run_mixed::<sqlite_store::SqliteStore>(name, args, dir),
        _ => unreachable!(),
    }
}

// ---------------------------------------------------------------- output

fn csv_header() -> &'static str {
    "kind,backend,batch,messages,secs,msgs_per_s,commit_p50_ms,commit_p99_ms,commit_max_ms,\
close_ms,size_after_append_bytes,alloc_after_append_bytes,reopen_full_ms,scan_msgs_per_s,\
scan_p50_ms,scan_p99_ms,ack_msgs_per_s,ack_p50_ms,ack_p99_ms,size_after_ack_bytes,\
alloc_after_ack_bytes,reopen_empty_ms,mixed_delete_p50_ms,mixed_delete_p99_ms,\
write_bytes_phase,write_bytes_ack"
}

fn csv_pipeline(r: &PipelineResult) -> String {
    format!(
        "append,{},{},{},{:.4},{:.1},{:.3},{:.3},{:.3},{:.2},{},{},{:.2},{:.1},{:.3},{:.3},{:.1},{:.3},{:.3},{},{},{:.2},,,{},{}",
        r.backend,
        r.batch,
        r.messages,
        r.append_secs,
        r.messages as f64 / r.append_secs,
        r.append_lat.p50_ms,
        r.append_lat.p99_ms,
        r.append_lat.max_ms,
        r.close_after_append_ms,
        r.size_after_append.0,
        r.size_after_append.1,
        r.reopen_full_ms,
        r.messages as f64 / r.scan_secs,
        r.scan_lat.p50_ms,
        r.scan_lat.p99_ms,
        r.messages as f64 / r.ack_secs,
        r.ack_lat.p50_ms,
        r.ack_lat.p99_ms,
        r.size_after_ack.0,
        r.size_after_ack.1,
        r.reopen_empty_ms,
        r.append_write_bytes,
        r.ack_write_bytes,
    )
}

fn csv_mixed(r: &MixedResult) -> String {
    let ops = r.rounds * r.batch * 2;
    format!(
        "mixed,{},{},{},{:.4},{:.1},{:.3},{:.3},{:.3},,{},{},,{:.1},,,,,,,,,{:.3},{:.3},{},",
        r.backend,
        r.batch,
        ops,
        r.secs,
        ops as f64 / r.secs,
        r.append_lat.p50_ms,
        r.append_lat.p99_ms,
        r.append_lat.max_ms,
        r.size_end.0,
        r.size_end.1,
        r.live_after as f64 / r.scan_after_secs,
        r.delete_lat.p50_ms,
        r.delete_lat.p99_ms,
        r.write_bytes,
    )
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("store-compare: error: {e}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.dir)?;
    eprintln!(
        "store-compare: data under {} ({} messages, {} senders, {} recipients, record {} B, cache {} MiB, {} run(s))",
        args.dir.display(),
        args.messages,
        args.senders,
        args.recipients,
        RECORD_LEN,
        CACHE_BYTES >> 20,
        args.repeat
    );

    let probe = fsync_probe(&args.dir, 1000)?;
    eprintln!(
        "  fsync probe (4 KiB append + fsync): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        probe.p50_ms, probe.p99_ms, probe.max_ms
    );

    let mut rng = Rng::new(args.seed);
    let msgs = gen_messages(&mut rng, args.messages, 1, args.senders, args.recipients);

    let mut csv_rows = vec![format!(
        "0,fsync-probe,,,1000,,,{:.3},{:.3},{:.3},,,,,,,,,,,,,,,,,",
        probe.p50_ms, probe.p99_ms, probe.max_ms
    )];
    // One group per (backend, batch) / backend, holding that configuration's runs.
    let mut pipes: Vec<Vec<PipelineResult>> = Vec::new();
    let mut mixes: Vec<Vec<MixedResult>> = Vec::new();
    for run in 1..=args.repeat {
        let mut group = 0;
        for &batch in &args.batches {
            let n = if batch == 1 {
                args.b1_cap.min(msgs.len())
            } else {
                msgs.len()
            };
            for name in &args.backends {
                let dir = args.dir.join(format!("{name}-b{batch}"));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)?;
                }
                eprint!("  run {run} {name:<6} append B={batch:<5} n={n:<7} ... ");
                std::io::stderr().flush().ok();
                let r = pipeline_for(name, &args, &msgs[..n], batch, &dir)?;
                eprintln!(
                    "{:>7.0} msg/s, commit p50 {:.2} ms p99 {:.2} ms | scan {:>8.0} msg/s | ack {:>7.0} msg/s | reopen {:.1} ms",
                    r.messages as f64 / r.append_secs,
                    r.append_lat.p50_ms,
                    r.append_lat.p99_ms,
                    r.messages as f64 / r.scan_secs,
                    r.messages as f64 / r.ack_secs,
                    r.reopen_full_ms
                );
                if !args.keep {
                    std::fs::remove_dir_all(&dir)?;
                }
                csv_rows.push(format!("{run},{}", csv_pipeline(&r)));
                if run == 1 {
                    pipes.push(Vec::new());
                }
                pipes[group].push(r);
                group += 1;
            }
        }

        if args.mixed {
            for (i, name) in args.backends.iter().enumerate() {
                let dir = args.dir.join(format!("{name}-mixed"));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)?;
                }
                eprint!("  run {run} {name:<6} mixed ... ");
                std::io::stderr().flush().ok();
                let r = mixed_for(name, &args, &dir)?;
                eprintln!("{:>9.0} ops/s", (r.rounds * r.batch * 2) as f64 / r.secs);
                if !args.keep {
                    std::fs::remove_dir_all(&dir)?;
                }
                csv_rows.push(format!("{run},{}", csv_mixed(&r)));
                if run == 1 {
                    mixes.push(Vec::new());
                }
                mixes[i].push(r);
            }
        }
    }

    if !args.keep && !args.dir_given {
        std::fs::remove_dir_all(&args.dir).ok();
    }

    if let Some(path) = &args.csv {
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if new {
            writeln!(f, "run,{}", csv_header())?;
        }
        for row in &csv_rows {
            writeln!(f, "{row}")?;
        }
    }

    println!(
        "\nfsync probe (4 KiB append + fsync, 1000 rounds): p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        probe.p50_ms, probe.p99_ms, probe.max_ms
    );
    print!("{}", report(&pipes, &mixes, args.repeat));
    Ok(())
}

/// Median of `f` over the runs of one configuration.
fn med<T>(runs: &[T], f: impl Fn(&T) -> f64) -> f64 {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// "median" for one run, "median (a / b / c)" for several, in run order.
fn med_runs<T>(runs: &[T], f: impl Fn(&T) -> f64) -> String {
    let m = med(runs, &f);
    if runs.len() == 1 {
        return format!("{m:.0}");
    }
    let each: Vec<String> = runs.iter().map(|r| format!("{:.0}", f(r))).collect();
    format!("{m:.0} ({})", each.join(" / "))
}

fn report(pipes: &[Vec<PipelineResult>], mixes: &[Vec<MixedResult>], repeat: usize) -> String {
    let mut s = String::new();
    if repeat > 1 {
        let _ = writeln!(
            s,
            "\nEach cell is the median of {repeat} runs; throughput cells list every run in parentheses."
        );
    }
    let _ = writeln!(s, "\n## Phase 1: append (durable commit per batch)\n");
    let _ = writeln!(s, "| backend | batch | messages | msg/s | commit p50 ms | commit p99 ms | commit max ms | written B/msg |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for g in pipes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} |",
            g[0].backend,
            g[0].batch,
            g[0].messages,
            med_runs(g, |r| r.messages as f64 / r.append_secs),
            med(g, |r| r.append_lat.p50_ms),
            med(g, |r| r.append_lat.p99_ms),
            med(g, |r| r.append_lat.max_ms),
            med(g, |r| r.append_write_bytes as f64 / r.messages as f64),
        );
    }
    let _ = writeln!(
        s,
        "\n## Phases 2-4: scan, ack, reopen, size (on the store built by phase 1)\n"
    );
    let _ = writeln!(s, "Disk = allocated bytes (st_blocks) of the closed store's files; apparent sizes are in the CSV.\n");
    let _ = writeln!(
        s,
        "| backend | batch | messages | scan msg/s | ack msg/s | ack commit p50 / p99 ms | ack written B/msg | disk after append MiB | disk after ack MiB | reopen full ms | reopen empty ms |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for g in pipes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
            g[0].backend,
            g[0].batch,
            g[0].messages,
            med_runs(g, |r| r.messages as f64 / r.scan_secs),
            med_runs(g, |r| r.messages as f64 / r.ack_secs),
            med(g, |r| r.ack_lat.p50_ms),
            med(g, |r| r.ack_lat.p99_ms),
            med(g, |r| r.ack_write_bytes as f64 / r.messages as f64),
            med(g, |r| mib(r.size_after_append.1)),
            med(g, |r| mib(r.size_after_ack.1)),
            med(g, |r| r.reopen_full_ms),
            med(g, |r| r.reopen_empty_ms),
        );
    }
    if !mixes.is_empty() {
        let _ = writeln!(
            s,
            "\n## Mixed steady state (append batch, then delete batch of the oldest)\n"
        );
        let _ = writeln!(
            s,
            "| backend | batch | backlog | ops (appends+deletes) | ops/s | append p50 / p99 ms | delete p50 / p99 ms | written B/op | scan after churn msg/s | disk at end MiB |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for g in mixes {
            let ops = (g[0].rounds * g[0].batch * 2) as f64;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} | {:.0} | {} | {:.1} |",
                g[0].backend,
                g[0].batch,
                g[0].backlog,
                ops,
                med_runs(g, |r| ops / r.secs),
                med(g, |r| r.append_lat.p50_ms),
                med(g, |r| r.append_lat.p99_ms),
                med(g, |r| r.delete_lat.p50_ms),
                med(g, |r| r.delete_lat.p99_ms),
                med(g, |r| r.write_bytes as f64 / ops),
                med_runs(g, |r| r.live_after as f64 / r.scan_after_secs),
                med(g, |r| mib(r.size_end.1)),
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_args(dir: &Path) -> Args {
        Args {
            backends: BACKENDS.iter().map(|s| s.to_string()).collect(),
            messages: 2000,
            senders: 20,
            recipients: 30,
            batches: vec![7],
            b1_cap: 50,
            ack_batch: 64,
            mixed_backlog: 300,
            mixed_rounds: 10,
            mixed_batch: 32,
            mixed: true,
            dir: dir.to_path_buf(),
            dir_given: true,
            keep: false,
            csv: None,
            seed: 7,
            repeat: 1,
        }
    }

    #[test]
    fn every_backend_passes_its_own_checks() {
        let base = std::env::temp_dir().join(format!("store-compare-test-{}", std::process::id()));
        let args = small_args(&base);
        let mut rng = Rng::new(args.seed);
        let msgs = gen_messages(&mut rng, args.messages, 1, args.senders, args.recipients);
        for name in BACKENDS {
            let r = pipeline_for(name, &args, &msgs, 7, &base.join(format!("{name}-p"))).unwrap();
            assert_eq!(r.messages, 2000);
            let m = mixed_for(name, &args, &base.join(format!("{name}-m"))).unwrap();
            assert_eq!(m.rounds, 10);
        }
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn duplicates_are_skipped() {
        let base = std::env::temp_dir().join(format!("store-compare-dup-{}", std::process::id()));
        let mut rng = Rng::new(1);
        let msgs = gen_messages(&mut rng, 10, 1, 3, 3);
        fn check<S: Store>(dir: &Path, msgs: &[Msg]) {
            std::fs::create_dir_all(dir).unwrap();
            let mut s = S::open(dir).unwrap();
            assert_eq!(s.append(msgs).unwrap(), 10);
            assert_eq!(s.append(&msgs[..4]).unwrap(), 0);
            let total: u64 = (0..3).map(|r| s.scan(r).unwrap().depth).sum();
            assert_eq!(total, 10);
            s.close().unwrap();
        }
        check::<redb_store::RedbStore>(&base.join("redb"), &msgs);
        check::<fjall_store::FjallStore>(&base.join("fjall"), &msgs);
        check::<sqlite_store::SqliteStore>(&base.join("sqlite"), &msgs);
        std::fs::remove_dir_all(&base).ok();
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = latency(&mut v);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.max_ms, 100.0);
    }
}
