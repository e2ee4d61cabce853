//! The chinwag messaging core.
//!
//! It knows users, messages, mailboxes and coordinates, and talks to exactly two things:
//! a [`Store`] and a [`Router`]. It does not know how many nodes or DCs there are, where
//! the store keeps its data or how a push reaches a socket; those are plugged in behind
//! the two traits. Nothing here performs I/O or reads a clock.

pub mod auth;
pub mod ids;
pub mod message;
pub mod ratelimit;
pub mod router;
pub mod session;
pub mod store;

pub use auth::{AuthError, Authenticate};
pub use ids::{ClientMsgId, Coordinate, DcName, DeviceId, Epoch, IdError, MessageId, NodeName, UserId};
pub use message::{DeviceSeq, Message, NewMessage, Receipt, SharedMessage};
pub use router::{Delivery, DeliveryStats, PushOutcome, Router};
pub use session::{Output, Session, SessionLimits};
pub use store::{CommitListener, Store, StoreError};
