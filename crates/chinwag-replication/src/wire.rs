//! What DCs say to each other. Encoded with postcard; the transport frames each message
//! with a length prefix and refuses frames over [`MAX_FRAME_BYTES`] before reading them.

use chinwag_core::DcName;
use serde::{Deserialize, Serialize};

use crate::stream::{StreamId, VersionVector};

/// Largest encoded message; a batch of entries is cut to stay below it.
pub const MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;
/// Most entries in one `Entries` message.
pub const MAX_BATCH_ENTRIES: usize = 1024;
/// Most DCs named in one message.
pub const MAX_DCS: usize = 256;
/// Most items in one snapshot part.
pub const MAX_SNAPSHOT_ITEMS: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Wire {
    /// First message on a link, both ways: who I am, my stream, and what I have applied.
    Hello {
        dc: DcName,
        stream: StreamId,
        applied: VersionVector,
    },
    /// What I have applied, and which DCs I cannot currently hear (so others relay their
    /// streams to me). Also a keepalive.
    Digest {
        applied: VersionVector,
        unreachable: Vec<DcName>,
        /// Messages waiting in the sender's mailboxes: for the cluster map, nothing more.
        mailbox_depth: u64,
    },
    /// Consecutive entries of `stream`, the first numbered `first`.
    Entries {
        stream: StreamId,
        first: u64,
        entries: Vec<Vec<u8>>,
    },
    /// I am missing `stream` from `from` on (I received later entries, not these).
    Need { stream: StreamId, from: u64 },
    /// One part of a snapshot of the sender's whole state, for a peer that needs entries
    /// the sender's log no longer holds. `applied` is what the state reflects; `items` are
    /// opaque to this layer; the last part has `last` set.
    Snapshot {
        applied: VersionVector,
        items: Vec<Vec<u8>>,
        last: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    #[error("undecodable frame: {0}")]
    Malformed(String),
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

pub fn encode(msg: &Wire) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("wire messages always encode")
}

/// Decodes and validates one frame. Names are validated by their types; counts and
/// sequence numbers here.
pub fn decode(bytes: &[u8]) -> Result<Wire, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let msg: Wire = postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    validate(&msg)?;
    Ok(msg)
}

fn validate(msg: &Wire) -> Result<(), WireError> {
    match msg {
        Wire::Hello { applied, .. } if applied.len() > MAX_DCS * 4 => Err(WireError::Invalid("too many streams")),
        Wire::Digest {
            applied, unreachable, ..
        } if applied.len() > MAX_DCS * 4 || unreachable.len() > MAX_DCS => {
            Err(WireError::Invalid("too many streams or DCs"))
        }
        Wire::Entries { first, entries, .. } => {
            if *first == 0 {
                Err(WireError::Invalid("streams start at 1"))
            } else if entries.is_empty() || entries.len() > MAX_BATCH_ENTRIES {
                Err(WireError::Invalid("batch size out of range"))
            } else if first.checked_add(entries.len() as u64).is_none() {
                Err(WireError::Invalid("sequence overflow"))
            } else {
                Ok(())
            }
        }
        Wire::Need { from: 0, .. } => Err(WireError::Invalid("streams start at 1")),
        Wire::Snapshot { applied, items, .. } if applied.len() > MAX_DCS * 4 || items.len() > MAX_SNAPSHOT_ITEMS => {
            Err(WireError::Invalid("snapshot part too large"))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use chinwag_core::Epoch;
    use proptest::prelude::*;

    use super::*;

    fn stream() -> StreamId {
        StreamId::new(DcName::parse("east").unwrap(), Epoch(7))
    }

    #[test]
    fn messages_round_trip() {
        let mut applied = VersionVector::default();
        applied.advance(&stream(), 42);
        for msg in [
            Wire::Hello {
                dc: DcName::parse("west").unwrap(),
                stream: stream(),
                applied: applied.clone(),
            },
            Wire::Digest {
                applied,
                unreachable: vec![DcName::parse("north").unwrap()],
                mailbox_depth: 7,
            },
            Wire::Entries {
                stream: stream(),
                first: 1,
                entries: vec![vec![1, 2, 3], vec![]],
            },
            Wire::Need {
                stream: stream(),
                from: 5,
            },
        ] {
            assert_eq!(decode(&encode(&msg)), Ok(msg));
        }
    }

    #[test]
    fn invalid_messages_are_refused() {
        let bad = [
            Wire::Entries {
                stream: stream(),
                first: 0,
                entries: vec![vec![]],
            },
            Wire::Entries {
                stream: stream(),
                first: 1,
                entries: vec![],
            },
            Wire::Entries {
                stream: stream(),
                first: u64::MAX,
                entries: vec![vec![]],
            },
            Wire::Need {
                stream: stream(),
                from: 0,
            },
        ];
        for msg in bad {
            assert!(matches!(decode(&encode(&msg)), Err(WireError::Invalid(_))), "{msg:?}");
        }
    }

    #[test]
    fn invalid_names_are_refused() {
        // A Need naming the stream "EAST" (uppercase is not a valid DC name).
        let mut bytes = encode(&Wire::Need {
            stream: stream(),
            from: 1,
        });
        let at = bytes.windows(4).position(|w| w == b"east").unwrap();
        bytes[at..at + 4].copy_from_slice(b"EAST");
        assert!(matches!(decode(&bytes), Err(WireError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }
    }
}
