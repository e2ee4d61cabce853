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
//! looking up its highest record there; from then on every record stored for it passes
//! [`Highest::note`]. Once [`MAX_SENDERS`] are tracked, further senders are simply not:
//! their records would be stored without being noted, so they can never start being
//! tracked later. Records dropped when they expire, or forgotten with a failed commit,
//! only leave the key held higher than needed.

use fjall::Keyspace;
use rustc_hash::FxHashMap as HashMap;

/// Senders tracked at most: about 100–200 bytes each (a user id and a key of up to 64
/// bytes each, and the map's own), so at most about 50 MB.
pub const MAX_SENDERS: usize = 262_144;

pub struct Highest {
    /// Sender's key prefix (`schema::user_prefix`) → the highest client id recorded.
    keys: HashMap<Box<[u8]>, Box<[u8]>>,
    max_senders: usize,
}

impl Highest {
    pub fn new(max_senders: usize) -> Self {
        Self {
            keys: HashMap::default(),
            max_senders,
        }
    }

    /// Whether `dedup_key` is above every record of its sender, so certainly new; looks
    /// up the sender's highest record the first time it is asked about the sender.
    pub fn above(&mut self, dedup_key: &[u8], dedup: &Keyspace) -> Result<bool, fjall::Error> {
        let (prefix, id) = split(dedup_key);
        if let Some(highest) = self.keys.get(prefix) {
            return Ok(id > &highest[..]);
        }
        if self.keys.len() >= self.max_senders {
            return Ok(false);
        }
        let highest: Box<[u8]> = match dedup.prefix(prefix).next_back() {
            Some(guard) => split(&guard.key()?).1.into(),
            None => Box::default(),
        };
        let above = id > &highest[..];
        self.keys.insert(prefix.into(), highest);
        Ok(above)
    }

    /// A record is being stored under `dedup_key`.
    pub fn note(&mut self, dedup_key: &[u8]) {
        let (prefix, id) = split(dedup_key);
        if let Some(highest) = self.keys.get_mut(prefix)
            && id > &highest[..]
        {
            *highest = id.into();
        }
    }
}

/// A dedup key's sender prefix (length byte and user id) and client id.
fn split(dedup_key: &[u8]) -> (&[u8], &[u8]) {
    let len = 1 + usize::from(dedup_key[0]);
    dedup_key.split_at(len)
}

#[cfg(test)]
mod tests {
    use chinwag_core::{ClientMsgId, UserId};
    use fjall::{Database, KeyspaceCreateOptions};

    use super::*;
    use crate::schema;

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
    fn only_keys_above_the_highest_in_the_tables_or_noted_since_are_new() {
        let (_dir, dedup) = dedup();
        dedup.insert(key("alice", "m2"), "r").unwrap();
        // Another sender whose id starts with alice's: its keys are not alice's.
        dedup.insert(key("alicex", "m9"), "r").unwrap();
        let mut highest = Highest::new(10);
        assert!(!highest.above(&key("alice", "m1"), &dedup).unwrap());
        assert!(!highest.above(&key("alice", "m2"), &dedup).unwrap());
        assert!(highest.above(&key("alice", "m3"), &dedup).unwrap());
        highest.note(&key("alice", "m3"));
        assert!(!highest.above(&key("alice", "m3"), &dedup).unwrap());
        highest.note(&key("alice", "m1"));
        assert!(
            highest.above(&key("alice", "m4"), &dedup).unwrap(),
            "a lower note changes nothing"
        );
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
        highest.note(&key("bob", "m1"));
        assert!(!highest.above(&key("bob", "m2"), &dedup).unwrap(), "even after a note");
        assert!(highest.above(&key("alice", "m2"), &dedup).unwrap());
    }
}
