//! The chinwag access node.
//!
//! This crate is the edge: sockets, tasks, timers and the wiring of a node. It holds no
//! protocol logic of its own: client sessions are `chinwag_core::Session`s, storage is
//! whatever implements `chinwag_core::Store`, and delivery goes through the
//! `chinwag_core::Router` implemented by this node's connection [`registry`].

pub mod cluster;
pub mod config;
mod connection;
pub mod edge;
mod http;
pub mod metrics;
pub mod node;
pub mod registry;
mod web;

pub use config::{Config, ConfigError, LogFormat};
pub use connection::now_ms;
pub use node::{Node, NodeError, run};
