//! The on-disk layout: tables, key encodings and record formats.
//!
//! Keys that start with a user are prefixed with the user id's length, so one user's keys
//! form one contiguous range that no other user's keys can fall into, and a mailbox can be
//! read with a single range scan in seq order (seqs are big-endian).

use chinwag_core::{ClientMsgId, Coordinate, DcName, Message, MessageId, UserId};
use serde::{Deserialize, Serialize};

/// Keyspace `user ++ seq` → [`MessageRecord`].
pub const MAILBOX: &str = "mailbox";
/// Keyspace `sender ++ client_id` → [`DedupRecord`].
pub const DEDUP: &str = "dedup";
/// Keyspace user → number of messages in the mailbox (u64, big-endian).
pub const DEPTH: &str = "depth";
/// Keyspace `user ++ postcard(coordinate)` → nothing.
pub const COORDS: &str = "coords";
/// Keyspace of counters (u64, big-endian): [`NEXT_SEQ`], [`FORMAT`], incarnations.
pub const META: &str = "meta";

pub const NEXT_SEQ: &str = "next_seq";
/// Number of durable write batches; see `watermark`.
pub const COMMITS: &str = "commits";
pub const FORMAT: &str = "format";
/// Bumped whenever the layout changes incompatibly.
pub const FORMAT_VERSION: u64 = 1;

pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub fn incarnation_key(node: &str) -> String {
    format!("incarnation/{node}")
}

pub fn user_prefix(user: &UserId) -> Vec<u8> {
    let bytes = user.as_str().as_bytes();
    let len = u8::try_from(bytes.len()).expect("user ids are at most 64 bytes");
    let mut key = Vec::with_capacity(1 + bytes.len() + 8);
    key.push(len);
    key.extend_from_slice(bytes);
    key
}

pub fn mailbox_key(user: &UserId, seq: u64) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Splits a mailbox key into its seq; the user part is known to the caller.
pub fn mailbox_seq(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[tail..].try_into().ok()?))
}

pub fn dedup_key(sender: &UserId, client_id: &ClientMsgId) -> Vec<u8> {
    let mut key = user_prefix(sender);
    key.extend_from_slice(client_id.as_str().as_bytes());
    key
}

pub fn coord_key(user: &UserId, at: &Coordinate) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&postcard::to_stdvec(at).expect("coordinates always encode"));
    key
}

/// Splits a coordinate key back into user and coordinate.
pub fn split_coord_key(key: &[u8]) -> Option<(UserId, Coordinate)> {
    let (&len, rest) = key.split_first()?;
    let (user, coord) = rest.split_at_checked(usize::from(len))?;
    let user = UserId::parse(std::str::from_utf8(user).ok()?).ok()?;
    Some((user, postcard::from_bytes(coord).ok()?))
}

/// A stored message, minus the recipient and seq, which are in its key.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageRecord<'a> {
    pub origin: &'a str,
    pub origin_seq: u64,
    pub from: &'a str,
    pub client_id: &'a str,
    pub text: &'a str,
    pub at_ms: u64,
}

impl<'a> MessageRecord<'a> {
    pub fn of(msg: &'a Message) -> Self {
        Self {
            origin: msg.id.origin.as_str(),
            origin_seq: msg.id.seq,
            from: msg.from.as_str(),
            client_id: msg.client_id.as_str(),
            text: &msg.text,
            at_ms: msg.at_ms,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("records always encode")
    }

    /// Rebuilds the message. `local` avoids allocating the origin name for the common
    /// case of a message accepted in this DC.
    pub fn into_message(self, to: &UserId, seq: u64, local: &DcName) -> Result<Message, String> {
        let origin = if self.origin == local.as_str() {
            local.clone()
        } else {
            DcName::parse(self.origin).map_err(|e| format!("origin {:?}: {e}", self.origin))?
        };
        Ok(Message {
            id: MessageId {
                origin,
                seq: self.origin_seq,
            },
            seq,
            from: UserId::parse(self.from).map_err(|e| format!("sender: {e}"))?,
            to: to.clone(),
            client_id: ClientMsgId::parse(self.client_id).map_err(|e| format!("client id: {e}"))?,
            text: self.text.to_owned(),
            at_ms: self.at_ms,
        })
    }
}

/// What a retried send is answered with.
#[derive(Debug, Serialize, Deserialize)]
pub struct DedupRecord<'a> {
    pub origin: &'a str,
    pub origin_seq: u64,
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn one_users_mailbox_is_one_contiguous_range() {
        // "ab" with a large seq must not sort inside "a"'s range, nor "a"'s inside "ab"'s.
        let a_hi = mailbox_key(&user("a"), u64::MAX);
        let ab_lo = mailbox_key(&user("ab"), 0);
        assert!(a_hi < ab_lo);
        assert!(mailbox_key(&user("a"), 1) < mailbox_key(&user("a"), 256));
    }

    #[test]
    fn coordinate_keys_round_trip() {
        let c = Coordinate {
            dc: DcName::parse("east").unwrap(),
            node: chinwag_core::NodeName::parse("n1").unwrap(),
            incarnation: 3,
            conn: 99,
        };
        let key = coord_key(&user("bob"), &c);
        assert_eq!(split_coord_key(&key), Some((user("bob"), c)));
        assert_eq!(split_coord_key(&[200, 1]), None);
    }
}
