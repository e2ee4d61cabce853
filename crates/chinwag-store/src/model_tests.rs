//! The store against a model of what it promises, over random sequences of appends
//! (with retries, by client id or numbered by a device), acknowledgements (of present, absent and repeated messages, and of
//! another user's), reopenings and crashes: every mailbox reads back exactly as the model says,
//! in order; a retry always gets the first attempt's id; the depth metric matches; each
//! acknowledged message yields one delivery receipt for its sender.

use std::collections::{BTreeMap, HashMap};

use chinwag_core::{ClientMsgId, DeviceId, DeviceSeq, MessageId};
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    /// With `numbered`, send number `client + 1` of `from`'s phone; otherwise the send
    /// with client id `c{client}`.
    Append {
        from: u8,
        to: u8,
        client: u8,
        numbered: bool,
    },
    /// Acknowledge the mailbox entries of `user` at these positions (modulo its length),
    /// plus a seq that is not there, plus perhaps one of the next user's messages (which
    /// must stay).
    Ack {
        user: u8,
        picks: Vec<u8>,
        stray: Option<u8>,
    },
    Reopen,
    /// Continue from a copy of the files as a crash now would leave them.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..3, 0u8..3, 0u8..6, any::<bool>())
            .prop_map(|(from, to, client, numbered)| Step::Append { from, to, client, numbered }),
        3 => (0u8..3, proptest::collection::vec(any::<u8>(), 0..4), any::<Option<u8>>())
            .prop_map(|(user, picks, stray)| Step::Ack { user, picks, stray }),
        1 => Just(Step::Reopen),
        1 => Just(Step::Crash),
    ]
}

fn name(n: u8) -> UserId {
    UserId::parse(&format!("u{n}")).unwrap()
}

fn options() -> StoreOptions {
    StoreOptions {
        dc: DcName::parse("local").unwrap(),
        node: NodeName::parse("n1").unwrap(),
        mailbox_max_messages: 1_000,
        commit_batch_max: 64,
        queue: 1024,
        dedup_window: Duration::from_secs(3600),
        replicate: false,
        memory: crate::tests::SMALL_CHECKPOINTS,
        journal_dir: None,
    }
}

/// Records the ids of delivery receipts.
#[derive(Default)]
struct Receipts(std::sync::Mutex<Vec<String>>);

impl CommitListener for Receipts {
    fn committed(&self, _: &SharedMessage, _: &[Coordinate]) {}

    fn delivered(&self, _: &UserId, ids: &[MessageId], _: &[Coordinate]) {
        self.0.lock().unwrap().extend(ids.iter().map(ToString::to_string));
    }
}

fn open(dir: &Path, receipts: &Arc<Receipts>) -> EmbeddedStore {
    EmbeddedStore::open(dir, options(), receipts.clone(), Box::new(|_| {})).unwrap()
}

#[derive(Default)]
struct Model {
    /// Per recipient: (message id, text), oldest first.
    mailboxes: BTreeMap<u8, Vec<(String, String)>>,
    /// (from, client, numbered) → the id of the first attempt.
    first_ids: HashMap<(u8, u8, bool), String>,
    /// Ids of acknowledged messages.
    delivered: Vec<String>,
}

async fn run(steps: Vec<Step>) {
    let mut dir = tempfile::tempdir().unwrap();
    let receipts = Arc::new(Receipts::default());
    let mut store = open(dir.path(), &receipts);
    let mut model = Model::default();
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Append {
                from,
                to,
                client,
                numbered,
            } => {
                let text = format!("step {n}");
                let new = NewMessage {
                    from: name(from),
                    to: name(to),
                    // A numbered send's client id is not what identifies it.
                    client_id: ClientMsgId::parse(&format!("c{}", if numbered { n } else { client.into() })).unwrap(),
                    text: text.clone(),
                    at_ms: unix_ms(),
                    seq: numbered.then(|| DeviceSeq {
                        device: DeviceId::parse("phone").unwrap(),
                        seq: u64::from(client) + 1,
                    }),
                };
                let receipt = store.append(new).await.unwrap();
                let id = receipt.id.to_string();
                match model.first_ids.get(&(from, client, numbered)) {
                    Some(first) => {
                        assert!(receipt.duplicate, "a retry stored again");
                        assert_eq!(&id, first, "a retry got another id");
                    }
                    None => {
                        assert!(!receipt.duplicate);
                        model.first_ids.insert((from, client, numbered), id.clone());
                        model.mailboxes.entry(to).or_default().push((id, text));
                    }
                }
            }
            Step::Ack { user, picks, stray } => {
                let stored = store.scan(name(user), 0, 10_000).await.unwrap();
                let others = store.scan(name((user + 1) % 3), 0, 10_000).await.unwrap();
                let mut seqs: Vec<u64> = picks
                    .iter()
                    .filter(|_| !stored.is_empty())
                    .map(|p| stored[usize::from(*p) % stored.len()].seq)
                    .collect();
                seqs.push(u64::MAX - 1);
                if let Some(p) = stray.filter(|_| !others.is_empty()) {
                    seqs.push(others[usize::from(p) % others.len()].seq);
                }
                let acked: Vec<String> = stored
                    .iter()
                    .filter(|m| seqs.contains(&m.seq))
                    .map(|m| m.id.to_string())
                    .collect();
                store.ack(name(user), seqs).await.unwrap();
                if let Some(mailbox) = model.mailboxes.get_mut(&user) {
                    mailbox.retain(|(id, _)| !acked.contains(id));
                }
                model.delivered.extend(acked);
            }
            Step::Reopen => {
                store.close().await;
                drop(store);
                store = open(dir.path(), &receipts);
            }
            Step::Crash => {
                store.settle().await;
                let copy = crate::tests::crash_copy(dir.path());
                store.close().await;
                drop(store);
                dir = copy;
                store = open(dir.path(), &receipts);
            }
        }
        check(&store, &model).await;
        // Receipts for different senders are announced in no particular order.
        let mut got = receipts.0.lock().unwrap().clone();
        let mut expected = model.delivered.clone();
        got.sort();
        expected.sort();
        assert_eq!(got, expected, "delivery receipts");
    }
}

async fn check(store: &EmbeddedStore, model: &Model) {
    let mut total = 0;
    for user in 0..3 {
        let stored: Vec<(String, String)> = store
            .scan(name(user), 0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|m| (m.id.to_string(), m.text.clone()))
            .collect();
        let expected = model.mailboxes.get(&user).cloned().unwrap_or_default();
        assert_eq!(stored, expected, "mailbox of u{user}");
        total += expected.len() as u64;
    }
    assert_eq!(store.stats().mailbox_depth, total);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_store_behaves_like_its_model(steps in proptest::collection::vec(step(), 1..40)) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(run(steps));
    }
}
