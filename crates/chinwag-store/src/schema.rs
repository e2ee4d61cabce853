//! The on-disk layout: tables, key encodings and record formats.
//!
//! Keys that start with a user are prefixed with the user id's length, so one user's keys
//! form one contiguous range that no other user's keys can fall into, and a mailbox can be
//! read with a single range scan in seq order (seqs are big-endian).

use chinwag_core::{ClientMsgId, Coordinate, DcName, DeviceId, Epoch, Message, MessageId, Receipt, UserId};
use chinwag_replication::StreamId;
use serde::{Deserialize, Serialize};

/// Keyspace `user ++ seq` → [`MessageRecord`].
pub const MAILBOX: &str = "mailbox";
/// Keyspace `sender ++ client_id` → [`DedupRecord`].
pub const DEDUP: &str = "dedup";
/// Keyspace user → number of messages in the mailbox (u64, big-endian).
pub const DEPTH: &str = "depth";
/// Keyspace `user ++ postcard(coordinate)` → nothing.
pub const COORDS: &str = "coords";
/// Keyspace of counters (u64, big-endian): [`NEXT_SEQ`], [`LOG_SEQ`], [`EPOCH`],
/// [`FORMAT`], [`COMMITS`], incarnations.
pub const META: &str = "meta";
/// Keyspace `stream ++ seq` → encoded [`Entry`]: this DC's own stream and the streams it
/// applied from others (kept for relaying until every peer has them).
pub const LOG: &str = "log";
/// Keyspace stream → [`StreamState`] (applied and truncated seqs).
pub const STREAMS: &str = "streams";
/// Keyspace `message id` → `user ++ mailbox seq`, to find a message acknowledged by id.
pub const IDS: &str = "ids";
/// Keyspace `message id` → nothing: acknowledged before its mailbox entry arrived here.
pub const GONE: &str = "gone";
/// Keyspace `device key ++ block (u64 BE)` → the receipts of one block of 64 seqs of a
/// device's window (`crate::numbered`); stores of format 5 hold windows whole under the
/// device key alone.
pub const SEQS: &str = "seqs";
/// Keyspace [`seq_receipt_key`] → [`DedupRecord`]: receipts of numbered sends, only
/// between a replay and its fold into [`SEQS`] (`crate::numbered::fold`).
pub const SEQ_RECEIPTS: &str = "seq_receipts";

/// Mailbox position of the next message (local order).
pub const NEXT_SEQ: &str = "next_seq";
/// Seq of the last entry of this DC's own stream; message ids use it.
pub const LOG_SEQ: &str = "log_seq";
/// This store's epoch (its creation time in Unix seconds).
pub const EPOCH: &str = "epoch";
/// Number of durable write batches; see `watermark`.
pub const COMMITS: &str = "commits";
/// [`COMMITS`] when the journal was last emptied: the store's own journal (`journal`)
/// must hold every commit after it that fjall has seen.
pub const CHECKPOINT_COMMITS: &str = "checkpoint_commits";
pub const FORMAT: &str = "format";
/// Present (1) in the format-2 stores that briefly were created with fjall's own
/// memtable rotation off; format 3 always has it off (see `Tables::seal_full`).
pub const OWN_ROTATION: &str = "own_rotation";
/// The journal's directory, when it is not beside the tables (`crate::place`).
pub const JOURNAL_DIR: &str = "journal_dir";
/// Bumped whenever the layout changes incompatibly. 6: a device's window of numbered
/// sends is in blocks, which a build before would not read. 5: numbered sends have no
/// idempotency record, only their device's window in [`SEQS`], which a build without it
/// would not consult. 4: new messages may be only in the
/// store's own journal, so a build that does not replay it must refuse the store (3:
/// fjall's own memtable rotation is off, so a build that does not seal memtables itself
/// must refuse the store).
pub const FORMAT_VERSION: u64 = 6;
/// The format before, upgraded at open: a window kept whole is read as it is and
/// written in blocks at the first checkpoint after it is read.
pub const FORMAT_WHOLE_WINDOWS: u64 = 5;
/// The format before that, upgraded at open: nothing to change but the number.
pub const FORMAT_NO_SEQS: u64 = 4;
/// The format before, upgraded at open: fjall's own memtable rotation off, no journal.
pub const FORMAT_OWN_ROTATION: u64 = 3;
/// The format before, still opened: fjall seals its memtables at their creation size.
pub const FORMAT_FJALL_ROTATION: u64 = 2;

pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

pub fn decode_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

pub fn incarnation_key(node: &str) -> String {
    format!("incarnation/{node}")
}

/// `user`'s key prefix (`length ++ user id`), with room for the `rest` bytes a key puts
/// after it, so no key grows once its prefix is written.
pub fn user_prefix(user: &UserId, rest: usize) -> Vec<u8> {
    let bytes = user.as_str().as_bytes();
    let len = u8::try_from(bytes.len()).expect("user ids are at most 64 bytes");
    let mut key = Vec::with_capacity(1 + bytes.len() + rest);
    key.push(len);
    key.extend_from_slice(bytes);
    key
}

pub fn mailbox_key(user: &UserId, seq: u64) -> Vec<u8> {
    let mut key = user_prefix(user, 8);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// The seq at the end of a mailbox or log key.
pub fn key_seq(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[tail..].try_into().ok()?))
}

pub fn dedup_key(sender: &UserId, client_id: &ClientMsgId) -> Vec<u8> {
    let client_id = client_id.as_str().as_bytes();
    let mut key = user_prefix(sender, client_id.len());
    key.extend_from_slice(client_id);
    key
}

/// `device key ++ seq (big-endian)`: one numbered send's receipt in the journal.
pub fn seq_receipt_key(sender: &UserId, device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = device_key(sender, device, 8);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `sender prefix ++ device`, with room for `rest` more bytes: what the keys of a device's
/// window in [`SEQS`] start with.
pub fn device_key(sender: &UserId, device: &DeviceId, rest: usize) -> Vec<u8> {
    let device = device.as_str().as_bytes();
    let mut key = user_prefix(sender, device.len() + rest);
    key.extend_from_slice(device);
    key
}

/// A [`seq_receipt_key`]'s device key and seq.
pub fn split_seq_receipt_key(key: &[u8]) -> Option<(&[u8], u64)> {
    let (device_key, seq) = key.split_at_checked(key.len().checked_sub(8)?)?;
    Some((device_key, decode_u64(seq)?))
}

/// A dedup key's sender prefix (as [`user_prefix`] makes it) and client id.
pub fn split_dedup_key(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let len = 1 + usize::from(*key.first()?);
    (key.len() >= len).then(|| key.split_at(len))
}

/// `len ++ dc ++ epoch`: the prefix of every log key and message id key of one stream.
pub fn stream_key(stream: &StreamId) -> Vec<u8> {
    let dc = stream.dc.as_str().as_bytes();
    let mut key = Vec::with_capacity(1 + dc.len() + 4 + 8);
    key.push(u8::try_from(dc.len()).expect("DC names are at most 64 bytes"));
    key.extend_from_slice(dc);
    key.extend_from_slice(&stream.epoch.to_be_bytes());
    key
}

/// The log key of entry `seq` of `stream`; also the key of message id (stream, seq).
pub fn entry_key(stream: &StreamId, seq: u64) -> Vec<u8> {
    let mut key = stream_key(stream);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

pub fn id_key(id: &MessageId) -> Vec<u8> {
    entry_key(&StreamId::new(id.origin.clone(), id.epoch), id.seq)
}

pub fn split_stream_key(key: &[u8]) -> Option<StreamId> {
    let (&len, rest) = key.split_first()?;
    let (dc, epoch) = rest.split_at_checked(usize::from(len))?;
    let dc = DcName::parse(std::str::from_utf8(dc).ok()?).ok()?;
    Some(StreamId::new(dc, Epoch(u32::from_be_bytes(epoch.try_into().ok()?))))
}

/// Applied and truncated seqs of one stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub applied: u64,
    pub truncated: u64,
}

pub fn coord_key(user: &UserId, at: &Coordinate) -> Vec<u8> {
    let at = postcard::to_stdvec(at).expect("coordinates always encode");
    let mut key = user_prefix(user, at.len());
    key.extend_from_slice(&at);
    key
}

/// The user a mailbox key belongs to.
pub fn split_user(key: &[u8]) -> Option<UserId> {
    let (&len, rest) = key.split_first()?;
    let user = rest.get(..usize::from(len))?;
    UserId::parse(std::str::from_utf8(user).ok()?).ok()
}

/// A message id key back into the id.
pub fn split_id_key(key: &[u8]) -> Option<MessageId> {
    let stream = split_stream_key(key.get(..key.len().checked_sub(8)?)?)?;
    Some(MessageId {
        origin: stream.dc.clone(),
        epoch: stream.epoch(),
        seq: key_seq(key)?,
    })
}

/// One item of a snapshot of a store's state, sent to a DC that needs entries no log
/// holds any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotItem {
    Message {
        to: UserId,
        id: IdRecord,
        from: UserId,
        client_id: ClientMsgId,
        text: String,
        at_ms: u64,
    },
    Online {
        user: UserId,
        at: Coordinate,
    },
    Gone {
        id: IdRecord,
    },
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
    pub epoch: u32,
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
            epoch: msg.id.epoch.0,
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
                epoch: Epoch(self.epoch),
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
pub struct DedupRecord {
    pub id: IdRecord,
    pub at_ms: u64,
}

/// A [`DedupRecord`] that borrows the origin's name, with the same encoding. Encoding a
/// `DedupRecord` copies the name into a new `String` (`DcName` is serialised through
/// one), and decoding allocates and checks it; the writer encodes one per message and
/// compaction's expiry decodes every record it rewrites.
#[derive(Serialize, Deserialize)]
pub struct DedupView<'a> {
    #[serde(borrow)]
    pub id: IdView<'a>,
    pub at_ms: u64,
}

/// [`IdRecord`], borrowing the origin's name.
#[derive(Serialize, Deserialize)]
pub struct IdView<'a> {
    pub origin: &'a str,
    pub epoch: u32,
    pub seq: u64,
}

/// The [`DedupRecord`] of a receipt, ready to encode.
pub fn dedup_view(receipt: &Receipt) -> DedupView<'_> {
    let id = &receipt.id;
    DedupView {
        id: IdView {
            origin: id.origin.as_str(),
            epoch: id.epoch.0,
            seq: id.seq,
        },
        at_ms: receipt.at_ms,
    }
}

/// The encoded [`DedupRecord`] of a receipt.
pub fn encode_dedup(receipt: &Receipt) -> Vec<u8> {
    postcard::to_stdvec(&dedup_view(receipt)).expect("encodes")
}

/// A mailbox depth as the `depth` keyspace stores it; an empty mailbox has no entry.
pub fn depth_value(depth: u64) -> Option<[u8; 8]> {
    (depth > 0).then(|| encode_u64(depth))
}

/// A message id inside a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRecord {
    pub origin: DcName,
    pub epoch: u32,
    pub seq: u64,
}

impl From<&MessageId> for IdRecord {
    fn from(id: &MessageId) -> Self {
        Self {
            origin: id.origin.clone(),
            epoch: id.epoch.0,
            seq: id.seq,
        }
    }
}

impl From<IdRecord> for MessageId {
    fn from(r: IdRecord) -> Self {
        MessageId {
            origin: r.origin,
            epoch: Epoch(r.epoch),
            seq: r.seq,
        }
    }
}

/// One entry of a DC's stream: a change that DC made and every DC must apply. Names are
/// validated when an entry is decoded, so an entry from a peer cannot smuggle in an
/// invalid user id or coordinate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A message accepted by the stream's DC; its id is (stream, seq of this entry).
    Put {
        to: UserId,
        from: UserId,
        client_id: ClientMsgId,
        text: String,
        at_ms: u64,
    },
    /// `user` acknowledged these messages on a connection of the stream's DC.
    Acked { user: UserId, ids: Vec<IdRecord> },
    /// `user` came online at a coordinate of the stream's DC.
    Online { user: UserId, at: Coordinate },
    /// That connection ended.
    Offline { user: UserId, at: Coordinate },
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("entries always encode")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
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
    fn a_receipt_encodes_as_its_dedup_record() {
        let receipt = Receipt {
            id: MessageId {
                origin: DcName::parse("east-2").unwrap(),
                epoch: Epoch(3),
                seq: 300,
            },
            at_ms: 1_700_000_000_123,
            duplicate: false,
        };
        let record = DedupRecord {
            id: IdRecord::from(&receipt.id),
            at_ms: receipt.at_ms,
        };
        let encoded = encode_dedup(&receipt);
        assert_eq!(encoded, postcard::to_stdvec(&record).unwrap());
        let decoded: DedupRecord = postcard::from_bytes(&encoded).unwrap();
        assert_eq!(
            (MessageId::from(decoded.id), decoded.at_ms),
            (receipt.id, receipt.at_ms)
        );
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

    /// Keys are built on the message path, one or more per message: each in one
    /// allocation of exactly its size, never grown after the user's prefix.
    #[test]
    fn every_key_is_allocated_once_at_its_size() {
        let sender = user("alice");
        // A client id a little longer than a seq: grown after the prefix, its key would
        // have twice the room it needs.
        let keys = [
            mailbox_key(&sender, 7),
            dedup_key(&sender, &ClientMsgId::parse("0123456789").unwrap()),
            seq_receipt_key(&sender, &DeviceId::parse("phone").unwrap(), 7),
            user_prefix(&sender, 0),
        ];
        for key in keys {
            assert_eq!(key.capacity(), key.len(), "{key:?}");
        }
    }
}
