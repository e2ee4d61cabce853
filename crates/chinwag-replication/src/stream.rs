//! Streams and version vectors.
//!
//! Every DC appends its own writes to its own stream, numbered 1, 2, 3… without gaps. A
//! stream is named by the DC and the epoch of the DC's store, so a DC rebuilt from nothing
//! starts a new stream instead of reusing numbers. A version vector says, for each stream,
//! how far a DC has applied it; applying is always in order, so one number per stream says
//! everything.

use std::collections::BTreeMap;
use std::fmt;

use chinwag_core::{DcName, Epoch};
use serde::{Deserialize, Serialize};

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    pub dc: DcName,
    pub epoch: u32,
}

impl StreamId {
    pub fn new(dc: DcName, epoch: Epoch) -> Self {
        Self { dc, epoch: epoch.0 }
    }

    pub fn epoch(&self) -> Epoch {
        Epoch(self.epoch)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.dc, self.epoch())
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// For each stream, the highest seq applied (everything up to it, nothing after).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<StreamId, u64>);

impl VersionVector {
    pub fn get(&self, stream: &StreamId) -> u64 {
        self.0.get(stream).copied().unwrap_or(0)
    }

    /// Raises `stream` to `seq`; never lowers it.
    pub fn advance(&mut self, stream: &StreamId, seq: u64) {
        if seq > self.get(stream) {
            self.0.insert(stream.clone(), seq);
        }
    }

    /// Pointwise maximum. Commutative, associative and idempotent, so vectors heard in any
    /// order, any number of times, combine to the same result.
    pub fn merge(&mut self, other: &VersionVector) {
        for (stream, &seq) in &other.0 {
            self.advance(stream, seq);
        }
    }

    /// Whether `self` has applied everything `other` has.
    pub fn covers(&self, other: &VersionVector) -> bool {
        other.0.iter().all(|(s, &seq)| self.get(s) >= seq)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&StreamId, u64)> {
        self.0.iter().map(|(s, &seq)| (s, seq))
    }

    pub fn streams(&self) -> impl Iterator<Item = &StreamId> {
        self.0.keys()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Entries `self` has and `other` lacks, summed over streams.
    pub fn lead_over(&self, other: &VersionVector) -> u64 {
        self.iter().map(|(s, seq)| seq.saturating_sub(other.get(s))).sum()
    }

    /// Forgets a stream altogether (its DC was decommissioned).
    pub fn remove(&mut self, stream: &StreamId) {
        self.0.remove(stream);
    }
}

impl fmt::Debug for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.0.iter()).finish()
    }
}

impl FromIterator<(StreamId, u64)> for VersionVector {
    fn from_iter<I: IntoIterator<Item = (StreamId, u64)>>(iter: I) -> Self {
        let mut vv = VersionVector::default();
        for (s, seq) in iter {
            vv.advance(&s, seq);
        }
        vv
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn vv() -> impl Strategy<Value = VersionVector> {
        proptest::collection::vec((0u8..4, 0u32..2, 0u64..20), 0..8).prop_map(|items| {
            items
                .into_iter()
                .map(|(dc, epoch, seq)| {
                    let dc = DcName::parse(&format!("dc{dc}")).unwrap();
                    (StreamId { dc, epoch }, seq)
                })
                .collect()
        })
    }

    fn merged(a: &VersionVector, b: &VersionVector) -> VersionVector {
        let mut m = a.clone();
        m.merge(b);
        m
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in vv(), b in vv()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in vv(), b in vv(), c in vv()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn merge_is_idempotent(a in vv(), b in vv()) {
            let once = merged(&a, &b);
            prop_assert_eq!(merged(&once, &b), once.clone());
            prop_assert_eq!(merged(&a, &a), a.clone());
        }

        #[test]
        fn merge_covers_both(a in vv(), b in vv()) {
            let m = merged(&a, &b);
            prop_assert!(m.covers(&a) && m.covers(&b));
        }
    }
}
