//! What the store benchmarks share.

use std::time::Duration;

use chinwag_core::{DcName, NodeName};
use chinwag_store::StoreOptions;

/// A single-DC store with the server's default memory, no mailbox cap, and the given
/// dedup window.
pub fn options(dedup_window: Duration) -> StoreOptions {
    StoreOptions {
        dc: DcName::parse("bench").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        mailbox_max_messages: u64::MAX,
        commit_batch_max: 4096,
        queue: 65_536,
        dedup_window,
        replicate: false,
        memory: chinwag_store::StoreMemory::default(),
        journal_dir: None,
    }
}
