//! The interface every backend implements, and the byte layouts shared by all of them.

use std::path::Path;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Size of one stored mailbox record (metadata + body).
pub const RECORD_LEN: usize = 200;
/// Size of the opaque body inside a record.
pub const BODY_LEN: usize = 100;

/// One message as the server would store it.
pub struct Msg {
    pub sender: u32,
    pub recipient: u32,
    /// Server-assigned sequence number, unique and increasing across the database.
    pub seq: u64,
    pub client_id: [u8; 16],
    /// RECORD_LEN bytes: metadata followed by the body.
    pub record: Vec<u8>,
}

/// Mailbox key: recipient (u32 BE) ++ seq (u64 BE). Byte order == (recipient, seq) order.
pub fn mailbox_key(recipient: u32, seq: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&recipient.to_be_bytes());
    k[4..].copy_from_slice(&seq.to_be_bytes());
    k
}

/// Idempotency key: sender (u32 BE) ++ client_id (16 bytes).
pub fn idem_key(sender: u32, client_id: &[u8; 16]) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&sender.to_be_bytes());
    k[4..].copy_from_slice(client_id);
    k
}

pub fn seq_of_mailbox_key(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[4..12].try_into().expect("12-byte mailbox key"))
}

/// Sums the per-recipient depth changes of one batch, in recipient order.
pub fn depth_deltas(recipients: impl Iterator<Item = u32>) -> Vec<(u32, u64)> {
    let mut v: Vec<u32> = recipients.collect();
    v.sort_unstable();
    let mut out: Vec<(u32, u64)> = Vec::new();
    for r in v {
        match out.last_mut() {
            Some((last, n)) if *last == r => *n += 1,
            _ => out.push((r, 1)),
        }
    }
    out
}

/// Result of reading one recipient's mailbox.
#[derive(Default, Debug, Clone, Copy)]
pub struct ScanResult {
    /// Number of records returned by the range scan.
    pub count: u64,
    /// Value of the depth counter, read in the same snapshot.
    pub depth: u64,
    /// Sequence numbers were strictly increasing.
    pub ordered: bool,
    /// Cheap checksum over the record bytes, so the reads cannot be skipped.
    pub checksum: u64,
}

/// Folds one scanned record into a scan result.
pub fn fold_record(r: &mut ScanResult, last_seq: &mut Option<u64>, seq: u64, value: &[u8]) {
    if let Some(prev) = *last_seq {
        if seq <= prev {
            r.ordered = false;
        }
    }
    *last_seq = Some(seq);
    r.count += 1;
    let mut h = r.checksum ^ seq;
    // Touch the start, middle and end of the record.
    for b in [value[0], value[value.len() / 2], value[value.len() - 1]] {
        h = h.rotate_left(7) ^ u64::from(b);
    }
    h ^= value.len() as u64;
    r.checksum = h;
}

/// A durable store for the offline-mailbox workload.
///
/// Every mutating call is one atomic, durable commit: when it returns, the whole
/// batch survives a power loss, and none of it is visible if it did not return.
pub trait Store {
    /// Opens (creating if needed) the store inside `dir`.
    fn open(dir: &Path) -> Result<Self>
    where
        Self: Sized;

    /// In one durable commit, for each message: skip it if its idempotency key is
    /// already present, otherwise insert the mailbox record and the idempotency
    /// entry; then add the per-recipient counts to the depth counters.
    /// Returns the number of messages inserted.
    fn append(&mut self, msgs: &[Msg]) -> Result<usize>;

    /// In one durable commit, delete the given mailbox entries and subtract the
    /// per-recipient counts from the depth counters.
    fn delete(&mut self, keys: &[(u32, u64)]) -> Result<()>;

    /// Reads the whole mailbox of `recipient` in key order, plus its depth counter,
    /// from one consistent snapshot.
    fn scan(&mut self, recipient: u32) -> Result<ScanResult>;

    /// Flushes whatever the engine does on a clean shutdown and releases the files.
    fn close(self) -> Result<()>;
}
