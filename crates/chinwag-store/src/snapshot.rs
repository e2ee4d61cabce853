//! Snapshots: the whole replicated state of a store, for a DC that is behind the point
//! where the other DCs truncated their logs (a DC that joined late, or came back after
//! being decommissioned).
//!
//! # Merging
//! A snapshot says what its sender has applied (`a_s`) and holds every message it still
//! has. A message X of stream O is kept after the merge if every side that has seen it
//! still has it: a side that applied O past X's seq and no longer holds X deleted it
//! because it was acknowledged. So the receiver (applied `a_r`):
//! - adds X from the snapshot if it does not have it and has not seen it (`X.seq > a_r[O]`,
//!   and no tombstone);
//! - deletes its own X if the sender has seen it (`X.seq <= a_s[O]`) and does not hold it;
//! - takes each other DC's coordinates from the snapshot if the sender is further along
//!   that DC's stream;
//! - then counts every stream as applied to `max(a_r, a_s)`.
//!
//! The rule is symmetric and depends only on the two states, so merging is commutative,
//! and merging the same snapshot twice changes nothing.

use chinwag_core::Message;
use chinwag_replication::{StreamId, VersionVector};
use fjall::{Readable, Snapshot};

use crate::Tables;
use crate::held::Held;
use crate::schema::{self, IdRecord, MessageRecord, SnapshotItem};

/// Builds the snapshot from `snap` and the messages held in memory at the same moment.
pub fn build(
    t: &Tables,
    snap: &Snapshot,
    mut held: Held,
    own: &StreamId,
) -> Result<(VersionVector, Vec<Vec<u8>>), fjall::Error> {
    let mut applied = VersionVector::default();
    let own_head = snap
        .get(&t.meta, schema::LOG_SEQ)?
        .and_then(|v| schema::decode_u64(&v))
        .unwrap_or(0);
    applied.advance(own, own_head);
    for entry in snap.iter(&t.streams) {
        let (key, value) = entry.into_inner()?;
        if let (Some(stream), Ok(state)) = (
            schema::split_stream_key(&key),
            postcard::from_bytes::<schema::StreamState>(&value),
        ) && stream != *own
        {
            applied.advance(&stream, state.applied);
        }
    }
    let mut items = Vec::new();
    for entry in snap.iter(&t.mailbox) {
        let (key, value) = entry.into_inner()?;
        let (Some(to), Some(seq), Ok(record)) = (
            schema::split_user(&key),
            schema::key_seq(&key),
            postcard::from_bytes::<MessageRecord>(&value),
        ) else {
            continue;
        };
        let Ok(msg) = record.into_message(&to, seq, &own.dc) else {
            continue;
        };
        // A checkpoint may be moving it to fjall.
        held.remove(&to, seq);
        items.push(message_item(&msg));
    }
    items.extend(held.iter().map(|msg| message_item(msg)));
    for entry in snap.iter(&t.coords) {
        if let Some((user, at)) = schema::split_coord_key(&entry.key()?) {
            items.push(postcard::to_stdvec(&SnapshotItem::Online { user, at }).expect("encodes"));
        }
    }
    for entry in snap.iter(&t.gone) {
        if let Some(id) = schema::split_id_key(&entry.key()?) {
            let item = SnapshotItem::Gone {
                id: IdRecord::from(&id),
            };
            items.push(postcard::to_stdvec(&item).expect("encodes"));
        }
    }
    Ok((applied, items))
}

fn message_item(msg: &Message) -> Vec<u8> {
    let item = SnapshotItem::Message {
        to: msg.to.clone(),
        id: IdRecord::from(&msg.id),
        from: msg.from.clone(),
        client_id: msg.client_id.clone(),
        text: msg.text.clone(),
        at_ms: msg.at_ms,
    };
    postcard::to_stdvec(&item).expect("encodes")
}
