//! Messages as the core and the store see them.

use std::sync::Arc;

use crate::ids::{ClientMsgId, DeviceId, MessageId, UserId};

/// A message a client asked to send; the store turns it into a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub from: UserId,
    pub to: UserId,
    pub client_id: ClientMsgId,
    pub text: String,
    /// Unix milliseconds when the session accepted the frame.
    pub at_ms: u64,
    /// The sending device's number for this send; when present it, not `client_id`, is
    /// what makes a retry recognisable.
    pub seq: Option<DeviceSeq>,
}

/// A send numbered by its device: the `seq`-th of `device`'s sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSeq {
    pub device: DeviceId,
    pub seq: u64,
}

/// A message held in a recipient's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    /// Position in the recipient's mailbox in this DC's store. Strictly increasing in commit
    /// order, which is the order sessions deliver in; local to one store, never sent.
    pub seq: u64,
    pub from: UserId,
    pub to: UserId,
    pub client_id: ClientMsgId,
    pub text: String,
    pub at_ms: u64,
}

/// Messages are shared between the store, the router and every connection they are pushed
/// to, so they travel behind an `Arc` and are never copied on fan-out.
pub type SharedMessage = Arc<Message>;

/// The store's answer to an append: what the sender is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: MessageId,
    pub at_ms: u64,
    /// The `(from, client_id)` pair was seen before; this is the first attempt's receipt
    /// and nothing new was stored or delivered.
    pub duplicate: bool,
}

impl Message {
    /// The `message` frame that pushes this message to a client, as wire text.
    pub fn encode_frame(&self) -> String {
        chinwag_proto::MessageFrame {
            id: &self.id.to_string(),
            from: self.from.as_str(),
            to: self.to.as_str(),
            text: &self.text,
            at: self.at_ms,
            client_id: self.client_id.as_str(),
        }
        .encode()
    }
}
