//! chinwag client protocol, version 1.
//!
//! Every frame is one WebSocket text message holding one JSON object whose `type` field names
//! the frame. This crate only describes frames and turns text into frames and back; it owns
//! no socket, no clock and no state, so the server, the CLI, the load generator and the
//! fuzzers all share one definition. `docs/protocol.md` documents every frame and error code
//! listed here, and a test keeps the two in step.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks; sent to the client in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A frame sent by a client.
///
/// Unknown fields are ignored so that newer clients can talk to older servers; an unknown
/// `type` is an error because the server cannot guess what the client meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Authenticate the connection; must be the first frame. With `receipts`, the
    /// connection also gets `delivered` receipts for what its user sends. `device` names
    /// the sending device, so that its sends can be numbered (`seq` in `send`).
    Login {
        token: String,
        #[serde(default, skip_serializing_if = "is_false")]
        receipts: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
    },
    /// Send `text` to user `to`. Without `seq`, `client_id` is the idempotency key: a
    /// retry with the same `client_id` gets the same `sent` answer and is delivered at most
    /// once. With `seq` (on a connection that named its `device`), the key is the device
    /// and `seq` instead, and `client_id` is only echoed and shown.
    Send {
        to: String,
        client_id: String,
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// Acknowledge receipt of pushed messages; acknowledged messages leave the mailbox.
    Ack { ids: Vec<String> },
    /// Application-level liveness check (browsers cannot send WebSocket pings).
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
}

/// A frame sent by the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Login succeeded. `connection` names this connection in the server's coordinates.
    Welcome {
        protocol: u32,
        user: String,
        dc: String,
        node: String,
        connection: String,
        limits: Limits,
    },
    /// The message with this `client_id` is accepted: stored durably under `id`.
    Sent {
        client_id: String,
        id: String,
        /// Acceptance time, Unix milliseconds.
        at: u64,
    },
    /// A message for the logged-in user. It is pushed again on a later connection until
    /// one of the user's connections acknowledges it.
    Message {
        id: String,
        from: String,
        to: String,
        text: String,
        at: u64,
        /// The sender's idempotency key, so the sender's other devices can recognise it.
        client_id: String,
    },
    /// These acknowledgements are durable: the messages will not be pushed again.
    Acked { ids: Vec<String> },
    /// Messages this user sent were acknowledged by a device of their recipient. Best
    /// effort: sent to the sender's connections that are open at that moment.
    Delivered { ids: Vec<String> },
    /// Answer to `ping`.
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nonce: Option<u64>,
    },
    /// Something the client sent could not be done. See [`ErrorCode`].
    Error {
        code: ErrorCode,
        message: String,
        /// Set when the error answers a `send`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_id: Option<String>,
        /// Set with `rate_limited`: when a retry can succeed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// The limits that apply to this connection, announced in `welcome` so that a client can
/// stay within them instead of discovering them by error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_text_bytes: usize,
    pub max_ack_ids: usize,
    pub max_inflight: usize,
    pub rate_per_sec: u32,
    pub burst: u32,
}

/// Every error the server reports. The wire form is the snake_case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    UnknownType,
    BadFrame,
    BinaryFrame,
    FrameTooLarge,
    Unauthenticated,
    AlreadyAuthenticated,
    BadToken,
    TokenExpired,
    LoginTimeout,
    BadRecipient,
    BadClientId,
    TextTooLarge,
    TooManyIds,
    RateLimited,
    MailboxFull,
    Unavailable,
    ServerBusy,
    TooManyConnections,
    OriginNotAllowed,
    IdleTimeout,
    BadDevice,
    BadSeq,
    SeqTooOld,
}

impl ErrorCode {
    /// All codes, for documentation checks and exhaustive tests.
    pub const ALL: [ErrorCode; 24] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::BadFrame,
        ErrorCode::BinaryFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::Unauthenticated,
        ErrorCode::AlreadyAuthenticated,
        ErrorCode::BadToken,
        ErrorCode::TokenExpired,
        ErrorCode::LoginTimeout,
        ErrorCode::BadRecipient,
        ErrorCode::BadClientId,
        ErrorCode::TextTooLarge,
        ErrorCode::TooManyIds,
        ErrorCode::RateLimited,
        ErrorCode::MailboxFull,
        ErrorCode::Unavailable,
        ErrorCode::ServerBusy,
        ErrorCode::TooManyConnections,
        ErrorCode::OriginNotAllowed,
        ErrorCode::IdleTimeout,
        ErrorCode::BadDevice,
        ErrorCode::BadSeq,
        ErrorCode::SeqTooOld,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::BinaryFrame => "binary_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::AlreadyAuthenticated => "already_authenticated",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::LoginTimeout => "login_timeout",
            ErrorCode::BadRecipient => "bad_recipient",
            ErrorCode::BadClientId => "bad_client_id",
            ErrorCode::TextTooLarge => "text_too_large",
            ErrorCode::TooManyIds => "too_many_ids",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ServerBusy => "server_busy",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::BadDevice => "bad_device",
            ErrorCode::BadSeq => "bad_seq",
            ErrorCode::SeqTooOld => "seq_too_old",
        }
    }

    /// The WebSocket close code the server sends after this error, if the error ends the
    /// connection. Errors that return `None` leave the connection usable.
    pub fn close_code(self) -> Option<u16> {
        match self {
            // 1009: "message too big" (RFC 6455 §7.4.1).
            ErrorCode::FrameTooLarge => Some(1009),
            // 1008: "policy violation": the peer is not allowed to continue.
            ErrorCode::BadToken | ErrorCode::TokenExpired | ErrorCode::LoginTimeout => Some(1008),
            // 1013: "try again later".
            ErrorCode::ServerBusy => Some(1013),
            // 1001: "going away" — the server gave up on a client it no longer hears.
            ErrorCode::IdleTimeout => Some(1001),
            _ => None,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a text frame is not a valid [`ClientFrame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// `bad_json`, `unknown_type` or `bad_frame`.
    pub code: ErrorCode,
    pub detail: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl std::error::Error for DecodeError {}

const CLIENT_TYPES: [&str; 4] = ["login", "send", "ack", "ping"];

/// Decodes one client text frame.
///
/// `send` and `ack` frames as our clients write them take one pass ([`plain`]); other
/// valid frames one typed parse after that pass gives up at their `type`. Only when both
/// fail is the text parsed again, untyped, to tell the client precisely what is wrong;
/// bad input therefore costs the sender, not the well-behaved clients.
pub fn decode_client(text: &str) -> Result<ClientFrame, DecodeError> {
    if let Some(frame) = plain::decode(text) {
        return Ok(frame);
    }
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => Ok(frame),
        Err(typed) => Err(diagnose(text, typed)),
    }
}

/// The two frames every message brings, `send` and `ack`, read in one pass when they
/// have the shape our clients write: `type` first, then only that frame's own fields,
/// each once. A tagged enum cannot know which fields to expect until it has found
/// `type`, so serde's derive first copies every field of every frame into a buffer; on
/// this path that was a third of decoding a `send`. Anything else (another order, an
/// unknown or repeated field, a wrong type) is left to the derived decoder, which stays
/// the only judge of what is valid and of every error; this path accepts a subset of
/// what it accepts, with the same result (a property test checks both).
mod plain {
    use serde::Deserialize;
    use serde::de::{self, Deserializer, MapAccess, Visitor};

    use super::ClientFrame;

    pub fn decode(text: &str) -> Option<ClientFrame> {
        serde_json::from_str::<Plain>(text).ok().map(|plain| plain.0)
    }

    struct Plain(ClientFrame);

    #[derive(Deserialize, PartialEq)]
    #[serde(field_identifier, rename_all = "snake_case")]
    enum Field {
        Type,
        To,
        ClientId,
        Text,
        Seq,
        Ids,
    }

    impl<'de> Deserialize<'de> for Plain {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(PlainVisitor)
        }
    }

    struct PlainVisitor;

    /// Only says "not this path"; the derived decoder then gives the real error.
    fn other<E: de::Error>() -> E {
        E::custom("not a plain send or ack")
    }

    impl<'de> Visitor<'de> for PlainVisitor {
        type Value = Plain;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a send or ack frame with its type first")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Plain, A::Error> {
            if map.next_key::<Field>()? != Some(Field::Type) {
                return Err(other());
            }
            // Read as borrowed text, which only a string without escapes is (a derived
            // enum would also take `{"send":null}`); anything else is left to the other path.
            let frame = match map.next_value::<&str>()? {
                "send" => send(&mut map)?,
                "ack" => ack(&mut map)?,
                _ => return Err(other()),
            };
            Ok(Plain(frame))
        }
    }

    fn send<'de, A: MapAccess<'de>>(map: &mut A) -> Result<ClientFrame, A::Error> {
        let (mut to, mut client_id, mut text, mut seq) = (None, None, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::To if to.is_none() => to = Some(map.next_value()?),
                Field::ClientId if client_id.is_none() => client_id = Some(map.next_value()?),
                Field::Text if text.is_none() => text = Some(map.next_value()?),
                Field::Seq if seq.is_none() => seq = Some(map.next_value::<Option<u64>>()?),
                _ => return Err(other()),
            }
        }
        Ok(ClientFrame::Send {
            to: to.ok_or_else(other)?,
            client_id: client_id.ok_or_else(other)?,
            text: text.ok_or_else(other)?,
            seq: seq.flatten(),
        })
    }

    fn ack<'de, A: MapAccess<'de>>(map: &mut A) -> Result<ClientFrame, A::Error> {
        let mut ids = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Ids if ids.is_none() => ids = Some(map.next_value()?),
                _ => return Err(other()),
            }
        }
        Ok(ClientFrame::Ack {
            ids: ids.ok_or_else(other)?,
        })
    }
}

fn diagnose(text: &str, typed: serde_json::Error) -> DecodeError {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return DecodeError {
                code: ErrorCode::BadJson,
                detail: e.to_string(),
            };
        }
    };
    let bad = |detail: String| DecodeError {
        code: ErrorCode::BadFrame,
        detail,
    };
    let Some(object) = value.as_object() else {
        return bad("a frame must be a JSON object".into());
    };
    match object.get("type") {
        None => bad("missing field `type`".into()),
        Some(serde_json::Value::String(t)) if !CLIENT_TYPES.contains(&t.as_str()) => DecodeError {
            code: ErrorCode::UnknownType,
            detail: format!("unknown frame type `{t}`; expected one of {CLIENT_TYPES:?}"),
        },
        Some(serde_json::Value::String(_)) => bad(typed.to_string()),
        Some(_) => bad("field `type` must be a string".into()),
    }
}

/// Encodes a server frame as the JSON text that goes on the wire.
pub fn encode_server(frame: &ServerFrame) -> String {
    // Serialising these plain structs cannot fail: no maps with non-string keys, no
    // non-finite floats.
    serde_json::to_string(frame).expect("server frames always serialise")
}

/// A `message` frame serialised straight from borrowed fields, so pushing one message to
/// many connections does not copy its text for each. Encodes exactly like
/// [`ServerFrame::Message`] (a property test compares them).
pub struct MessageFrame<'a> {
    pub id: &'a str,
    pub from: &'a str,
    pub to: &'a str,
    pub text: &'a str,
    pub at: u64,
    pub client_id: &'a str,
}

impl MessageFrame<'_> {
    /// Written by hand: one is encoded for every push, and serde_json's escaping, which
    /// looks up every byte of every field in a table, was 7.7 % of a runtime thread's time
    /// at saturation. Fields rarely need escaping, and checking that takes one pass the
    /// compiler vectorises.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(
            80 + self.id.len() + self.from.len() + self.to.len() + self.text.len() + self.client_id.len(),
        );
        out.push_str(r#"{"type":"message","id":"#);
        push_json_str(&mut out, self.id);
        out.push_str(r#","from":"#);
        push_json_str(&mut out, self.from);
        out.push_str(r#","to":"#);
        push_json_str(&mut out, self.to);
        out.push_str(r#","text":"#);
        push_json_str(&mut out, self.text);
        // Writing to a String cannot fail.
        let _ = write!(out, r#","at":{}"#, self.at);
        out.push_str(r#","client_id":"#);
        push_json_str(&mut out, self.client_id);
        out.push('}');
        out
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
fn push_json_str(out: &mut String, s: &str) {
    let plain = s
        .bytes()
        .fold(true, |plain, b| plain & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).expect("strings always serialise"));
    }
}

/// Encodes a client frame as the JSON text that goes on the wire.
pub fn encode_client(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("client frames always serialise")
}

/// Decodes one server text frame (used by clients).
pub fn decode_server(text: &str) -> Result<ServerFrame, serde_json::Error> {
    serde_json::from_str(text)
}

/// For `skip_serializing_if`: leave flags that are off out of the JSON.
fn is_false(b: &bool) -> bool {
    !b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec!["type", "to", "client_id", "text", "seq", "ids", "nonce", "extra"])
    }

    /// JSON values of every kind a field could be given, as text, including a number
    /// too large for a float, which only a decoder that parses the value refuses.
    fn json_value() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            prop::collection::vec("[a-z.0-9\\\"]{0,6}", 0..3).prop_map(|v| serde_json::to_string(&v).unwrap()),
            prop::sample::select(vec!["null", "true", "1.5", "1e400", "[1]", "{}", r#"{"a":[null]}"#])
                .prop_map(String::from),
        ]
    }

    #[test]
    fn sends_and_acks_as_our_clients_write_them_take_the_plain_path() {
        let frames = [
            ClientFrame::Send {
                to: "bob".into(),
                client_id: "c\"1".into(),
                text: "hi\n€".into(),
                seq: None,
            },
            ClientFrame::Send {
                to: "bob".into(),
                client_id: "c1".into(),
                text: String::new(),
                seq: Some(u64::MAX),
            },
            ClientFrame::Ack {
                ids: vec!["local.tp5l00.17".into(), "x".into()],
            },
            ClientFrame::Ack { ids: vec![] },
        ];
        for frame in frames {
            assert_eq!(plain::decode(&encode_client(&frame)), Some(frame));
        }
        // Left to the derived decoder, which accepts them all the same.
        for text in [
            r#"{"to":"bob","type":"send","client_id":"c","text":"t"}"#,
            r#"{"type":"send","to":"bob","client_id":"c","text":"t","later":1}"#,
            r#"{"type":"ping"}"#,
        ] {
            assert_eq!(plain::decode(text), None, "{text}");
            assert!(decode_client(text).is_ok(), "{text}");
        }
    }

    #[test]
    fn valid_frames_decode() {
        assert_eq!(
            decode_client(r#"{"type":"send","to":"bob","client_id":"c1","text":"hi"}"#),
            Ok(ClientFrame::Send {
                to: "bob".into(),
                client_id: "c1".into(),
                text: "hi".into(),
                seq: None,
            })
        );
        assert_eq!(
            decode_client(r#"{"type":"send","to":"bob","client_id":"c1","text":"hi","seq":7}"#),
            Ok(ClientFrame::Send {
                to: "bob".into(),
                client_id: "c1".into(),
                text: "hi".into(),
                seq: Some(7),
            })
        );
        assert_eq!(
            decode_client(r#"{"type":"login","token":"t","device":"phone"}"#),
            Ok(ClientFrame::Login {
                token: "t".into(),
                receipts: false,
                device: Some("phone".into()),
            })
        );
        assert_eq!(
            decode_client(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping { nonce: None })
        );
        // Unknown fields are ignored for forward compatibility.
        assert_eq!(
            decode_client(r#"{"type":"ack","ids":["a"],"extra":1}"#),
            Ok(ClientFrame::Ack { ids: vec!["a".into()] })
        );
    }

    fn code_of(text: &str) -> ErrorCode {
        decode_client(text).unwrap_err().code
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(code_of("{not json"), ErrorCode::BadJson);
        assert_eq!(code_of(""), ErrorCode::BadJson);
        assert_eq!(code_of(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code_of(r#"[1,2]"#), ErrorCode::BadFrame);
        assert_eq!(code_of(r#"{"to":"bob"}"#), ErrorCode::BadFrame);
        assert_eq!(code_of(r#"{"type":7}"#), ErrorCode::BadFrame);
        assert_eq!(code_of(r#"{"type":"send","to":"bob"}"#), ErrorCode::BadFrame);
        assert_eq!(
            code_of(r#"{"type":"send","to":5,"client_id":"c","text":"t"}"#),
            ErrorCode::BadFrame
        );
        assert_eq!(code_of(r#"{"type":"ack","ids":"x"}"#), ErrorCode::BadFrame);
    }

    #[test]
    fn missing_field_is_named() {
        let err = decode_client(r#"{"type":"send","to":"bob","text":"x"}"#).unwrap_err();
        assert!(err.detail.contains("client_id"), "{err}");
    }

    #[test]
    fn every_error_code_is_documented() {
        let doc = include_str!("../../../docs/protocol.md");
        for code in ErrorCode::ALL {
            assert!(
                doc.contains(&format!("| `{}` |", code.as_str())),
                "{code} missing from docs/protocol.md"
            );
        }
        for frame in CLIENT_TYPES
            .iter()
            .chain(&["welcome", "message", "sent", "acked", "delivered", "pong", "error"])
        {
            assert!(
                doc.contains(&format!("### `{frame}`")),
                "frame {frame} missing from docs/protocol.md"
            );
        }
    }

    #[test]
    fn error_codes_round_trip_through_json() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    proptest! {
        #[test]
        fn borrowed_message_frames_encode_like_owned_ones(
            id in "[a-z0-9.]{1,20}",
            from in "[ -~]{1,10}",
            text in "(?s).{0,50}|[\\x00-\\x7f]{0,50}",
            at in any::<u64>(),
            client_id in "[!-~]{1,64}",
        ) {
            let borrowed = MessageFrame { id: &id, from: &from, to: "b", text: &text, at, client_id: &client_id };
            let owned = ServerFrame::Message {
                id: id.clone(), from: from.clone(), to: "b".into(), text: text.clone(), at, client_id: client_id.clone(),
            };
            prop_assert_eq!(borrowed.encode(), encode_server(&owned));
        }

        #[test]
        fn decoder_never_panics(text in ".{0,300}") {
            let _ = decode_client(&text);
        }

        #[test]
        fn the_plain_path_accepts_only_what_the_derived_decoder_accepts_alike(
            kind in prop::sample::select(vec![
                r#""send""#, r#""ack""#, r#""s\u0065nd""#, r#""login""#, "7", "0", r#"{"send":null}"#, r#"{"ack":null}"#, r#"["ack"]"#,
            ]),
            text in ".{0,12}",
            seq in prop_oneof![Just(None), Just(Some("null".to_string())), any::<u64>().prop_map(|n| Some(n.to_string()))],
            ids in prop::collection::vec("[a-z.0-9\\\"]{0,6}", 0..3),
            drop in prop::option::of(0..5usize),
            extra in prop::collection::vec((any::<prop::sample::Index>(), json_key(), json_value()), 0..3),
        ) {
            // A frame as our clients write it, then perhaps a field dropped and a few put
            // anywhere (the type too), of any key and any kind of value.
            let mut pairs: Vec<(String, String)> = vec![("type".into(), kind.into())];
            if kind.contains("ack") {
                pairs.push(("ids".into(), serde_json::to_string(&ids).unwrap()));
            } else {
                for key in ["to", "client_id", "text"] {
                    pairs.push((key.into(), serde_json::to_string(&text).unwrap()));
                }
                pairs.extend(seq.map(|seq| ("seq".to_string(), seq)));
            }
            if let Some(i) = drop.filter(|&i| i < pairs.len()) {
                pairs.remove(i);
            }
            for (at, key, value) in extra {
                pairs.insert(at.index(pairs.len() + 1), (key.into(), value));
            }
            let body: Vec<String> = pairs.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
            let text = format!("{{{}}}", body.join(","));
            if let Some(frame) = plain::decode(&text) {
                prop_assert_eq!(serde_json::from_str::<ClientFrame>(&text).ok(), Some(frame), "{}", text);
            }
        }

        #[test]
        fn send_frames_round_trip(
            to in "[a-z]{1,10}",
            client_id in ".{0,20}",
            text in ".{0,100}",
            seq in proptest::option::of(any::<u64>()),
        ) {
            let frame = ClientFrame::Send { to, client_id, text, seq };
            prop_assert_eq!(decode_client(&encode_client(&frame)), Ok(frame));
        }
    }
}
