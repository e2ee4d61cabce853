//! The store against a model of what it promises, over random sequences of appends
//! (with retries), acknowledgements (of present, absent and repeated messages), and
//! reopenings: every mailbox reads back exactly as the model says, in order; a retry
//! always gets the first attempt's id; the depth metric matches.

use std::collections::{BTreeMap, HashMap};

use chinwag_core::ClientMsgId;
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    Append {
        from: u8,
        to: u8,
        client: u8,
    },
    /// Acknowledge the mailbox entries of `user` at these positions (modulo its length),
    /// plus a seq that is not there.
    Ack {
        user: u8,
        picks: Vec<u8>,
    },
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..3, 0u8..3, 0u8..6).prop_map(|(from, to, client)| Step::Append { from, to, client }),
        3 => (0u8..3, proptest::collection::vec(any::<u8>(), 0..4)).prop_map(|(user, picks)| Step::Ack { user, picks }),
        1 => Just(Step::Reopen),
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
        memory: crate::StoreMemory::default(),
    }
}

struct NoListener;

impl CommitListener for NoListener {
    fn committed(&self, _: &SharedMessage, _: &[Coordinate]) {}
}

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir, options(), Arc::new(NoListener), Box::new(|_, _| {})).unwrap()
}

#[derive(Default)]
struct Model {
    /// Per recipient: (message id, text), oldest first.
    mailboxes: BTreeMap<u8, Vec<(String, String)>>,
    /// (from, client) → the id of the first attempt.
    first_ids: HashMap<(u8, u8), String>,
}

async fn run(steps: Vec<Step>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let mut model = Model::default();
    for (n, step) in steps.into_iter().enumerate() {
        match step {
            Step::Append { from, to, client } => {
                let text = format!("step {n}");
                let new = NewMessage {
                    from: name(from),
                    to: name(to),
                    client_id: ClientMsgId::parse(&format!("c{client}")).unwrap(),
                    text: text.clone(),
                    at_ms: unix_ms(),
                };
                let receipt = store.append(new).await.unwrap();
                let id = receipt.id.to_string();
                match model.first_ids.get(&(from, client)) {
                    Some(first) => {
                        assert!(receipt.duplicate, "a retry stored again");
                        assert_eq!(&id, first, "a retry got another id");
                    }
                    None => {
                        assert!(!receipt.duplicate);
                        model.first_ids.insert((from, client), id.clone());
                        model.mailboxes.entry(to).or_default().push((id, text));
                    }
                }
            }
            Step::Ack { user, picks } => {
                let stored = store.scan(name(user), 0, 10_000).await.unwrap();
                let mut seqs: Vec<u64> = picks
                    .iter()
                    .filter(|_| !stored.is_empty())
                    .map(|p| stored[usize::from(*p) % stored.len()].seq)
                    .collect();
                seqs.push(u64::MAX - 1);
                let acked: Vec<String> = stored
                    .iter()
                    .filter(|m| seqs.contains(&m.seq))
                    .map(|m| m.id.to_string())
                    .collect();
                store.ack(name(user), seqs).await.unwrap();
                if let Some(mailbox) = model.mailboxes.get_mut(&user) {
                    mailbox.retain(|(id, _)| !acked.contains(id));
                }
            }
            Step::Reopen => {
                store.close().await;
                drop(store);
                store = open(dir.path());
            }
        }
        check(&store, &model).await;
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
