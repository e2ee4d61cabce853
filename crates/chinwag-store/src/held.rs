//! New messages held in memory until a checkpoint finds them still unacknowledged (see
//! [`crate::journal`]). Most are acknowledged within milliseconds, so this is written for
//! cheap inserts and removals: a small ordered map per recipient, not one ordered map of
//! every held message, whose comparisons of long shared key prefixes cost the writer a
//! measurable share of its time at full load. A recipient's map stays when it empties, to
//! be reused by the next message, until the checkpoint clears them all.

use std::collections::BTreeMap;

use chinwag_core::{SharedMessage, UserId};
use rustc_hash::FxHashMap as HashMap;

#[derive(Default, Clone)]
pub struct Held {
    by_user: HashMap<UserId, BTreeMap<u64, SharedMessage>>,
    len: usize,
    /// The commit count fjall last received when these messages were current: a fjall
    /// snapshot holding the same count pairs with them (`EmbeddedStore::consistent_view`).
    commits: u64,
}

impl Held {
    /// None held, at commit count `commits`.
    pub fn at(commits: u64) -> Self {
        Self {
            commits,
            ..Self::default()
        }
    }

    pub fn commits(&self) -> u64 {
        self.commits
    }

    pub fn set_commits(&mut self, commits: u64) {
        self.commits = commits;
    }

    pub fn insert(&mut self, msg: SharedMessage) {
        let mailbox = self.by_user.entry(msg.to.clone()).or_default();
        if mailbox.insert(msg.seq, msg).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, user: &UserId, seq: u64) {
        let Some(mailbox) = self.by_user.get_mut(user) else {
            return;
        };
        if mailbox.remove(&seq).is_some() {
            self.len -= 1;
        }
    }

    pub fn get(&self, user: &UserId, seq: u64) -> Option<&SharedMessage> {
        self.by_user.get(user)?.get(&seq)
    }

    /// `user`'s held messages from seq `first` on, oldest first.
    pub fn range(&self, user: &UserId, first: u64) -> impl Iterator<Item = &SharedMessage> {
        self.by_user
            .get(user)
            .into_iter()
            .flat_map(move |m| m.range(first..).map(|(_, msg)| msg))
    }

    pub fn iter(&self) -> impl Iterator<Item = &SharedMessage> {
        self.by_user.values().flat_map(BTreeMap::values)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// What bounds the memory held: messages, and recipients' maps (empty ones too).
    pub fn footprint(&self) -> usize {
        self.len + self.by_user.len()
    }

    pub fn clear(&mut self) {
        self.by_user.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chinwag_core::{ClientMsgId, DcName, Epoch, Message, MessageId};

    use super::*;

    fn msg(to: &str, seq: u64) -> SharedMessage {
        Arc::new(Message {
            id: MessageId {
                origin: DcName::parse("dc").unwrap(),
                epoch: Epoch(1),
                seq,
            },
            seq,
            from: UserId::parse("a").unwrap(),
            to: UserId::parse(to).unwrap(),
            client_id: ClientMsgId::parse("c").unwrap(),
            text: String::new(),
            at_ms: 0,
        })
    }

    #[test]
    fn counts_and_ranges() {
        let mut held = Held::default();
        let (bob, carol) = (UserId::parse("bob").unwrap(), UserId::parse("carol").unwrap());
        for (to, seq) in [("bob", 3), ("carol", 4), ("bob", 5), ("bob", 5)] {
            held.insert(msg(to, seq));
        }
        assert_eq!(held.len(), 3);
        let seqs = |first| held.range(&bob, first).map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(seqs(0), [3, 5]);
        assert_eq!(seqs(4), [5]);
        held.remove(&carol, 4);
        held.remove(&carol, 4);
        held.remove(&bob, 9);
        assert_eq!(held.len(), 2);
        assert_eq!(held.footprint(), 4, "two messages, and the maps of bob and carol");
        assert!(held.get(&carol, 4).is_none() && held.get(&bob, 5).is_some());
        assert_eq!(held.iter().count(), 2);
        held.clear();
        assert_eq!((held.len(), held.iter().count()), (0, 0));
    }
}
