//! Replication between DCs.
//!
//! Each DC writes its own changes — mailbox entries it accepted, acknowledgements made by
//! its users, coordinates of its connections — to its own gap-free stream. This crate
//! moves streams between DCs: what a stream entry *means* is the store's business; here
//! entries are opaque bytes with a stream and a seq. Everything is sans-IO: see
//! [`Replicator`].

pub mod replicator;
pub mod stream;
pub mod wire;

pub use replicator::{Action, Config, Log, PeerStatus, Replicator};
pub use stream::{StreamId, VersionVector};
pub use wire::{Wire, WireError};

#[cfg(test)]
mod sim_tests;
