//! How a session turns a login token into a user.

use crate::ids::UserId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Checks a login token. Pure: the caller supplies the time, so sessions stay sans-IO.
pub trait Authenticate: Send + Sync + 'static {
    fn authenticate(&self, token: &str, now_ms: u64) -> Result<UserId, AuthError>;
}
