//! The highest idempotency key each sender has used, so that the duplicate check of a
//! key above it skips the tables.
//!
//! Every new message is checked against the idempotency records of a whole dedup window,
//! and a record that is not in memory is looked for in every level of the `dedup`
//! keyspace: 23 % of the store writer's time at saturation (docs/performance.md). Clients
//! whose keys increase (a counter, or a time-ordered id such as our own clients send)
//! never repeat a key above their highest, so a key above it needs no lookup. Other keys
//! are looked up as before.
//!
//! The invariant: for every sender tracked here, the key held is at least as high as any
//! record of that sender in the tables or in memory. A sender is tracked from the first
//! time one of its keys is checked after the store opens (when every record of it is in
//! the tables, since nothing of it has been stored since the journal was replayed), by
//! looking up its highest record there. Every record is checked before it is stored, and
//! a key found above is held from then on, so the key held covers every record stored
//! after (`Writer::insert_message` asserts it). Once [`MAX_SENDERS`] are tracked, further
//! senders are simply not: their records would be stored without being checked here, so
//! they can never start being tracked later. A key checked but then not stored (a full
//! mailbox, a failed commit) or records dropped when they expire only leave the key held
//! higher than needed.

use fjall::Keyspace;
use rustc_hash::FxHashMap as HashMap;

use crate::schema;

/// Senders tracked at most: about 100–200 bytes each (a user id and a key of up to 64
/// bytes each, and the map's own; estimated from the sizes, not measured), so at most
/// about 50 MB.
pub const MAX_SENDERS: usize = 262_144;

pub struct Highest {
    /// Sender's key prefix (`schema::user_prefix`) → the highest client id checked. A
    /// `Vec`, so that a new highest of the same length reuses the allocation.
    keys: HashMap<Box<[u8]>, Vec<u8>>,
    max_senders: usize,
}

impl Highest {
    pub fn new(max_senders: usize) -> Self {
        Self {
            keys: HashMap::default(),
            max_senders,
        }
    }

    /// Whether `dedup_key` is above every record of its sender, so certainly new; if so,
    /// it is the sender's highest from now on. Looks up the sender's highest record the
    /// first time it is asked about the sender.
    pub fn above(&mut self, dedup_key: &[u8], dedup: &Keyspace) -> Result<bool, fjall::Error> {
        let Some((prefix, id)) = schema::split_dedup_key(dedup_key) else {
            return Ok(false);
        };
        if let Some(highest) = self.keys.get_mut(prefix) {
            return Ok(raise(highest, id));
        }
        if self.keys.len() >= self.max_senders {
            return Ok(false);
        }
        let mut highest = match dedup.prefix(prefix).next_back() {
            Some(guard) => schema::split_dedup_key(&guard.key()?).map_or_else(Vec::new, |(_, id)| id.to_vec()),
            None => Vec::new(),
        };
        let above = raise(&mut highest, id);
        self.keys.insert(prefix.into(), highest);
        Ok(above)
    }

    /// Whether a record stored under `dedup_key` keeps the invariant: its sender is not
    /// tracked, or the key held is at least as high.
    pub fn covers(&self, dedup_key: &[u8]) -> bool {
        schema::split_dedup_key(dedup_key)
            .is_none_or(|(prefix, id)| self.keys.get(prefix).is_none_or(|highest| id <= &highest[..]))
    }
}

/// Makes `id` the highest if it is above it; returns whether it was.
fn raise(highest: &mut Vec<u8>, id: &[u8]) -> bool {
    let above = id > &highest[..];
    if above {
        highest.clear();
        highest.extend_from_slice(id);
    }
    above
}

#[cfg(test)]
mod tests {
    use chinwag_core::{ClientMsgId, UserId};
    use fjall::{Database, KeyspaceCreateOptions};

    use super::*;

    fn key(user: &str, id: &str) -> Vec<u8> {
        schema::dedup_key(&UserId::parse(user).unwrap(), &ClientMsgId::parse(id).unwrap())
    }

    fn dedup() -> (tempfile::TempDir, Keyspace) {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::builder(dir.path()).open().unwrap();
        let keyspace = db.keyspace(schema::DEDUP, KeyspaceCreateOptions::default).unwrap();
        (dir, keyspace)
    }

    #[test]
    fn only_keys_above_the_highest_in_the_tables_or_checked_since_are_new() {
        let (_dir, dedup) = dedup();
        dedup.insert(key("alice", "m2"), "r").unwrap();
        // Another sender whose id starts with alice's: its keys are not alice's.
        dedup.insert(key("alicex", "m9"), "r").unwrap();
        let mut highest = Highest::new(10);
        assert!(!highest.above(&key("alice", "m1"), &dedup).unwrap());
        assert!(!highest.above(&key("alice", "m2"), &dedup).unwrap());
        assert!(highest.above(&key("alice", "m3"), &dedup).unwrap());
        assert!(
            !highest.above(&key("alice", "m3"), &dedup).unwrap(),
            "m3 is now the highest"
        );
        assert!(!highest.above(&key("alice", "m1"), &dedup).unwrap());
        assert!(
            highest.above(&key("alice", "m4"), &dedup).unwrap(),
            "a lower check changes nothing"
        );
        assert!(highest.covers(&key("alice", "m4")) && highest.covers(&key("alice", "m1")));
        assert!(!highest.covers(&key("alice", "m5")), "never checked, so not covered");
        assert!(highest.above(&key("bob", "a"), &dedup).unwrap(), "no records at all");
    }

    #[test]
    fn senders_past_the_limit_are_never_tracked() {
        let (_dir, dedup) = dedup();
        let mut highest = Highest::new(1);
        assert!(highest.above(&key("alice", "m1"), &dedup).unwrap());
        assert!(
            !highest.above(&key("bob", "m1"), &dedup).unwrap(),
            "bob is always looked up"
        );
        assert!(
            highest.covers(&key("bob", "m1")),
            "an untracked sender's records are always covered"
        );
        assert!(
            !highest.above(&key("bob", "m2"), &dedup).unwrap(),
            "and never skip the lookup"
        );
        assert!(highest.above(&key("alice", "m2"), &dedup).unwrap());
    }
}
