//! Forgetting idempotency records once their window has passed, and the windows of
//! devices silent for as long.
//!
//! Records are dropped while fjall compacts the dedup table, so their removal costs no
//! scan and no write of its own, and it keeps pace with however fast records are added:
//! compaction rewrites the table in proportion to what is written to it. A record that
//! has expired but not yet been compacted away is still on disk; lookups ignore it (they
//! compare with [`horizon`]), so a retry after the window is a new message either way.

use std::sync::Arc;
use std::time::Duration;

use fjall::compaction::filter::{CompactionFilter, CompactionFilterResult, Context, Factory, ItemAccessor, Verdict};

use crate::numbered::Window;
use crate::schema::DedupView;

/// Whether a dedup record was made before `horizon_ms`. An unreadable one is kept: it
/// is answered as a duplicate (see the writer), which is the safe side.
fn expired(record: &[u8], horizon_ms: u64) -> bool {
    postcard::from_bytes::<DedupView>(record).is_ok_and(|r| r.at_ms < horizon_ms)
}

/// The oldest creation time still inside a window of `window` ending at `at_ms`.
pub fn horizon(at_ms: u64, window: Duration) -> u64 {
    let window_ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
    at_ms.saturating_sub(window_ms)
}

/// What compaction does with one record. A tombstone rather than nothing, even at the
/// last level: compaction judges each version of a key on its own, and an older,
/// unexpired version must not become visible again (a twin from another DC can have
/// been written over a record with a later time). At the last level the tombstone goes
/// at the next compaction.
fn verdict(record: &[u8], horizon_ms: u64, expired: fn(&[u8], u64) -> bool) -> Verdict {
    if expired(record, horizon_ms) {
        Verdict::Remove
    } else {
        Verdict::Keep
    }
}

/// Whether a device's window (`crate::numbered::Window`) holds nothing from `horizon_ms`
/// on, so that every retry it could answer would be new anyway. An unreadable one is
/// kept, as the writer would read it: it starts the window again with an error.
fn window_expired(record: &[u8], horizon_ms: u64) -> bool {
    Window::decode(record).is_ok_and(|w| w.last_used_ms().is_none_or(|at| at < horizon_ms))
}

/// The compaction filters of the store's tables, as fjall's builder takes them: the
/// dedup table and the devices' windows get their expiry; the other tables keep
/// everything. A device that never sends again would otherwise keep its window for ever,
/// and a client can name as many devices as it likes.
#[expect(
    clippy::type_complexity,
    reason = "the type fjall's builder takes, which it does not name publicly"
)]
pub fn filters(window: Duration) -> Arc<dyn Fn(&str) -> Option<Arc<dyn Factory>> + Send + Sync> {
    let dedup: Arc<dyn Factory> = Arc::new(Expiry {
        window,
        expired,
        name: DEDUP_EXPIRY,
    });
    let seqs: Arc<dyn Factory> = Arc::new(Expiry {
        window,
        expired: window_expired,
        name: "seqs-expiry",
    });
    Arc::new(move |keyspace| match keyspace {
        crate::schema::DEDUP => Some(dedup.clone()),
        crate::schema::SEQS => Some(seqs.clone()),
        _ => None,
    })
}

/// A test's way to keep fjall's worker thread busy, as a long compaction does under
/// load: while `HOLD` is set, a compaction of the dedup table of a store whose dedup
/// window is [`WINDOW`] (no other test uses it) waits at each record (at most a minute),
/// with `HELD` set.
#[cfg(test)]
pub mod hold {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    pub const WINDOW: Duration = Duration::from_secs(4_321);
    pub static HOLD: AtomicBool = AtomicBool::new(false);
    pub static HELD: AtomicBool = AtomicBool::new(false);

    pub fn wait_while_held() {
        wait_while(|| {
            let holding = HOLD.load(Ordering::SeqCst);
            HELD.store(holding, Ordering::SeqCst);
            holding
        });
        HELD.store(false, Ordering::SeqCst);
    }

    /// Waits while `holding` says so, at most a minute: the one stall of the store's
    /// test holds (this one and the spill thread's).
    pub fn wait_while(mut holding: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && holding() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The dedup table's filter, the one a test can hold (see [`hold`]).
const DEDUP_EXPIRY: &str = "dedup-expiry";

/// Installed on a table whose values expire: each compaction gets a filter with the
/// horizon of the moment it starts.
struct Expiry {
    window: Duration,
    expired: fn(&[u8], u64) -> bool,
    name: &'static str,
}

impl Factory for Expiry {
    fn name(&self) -> &str {
        self.name
    }

    fn make_filter(&self, _: &Context) -> Box<dyn CompactionFilter> {
        Box::new(ExpiredBefore {
            horizon_ms: horizon(crate::unix_ms(), self.window),
            expired: self.expired,
            #[cfg(test)]
            held: self.window == hold::WINDOW && self.name == DEDUP_EXPIRY,
        })
    }
}

struct ExpiredBefore {
    horizon_ms: u64,
    expired: fn(&[u8], u64) -> bool,
    #[cfg(test)]
    held: bool,
}

impl CompactionFilter for ExpiredBefore {
    fn filter_item(&mut self, item: ItemAccessor<'_>, _: &Context) -> CompactionFilterResult {
        #[cfg(test)]
        if self.held {
            hold::wait_while_held();
        }
        Ok(verdict(&item.value()?, self.horizon_ms, self.expired))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{DedupRecord, IdRecord};
    use chinwag_core::DcName;

    fn record(at_ms: u64) -> Vec<u8> {
        let id = IdRecord {
            origin: DcName::parse("east").unwrap(),
            epoch: 1,
            seq: 7,
        };
        postcard::to_stdvec(&DedupRecord { id, at_ms }).unwrap()
    }

    #[test]
    fn only_records_older_than_the_horizon_go() {
        assert!(matches!(verdict(&record(1_000), 1_000, expired), Verdict::Keep));
        assert!(matches!(verdict(&record(2_000), 1_000, expired), Verdict::Keep));
        assert!(matches!(verdict(&record(999), 1_000, expired), Verdict::Remove));
    }

    #[test]
    fn an_unreadable_record_is_kept() {
        assert!(!expired(b"\xff\xff\xff", u64::MAX));
        assert!(matches!(verdict(b"", u64::MAX, expired), Verdict::Keep));
        assert!(!window_expired(b"\xff", u64::MAX));
    }

    /// A window goes once even its latest receipt is older than the horizon, whatever
    /// the order of the seqs' times.
    #[test]
    fn only_windows_with_nothing_since_the_horizon_go() {
        let mut window = Window::new(DcName::parse("east").unwrap());
        for (seq, at_ms) in [(1, 1_500), (2, 900), (3, 1_200)] {
            let receipt = chinwag_core::Receipt {
                id: chinwag_core::MessageId {
                    origin: DcName::parse("east").unwrap(),
                    epoch: chinwag_core::Epoch(1),
                    seq,
                },
                at_ms,
                duplicate: false,
            };
            window.insert(seq, &receipt);
        }
        let encoded = window.encode();
        assert!(!window_expired(&encoded, 1_500));
        assert!(window_expired(&encoded, 1_501));
    }

    #[test]
    fn the_horizon_is_one_window_before_the_time_given() {
        assert_eq!(horizon(10_000, Duration::from_secs(3)), 7_000);
        assert_eq!(horizon(1_000, Duration::from_secs(3)), 0);
    }
}
