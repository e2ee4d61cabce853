//! What happened in a run, as the clients and the DCs saw it, and the checker that judges
//! it (modelled on Jepsen's queue and set checks): every acknowledged message delivered,
//! nothing delivered twice, nothing unexpected, one sender's messages in order, and
//! coordinates that agree.

use std::collections::{BTreeMap, BTreeSet};

use chinwag_core::{Coordinate, MessageId, SharedMessage, Store, UserId};
use chinwag_replication::{StreamId, VersionVector};
use chinwag_store::EmbeddedStore;

/// A message as the application knows it: sender, idempotency key.
type Key = (String, String);

#[derive(Debug, Default)]
pub struct Latencies {
    pub online_cross_dc: Vec<u64>,
    /// Online delivery between DCs 0 and 1 (in the split scenario, relayed by a third).
    pub between_first_two: Vec<u64>,
    pub critical_case: Vec<u64>,
    pub coordinate_convergence: Vec<u64>,
    pub mailbox_replication: Vec<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub acknowledged: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    pub reordered: usize,
    pub coordinate_mismatches: usize,
    /// Retries that two DCs both accepted and both delivered (the app sees one key twice
    /// under two ids; see docs/protocol.md).
    pub twins: usize,
    pub max_delivery_after_heal_ms: u64,
    pub problems: Vec<String>,
}

impl Verdict {
    pub fn violations(&self) -> usize {
        self.lost + self.duplicated + self.unexpected + self.reordered + self.coordinate_mismatches
    }
}

/// A message accepted by a DC, waiting for its latencies to be measured.
struct Accepted {
    at: u64,
    origin: usize,
    /// The recipient was online in another DC, and the origin knew it: online delivery.
    /// Online there but the origin did not know yet: the critical case.
    class: Option<bool>,
    /// Those connections (by coordinate); the latency is measured when one of them gets it.
    watch: Vec<Coordinate>,
}

/// Where a message was delivered, and how it reached the connection.
pub struct Delivered {
    pub dc: usize,
    pub conn: u64,
    pub user: usize,
    /// Pushed on commit, rather than read from the mailbox.
    pub via_push: bool,
}

#[derive(Default)]
pub struct History {
    trace: Vec<String>,
    pub latencies: Latencies,
    attempted: BTreeMap<Key, usize>,
    /// Acknowledged to the sender: key → (recipient, time).
    sent: BTreeMap<Key, (usize, u64)>,
    accepted: BTreeMap<MessageId, Accepted>,
    /// Per stream: accepted messages not yet applied everywhere (seq → time).
    replicating: BTreeMap<StreamId, BTreeMap<u64, u64>>,
    /// Joins whose coordinate has not yet reached every DC.
    joining: Vec<(UserId, Coordinate, u64)>,
    /// Deliveries to the application: recipient → key → (ids, first time).
    app: BTreeMap<usize, BTreeMap<Key, (BTreeSet<MessageId>, u64)>>,
    /// Per connection: ids delivered, in order.
    per_conn: BTreeMap<u64, Vec<MessageId>>,
    /// An acknowledgement: the stream entry that carries it.
    acks: BTreeMap<String, (StreamId, u64)>,
    duplicates: Vec<String>,
}

impl History {
    pub fn new(_users: usize) -> Self {
        Self::default()
    }

    pub fn trace(&mut self, now: u64, line: String) {
        self.trace.push(format!("{now:>7} {line}"));
    }

    /// The last lines of the trace.
    pub fn tail(&self, n: usize) -> &[String] {
        &self.trace[self.trace.len().saturating_sub(n)..]
    }

    /// A digest of the whole trace: equal for equal runs.
    pub fn fingerprint(&self) -> u64 {
        self.trace.iter().fold(0xcbf2_9ce4_8422_2325, |h, line| {
            line.bytes()
                .fold(h, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
        })
    }

    pub fn attempted(&mut self, from: &UserId, client_id: &str, to: usize) {
        self.attempted.insert((from.to_string(), client_id.to_owned()), to);
    }

    pub fn accepted_at(
        &mut self,
        now: u64,
        origin: usize,
        id: &MessageId,
        elsewhere: &[Coordinate],
        knew: &[Coordinate],
    ) {
        let class = (!elsewhere.is_empty()).then(|| elsewhere.iter().all(|c| knew.contains(c)));
        let watch = elsewhere.to_vec();
        self.accepted.insert(
            id.clone(),
            Accepted {
                at: now,
                origin,
                class,
                watch,
            },
        );
        let stream = StreamId::new(id.origin.clone(), id.epoch);
        self.replicating.entry(stream).or_default().insert(id.seq, now);
        self.trace(now, format!("accepted in dc{origin} (seq {})", id.seq));
    }

    pub fn sent(&mut self, now: u64, dc: usize, user: usize, client_id: &str, _id: &str) {
        let key = (format!("u{user}"), client_id.to_owned());
        let to = self.attempted.get(&key).copied().unwrap_or(usize::MAX);
        self.sent.entry(key).or_insert((to, now));
        self.trace(now, format!("u{user} {client_id} acknowledged by dc{dc}"));
    }

    pub fn joined(&mut self, now: u64, user: &UserId, at: Coordinate) {
        self.joining.push((user.clone(), at, now));
    }

    pub fn acked(&mut self, stream: StreamId, ids: &[String], head: u64) {
        for id in ids {
            self.acks.entry(id.clone()).or_insert((stream.clone(), head));
        }
    }

    /// A DC applied more of `stream`; `everywhere` is how far every running DC has.
    pub fn note_applied(&mut self, now: u64, _dc: usize, stream: &StreamId, everywhere: u64) {
        let Some(pending) = self.replicating.get_mut(stream) else {
            return;
        };
        while let Some(entry) = pending.first_entry() {
            if *entry.key() > everywhere {
                break;
            }
            let at = entry.remove();
            self.latencies.mailbox_replication.push(now - at);
        }
    }

    pub fn check_coordinates(&mut self, now: u64, stores: &[Option<&EmbeddedStore>]) {
        if self.joining.is_empty() || stores.iter().any(Option::is_none) {
            return;
        }
        let latencies = &mut self.latencies.coordinate_convergence;
        self.joining.retain(|(user, at, t)| {
            let everywhere = stores.iter().flatten().all(|s| s.coordinates(user).contains(at));
            if everywhere {
                latencies.push(now - t);
            }
            !everywhere
        });
    }

    pub fn delivered(&mut self, now: u64, at: Delivered, msg: &SharedMessage, applied: &[Option<&VersionVector>]) {
        let Delivered {
            dc,
            conn,
            user,
            via_push,
        } = at;
        let on_conn = self.per_conn.entry(conn).or_default();
        if on_conn.contains(&msg.id) {
            self.duplicates
                .push(format!("{} delivered twice on one connection", msg.id));
        }
        on_conn.push(msg.id.clone());
        // Read from a mailbox that had already applied its acknowledgement: it came back.
        // (A push that was on its way when the acknowledgement landed is not a return.)
        if !via_push
            && let Some((stream, seq)) = self.acks.get(&msg.id.to_string())
            && let Some(vv) = applied.get(dc).copied().flatten()
            && vv.get(stream) >= *seq
        {
            self.duplicates.push(format!(
                "{} redelivered at {now} in dc{dc} after its acknowledgement ({stream} entry {seq}) arrived (applied {})",
                msg.id,
                vv.get(stream)
            ));
        }
        let key = (msg.from.to_string(), msg.client_id.to_string());
        let entry = self
            .app
            .entry(user)
            .or_default()
            .entry(key)
            .or_insert_with(|| (BTreeSet::new(), now));
        entry.0.insert(msg.id.clone());
        if let Some(acc) = self.accepted.get_mut(&msg.id)
            && acc.origin != dc
            && acc
                .watch
                .iter()
                .any(|c| c.conn == conn & ((1 << 40) - 1) && c.dc.as_str() == crate::world::dc_name(dc))
        {
            if acc.class.is_some() && acc.origin.max(dc) == 1 && acc.origin.min(dc) == 0 {
                self.latencies.between_first_two.push(now - acc.at);
            }
            match acc.class.take() {
                Some(true) => self.latencies.online_cross_dc.push(now - acc.at),
                Some(false) => self.latencies.critical_case.push(now - acc.at),
                None => {}
            }
        }
        self.trace(now, format!("u{user} got {}:{} in dc{dc}", msg.from, msg.client_id));
    }

    /// Judges the run. `mailboxes` holds, per running DC, the ids in its mailboxes and what
    /// it has applied.
    pub fn verdict(
        &self,
        coordinate_views: &[Vec<Vec<Coordinate>>],
        live: &[Vec<Coordinate>],
        mailboxes: &[(BTreeSet<String>, VersionVector)],
        last_heal: u64,
    ) -> Verdict {
        let mut v = Verdict {
            acknowledged: self.sent.len(),
            duplicated: self.duplicates.len(),
            ..Verdict::default()
        };
        v.problems.extend(self.duplicates.iter().cloned());
        // Nothing whose acknowledgement a DC applied may be in that DC's mailboxes.
        for (dc, (ids, applied)) in mailboxes.iter().enumerate() {
            for (id, (stream, seq)) in &self.acks {
                if applied.get(stream) >= *seq && ids.contains(id) {
                    v.duplicated += 1;
                    v.problems
                        .push(format!("{id} is back in dc{dc}'s mailbox after its acknowledgement"));
                }
            }
        }
        for (key, (to, at)) in &self.sent {
            match self.app.get(to).and_then(|m| m.get(key)) {
                None => {
                    v.lost += 1;
                    v.problems.push(format!(
                        "{}:{} acknowledged at {at} and never delivered to u{to}",
                        key.0, key.1
                    ));
                }
                Some((ids, first)) => {
                    if ids.len() > 1 {
                        v.twins += 1;
                    }
                    v.max_delivery_after_heal_ms = v
                        .max_delivery_after_heal_ms
                        .max(first.saturating_sub((*at).max(last_heal)));
                }
            }
        }
        for (user, keys) in &self.app {
            for key in keys.keys() {
                if self.attempted.get(key) != Some(user) {
                    v.unexpected += 1;
                    v.problems
                        .push(format!("u{user} got {}:{}, which nobody sent them", key.0, key.1));
                }
            }
        }
        v.reordered = self.reorderings(&mut v.problems);
        for view in coordinate_views {
            if view != live {
                v.coordinate_mismatches += 1;
                v.problems.push(format!(
                    "a DC's coordinates {view:?} differ from the live connections {live:?}"
                ));
            }
        }
        v
    }

    /// On each connection, messages from one origin DC must arrive in their stream order.
    fn reorderings(&self, problems: &mut Vec<String>) -> usize {
        let mut count = 0;
        for ids in self.per_conn.values() {
            let mut last: BTreeMap<StreamId, u64> = BTreeMap::new();
            for id in ids {
                let stream = StreamId::new(id.origin.clone(), id.epoch);
                let prev = last.entry(stream).or_default();
                if id.seq < *prev {
                    count += 1;
                    problems.push(format!("{id} delivered after a later message of its stream"));
                }
                *prev = (*prev).max(id.seq);
            }
        }
        count
    }
}
