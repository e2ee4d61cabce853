//! A small client for chinwag protocol v1.
//!
//! It speaks the same frames as any other client, through a real WebSocket; the CLI, the
//! load generator and the integration tests all use it, so they exercise exactly what a
//! third-party client would.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chinwag_proto::{ClientFrame, ErrorCode, Limits, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

pub use tokio_tungstenite::tungstenite;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {detail}")]
    Connect { url: String, detail: String },
    #[error("connection closed by the server{}", .0.as_ref().map(|(c, r)| format!(" (code {c}: {r})")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    #[error("server error {code}: {message}")]
    Server { code: ErrorCode, message: String },
    #[error("unexpected from server: {0}")]
    Protocol(String),
    #[error("transport: {0}")]
    Transport(#[from] tungstenite::Error),
}

/// What the server said at login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub user: String,
    pub dc: String,
    pub node: String,
    pub connection: String,
    pub limits: Limits,
}

/// The server's acceptance of one sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub client_id: String,
    pub id: String,
    pub at: u64,
}

/// Turns what a user types (`127.0.0.1:7700`, `http://host:7700`, `ws://host:7700/v1/ws`)
/// into the WebSocket URL of protocol v1.
pub fn ws_url(server: &str) -> String {
    let server = server.trim_end_matches('/');
    let (scheme, rest) = match server.split_once("://") {
        Some(("http", rest)) => ("ws", rest),
        Some(("https", rest)) => ("wss", rest),
        Some((scheme, rest)) => (scheme, rest),
        None => ("ws", server),
    };
    if rest.contains('/') {
        format!("{scheme}://{rest}")
    } else {
        format!("{scheme}://{rest}/v1/ws")
    }
}

/// The roots `wss://` servers are checked against: `ca` if given, else the system's.
fn tls_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            for cert in certs {
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        None => {
            // Unreadable system certificates are skipped; if none is left, the handshake
            // says so.
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

pub struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames read while waiting for something else, returned by later `recv`s.
    pending: VecDeque<ServerFrame>,
}

/// How to reach a server, beyond its address.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// PEM file with the certificate authority (or the self-signed certificate) to trust
    /// for `wss://` servers, instead of the system's roots.
    pub ca: Option<PathBuf>,
    /// An `Origin` header to send, as a browser would.
    pub origin: Option<String>,
    /// Ask for `delivered` receipts for what this connection's user sends.
    pub receipts: bool,
    /// Name the device at login, so that sends can be numbered
    /// ([`Connection::send_numbered`]).
    pub device: Option<String>,
}

impl Connection {
    pub async fn connect(server: &str) -> Result<Self, ClientError> {
        Self::connect_with(server, &ConnectOptions::default()).await
    }

    pub async fn connect_with(server: &str, options: &ConnectOptions) -> Result<Self, ClientError> {
        let url = ws_url(server);
        let failed = |detail: String| ClientError::Connect {
            url: url.clone(),
            detail,
        };
        let mut request = url.as_str().into_client_request().map_err(|e| failed(e.to_string()))?;
        if let Some(origin) = &options.origin {
            let value = origin.parse().map_err(|_| failed(format!("bad origin {origin:?}")))?;
            request.headers_mut().insert("origin", value);
        }
        let connector = if url.starts_with("wss://") {
            Some(Connector::Rustls(tls_config(options.ca.as_deref()).map_err(failed)?))
        } else {
            None
        };
        let (ws, _) = tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector)
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok(Self {
            ws,
            pending: VecDeque::new(),
        })
    }

    /// Connects and logs in.
    pub async fn login(server: &str, token: &str) -> Result<(Self, Welcome), ClientError> {
        Self::login_with(server, token, &ConnectOptions::default()).await
    }

    /// Connects with `options` and logs in.
    pub async fn login_with(
        server: &str,
        token: &str,
        options: &ConnectOptions,
    ) -> Result<(Self, Welcome), ClientError> {
        let mut conn = Self::connect_with(server, options).await?;
        conn.send(&ClientFrame::Login {
            token: token.into(),
            receipts: options.receipts,
            device: options.device.clone(),
        })
        .await?;
        loop {
            match conn.recv().await? {
                ServerFrame::Welcome {
                    user,
                    dc,
                    node,
                    connection,
                    limits,
                    ..
                } => {
                    let welcome = Welcome {
                        user,
                        dc,
                        node,
                        connection,
                        limits,
                    };
                    return Ok((conn, welcome));
                }
                ServerFrame::Error { code, message, .. } => {
                    return Err(ClientError::Server { code, message });
                }
                other => conn.pending.push_back(other),
            }
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        self.send_raw(WsMessage::text(chinwag_proto::encode_client(frame)))
            .await
    }

    /// Sends any WebSocket message, valid or not.
    pub async fn send_raw(&mut self, msg: WsMessage) -> Result<(), ClientError> {
        self.ws.send(msg).await.map_err(ClientError::from)
    }

    /// The next frame from the server. A close becomes [`ClientError::Closed`].
    pub async fn recv(&mut self) -> Result<ServerFrame, ClientError> {
        if let Some(frame) = self.pending.pop_front() {
            return Ok(frame);
        }
        loop {
            match self.ws.next().await {
                Some(Ok(WsMessage::Text(text))) => {
                    return chinwag_proto::decode_server(text.as_str())
                        .map_err(|e| ClientError::Protocol(format!("{e}: {}", text.as_str())));
                }
                Some(Ok(WsMessage::Close(frame))) => return Err(closed(frame)),
                Some(Ok(WsMessage::Binary(_))) => {
                    return Err(ClientError::Protocol("binary frame".into()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(ClientError::Closed(None)),
            }
        }
    }

    /// Sends a message and waits for the server to accept or refuse it. Frames that arrive
    /// meanwhile are kept for [`Connection::recv`].
    pub async fn send_message(&mut self, to: &str, client_id: &str, text: &str) -> Result<Sent, ClientError> {
        self.send_and_wait(to, client_id, text, None).await
    }

    /// [`Connection::send_message`] numbered `seq` of the device named at login: a retry
    /// is recognised by the number.
    pub async fn send_numbered(
        &mut self,
        to: &str,
        client_id: &str,
        seq: u64,
        text: &str,
    ) -> Result<Sent, ClientError> {
        self.send_and_wait(to, client_id, text, Some(seq)).await
    }

    async fn send_and_wait(
        &mut self,
        to: &str,
        client_id: &str,
        text: &str,
        seq: Option<u64>,
    ) -> Result<Sent, ClientError> {
        let frame = ClientFrame::Send {
            to: to.into(),
            client_id: client_id.into(),
            text: text.into(),
            seq,
        };
        self.send(&frame).await?;
        let mut held = Vec::new();
        let result = loop {
            match self.next_from_wire().await {
                Ok(ServerFrame::Sent { client_id: c, id, at }) if c == client_id => {
                    break Ok(Sent { client_id: c, id, at });
                }
                Ok(ServerFrame::Error {
                    code,
                    message,
                    client_id: Some(c),
                    ..
                }) if c == client_id => break Err(ClientError::Server { code, message }),
                Ok(other) => held.push(other),
                Err(e) => break Err(e),
            }
        };
        self.pending.extend(held);
        result
    }

    /// Acknowledges messages and waits until the server says the acknowledgement is
    /// durable.
    pub async fn ack(&mut self, ids: Vec<String>) -> Result<(), ClientError> {
        let expected = ids.clone();
        self.send(&ClientFrame::Ack { ids }).await?;
        let mut held = Vec::new();
        let result = loop {
            match self.next_from_wire().await {
                Ok(ServerFrame::Acked { ids }) if ids == expected => break Ok(()),
                Ok(ServerFrame::Error {
                    code,
                    message,
                    client_id: None,
                    ..
                }) if code == ErrorCode::Unavailable => {
                    break Err(ClientError::Server { code, message });
                }
                Ok(other) => held.push(other),
                Err(e) => break Err(e),
            }
        };
        self.pending.extend(held);
        result
    }

    /// Reads past `pending`, straight from the socket.
    async fn next_from_wire(&mut self) -> Result<ServerFrame, ClientError> {
        let held = std::mem::take(&mut self.pending);
        let result = self.recv().await;
        let newer = std::mem::replace(&mut self.pending, held);
        self.pending.extend(newer);
        result
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.ws.close(None).await?;
        // Drain until the server's close arrives so the close handshake completes.
        while let Some(Ok(_)) = self.ws.next().await {}
        Ok(())
    }
}

fn closed(frame: Option<CloseFrame>) -> ClientError {
    ClientError::Closed(frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())))
}

#[cfg(test)]
mod tests {
    use super::ws_url;

    #[test]
    fn server_addresses_become_v1_urls() {
        assert_eq!(ws_url("127.0.0.1:7700"), "ws://127.0.0.1:7700/v1/ws");
        assert_eq!(ws_url("http://h:1/"), "ws://h:1/v1/ws");
        assert_eq!(ws_url("https://h"), "wss://h/v1/ws");
        assert_eq!(ws_url("ws://h:1/v1/ws"), "ws://h:1/v1/ws");
    }
}
