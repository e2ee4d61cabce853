//! Validated names and identifiers.
//!
//! Every identifier that arrives from outside (a token's subject, a recipient, a client
//! message id) is checked once, here, and carried as its own type afterwards, so the rest
//! of the code never re-validates and never mixes a user id up with a DC name.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest user id, DC name, node name or client message id, in bytes.
pub const MAX_ID_BYTES: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {MAX_ID_BYTES} bytes")]
    TooLong,
    #[error("contains {0:?}; allowed: {1}")]
    BadChar(char, &'static str),
}

fn check(s: &str, allowed: fn(char) -> bool, allowed_desc: &'static str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > MAX_ID_BYTES {
        return Err(IdError::TooLong);
    }
    match s.chars().find(|&c| !allowed(c)) {
        Some(c) => Err(IdError::BadChar(c, allowed_desc)),
        None => Ok(()),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $allowed:expr, $desc:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub const ALLOWED: &'static str = $desc;

            pub fn parse(s: &str) -> Result<Self, IdError> {
                check(s, $allowed, $desc)?;
                Ok(Self(Arc::from(s)))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }
    };
}

fn user_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@')
}

fn dc_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

fn client_id_char(c: char) -> bool {
    c.is_ascii_graphic()
}

name_type!(
    /// A user, as named by the `sub` claim of their token.
    UserId,
    user_char,
    "ASCII letters, digits and _ - . @"
);
name_type!(
    /// A datacenter's name, e.g. `east`. Appears inside message ids, so it has no dots.
    DcName,
    dc_char,
    "lowercase ASCII letters, digits and -"
);
name_type!(
    /// A node's name within its DC.
    NodeName,
    dc_char,
    "lowercase ASCII letters, digits and -"
);
name_type!(
    /// The sender's idempotency key for one message.
    ClientMsgId,
    client_id_char,
    "printable ASCII without spaces"
);
name_type!(
    /// One of a user's devices, named by the device at login: its sends are numbered.
    DeviceId,
    client_id_char,
    "printable ASCII without spaces"
);

/// A message's identity, the same in every DC: the DC that accepted it, the epoch of that
/// DC's store (its creation time, so a DC rebuilt from nothing never reuses an id) and the
/// position of the message in that DC's stream of writes. Written `origin.epoch.seq` on
/// the wire with the epoch in base 36, e.g. `east.tx8k2o.42`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub u32);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let mut buf = [0u8; 7];
        let mut n = self.0;
        let mut i = buf.len();
        loop {
            i -= 1;
            buf[i] = DIGITS[(n % 36) as usize];
            n /= 36;
            if n == 0 {
                break;
            }
        }
        f.write_str(std::str::from_utf8(&buf[i..]).expect("ASCII digits"))
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl Epoch {
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > 7 || s.bytes().any(|b| !(b.is_ascii_digit() || b.is_ascii_lowercase())) {
            return None;
        }
        u32::from_str_radix(s, 36).ok().map(Epoch)
    }
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    pub origin: DcName,
    pub epoch: Epoch,
    pub seq: u64,
}

impl MessageId {
    /// Parses the wire form. Returns `None` for anything that no server could have issued.
    pub fn parse(s: &str) -> Option<Self> {
        let (rest, seq) = s.rsplit_once('.')?;
        let (origin, epoch) = rest.rsplit_once('.')?;
        Some(Self {
            origin: DcName::parse(origin).ok()?,
            epoch: Epoch::parse(epoch)?,
            seq: seq.parse().ok()?,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.origin, self.epoch, self.seq)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Where one connection of an online user lives: the DC, the node in that DC, the node's
/// incarnation (bumped on every start, so coordinates from before a crash can be told
/// apart) and the connection number within that incarnation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Coordinate {
    pub dc: DcName,
    pub node: NodeName,
    pub incarnation: u64,
    pub conn: u64,
}

impl Coordinate {
    /// The connection's name as shown to the client in `welcome`.
    pub fn connection_label(&self) -> String {
        format!("{}.{}", self.incarnation, self.conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_validated() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("a.b-c_d@example.org").is_ok());
        assert_eq!(UserId::parse(""), Err(IdError::Empty));
        assert_eq!(UserId::parse(&"x".repeat(65)), Err(IdError::TooLong));
        assert!(matches!(UserId::parse("bob smith"), Err(IdError::BadChar(' ', _))));
        assert!(UserId::parse("bøb").is_err());
    }

    #[test]
    fn message_ids_round_trip() {
        let id = MessageId {
            origin: DcName::parse("east-2").unwrap(),
            epoch: Epoch(1_795_770_000),
            seq: 42,
        };
        assert_eq!(id.to_string(), "east-2.tp5l00.42");
        assert_eq!(MessageId::parse("east-2.tp5l00.42"), Some(id));
        assert_eq!(MessageId::parse("east.1"), None);
        assert_eq!(MessageId::parse("East.1.1"), None);
        assert_eq!(MessageId::parse("east.1.-1"), None);
        assert_eq!(MessageId::parse("east.ZZ.1"), None);
        assert_eq!(MessageId::parse("east.zzzzzzzz.1"), None);
    }

    proptest::proptest! {
        #[test]
        fn epochs_round_trip(n in proptest::prelude::any::<u32>()) {
            proptest::prop_assert_eq!(Epoch::parse(&Epoch(n).to_string()), Some(Epoch(n)));
        }
    }

    #[test]
    fn ids_deserialize_with_validation() {
        let ok: Result<UserId, _> = serde_json::from_str("\"bob\"");
        assert!(ok.is_ok());
        let bad: Result<UserId, _> = serde_json::from_str("\"b b\"");
        assert!(bad.is_err());
    }
}
