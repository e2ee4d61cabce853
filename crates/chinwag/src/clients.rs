//! `chinwag send` and `chinwag listen`: one-shot clients for people and scripts.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chinwag_client::{ClientError, Connection};
use chinwag_proto::{ClientFrame, ErrorCode, ServerFrame};
use tokio::time::Instant;

use crate::ServerArgs;

/// Exit code of `listen` when `--count` messages did not arrive before `--timeout`.
const EXIT_TOO_FEW: u8 = 3;

#[derive(clap::Args)]
pub struct SendArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Recipient user id.
    #[arg(long)]
    to: String,
    /// Idempotency key; a random one if not given. Retries reuse it, so the message is
    /// delivered at most once however often the connection fails.
    #[arg(long)]
    client_id: Option<String>,
    /// Give up if the message is not accepted within this time.
    #[arg(long, default_value = "10s", value_parser = crate::parse_duration)]
    timeout: Duration,
    /// The message text.
    text: String,
}

#[derive(clap::Args)]
pub struct ListenArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Exit after this long (exit code 3 if --count was given and not reached).
    #[arg(long, value_parser = crate::parse_duration)]
    timeout: Option<Duration>,
}

/// A new idempotency key: time-ordered, so that one process's keys increase (the server
/// checks a key above the sender's highest without a lookup), then random, so that two
/// devices of one user never pick the same key.
pub fn new_client_id() -> String {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = chinwag_server::now_ms();
    let next = |last: u64| now.max(last + 1);
    // The closure always yields a value, so `fetch_update` returns the previous one.
    let last = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| Some(next(last)))
        .unwrap_or_else(|last| last);
    format!("{:012x}{}", next(last), random_hex(8))
}

/// `bytes` random bytes, in hex.
pub fn random_hex(bytes: usize) -> String {
    let mut random = vec![0u8; bytes];
    getrandom::fill(&mut random).expect("the OS provides randomness");
    random.iter().map(|b| format!("{b:02x}")).collect()
}

/// Errors worth retrying on a new connection with the same idempotency key.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Server { code, .. } => matches!(
            code,
            ErrorCode::Unavailable | ErrorCode::ServerBusy | ErrorCode::RateLimited
        ),
        ClientError::Connect { .. } | ClientError::Closed(_) | ClientError::Transport(_) => true,
        ClientError::Protocol(_) => false,
    }
}

/// Waits before the next attempt: 100 ms, doubling to 2 s.
async fn backoff(attempt: u32) {
    let ms = 100u64.saturating_mul(1 << attempt.min(5)).min(2_000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

pub async fn send(args: SendArgs) -> anyhow::Result<ExitCode> {
    let client_id = args.client_id.unwrap_or_else(new_client_id);
    let deadline = Instant::now() + args.timeout;
    let mut attempt = 0;
    loop {
        let try_once = async {
            let (mut conn, _) = args.server.login(None).await?;
            let sent = conn.send_message(&args.to, &client_id, &args.text).await?;
            let _ = conn.close().await;
            Ok::<_, ClientError>(sent)
        };
        let result = tokio::time::timeout_at(deadline, try_once).await;
        match result {
            Ok(Ok(sent)) => {
                let json = serde_json::json!({ "client_id": sent.client_id, "id": sent.id, "at": sent.at });
                println!("{json}");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Err(e)) if is_transient(&e) && Instant::now() < deadline => {
                eprintln!("chinwag send: {e}; retrying with client_id {client_id}");
                backoff(attempt).await;
                attempt += 1;
            }
            Ok(Err(e)) => anyhow::bail!("{e}"),
            Err(_) => anyhow::bail!("not accepted within {}", humantime::format_duration(args.timeout)),
        }
    }
}

/// Remembers the ids printed recently, so a message redelivered after a reconnect (its
/// acknowledgement was lost with the connection) is acknowledged again but printed once.
struct Seen {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Seen {
    const MAX: usize = 100_000;

    fn new() -> Self {
        Self {
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    fn first_time(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == Self::MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(id.to_owned());
        self.set.insert(id.to_owned());
        true
    }
}

pub async fn listen(args: ListenArgs) -> anyhow::Result<ExitCode> {
    let deadline = args.timeout.map(|t| Instant::now() + t);
    let mut listener = Listener {
        seen: Seen::new(),
        printed: 0,
        unacked: HashSet::new(),
        count: args.count,
    };
    let mut attempt = 0;
    loop {
        let connected = until(deadline, args.server.login(None)).await;
        let mut conn = match connected {
            None => return Ok(listener.timed_out()),
            Some(Ok((conn, _))) => conn,
            Some(Err(e)) if is_transient(&e) => {
                eprintln!("chinwag listen: {e}; reconnecting");
                backoff(attempt).await;
                attempt += 1;
                continue;
            }
            Some(Err(e)) => anyhow::bail!("{e}"),
        };
        attempt = 0;
        // Anything unacknowledged on the old connection comes back on this one.
        listener.unacked.clear();
        match listener.run(&mut conn, deadline).await {
            Ok(code) => {
                let _ = conn.close().await;
                return Ok(code);
            }
            Err(e) if is_transient(&e) => eprintln!("chinwag listen: {e}; reconnecting"),
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

struct Listener {
    seen: Seen,
    printed: u64,
    unacked: HashSet<String>,
    count: Option<u64>,
}

/// How long `listen` waits for outstanding acknowledgements to become durable once it
/// has decided to stop.
const ACK_GRACE: Duration = Duration::from_secs(5);

impl Listener {
    fn done(&self) -> bool {
        self.count.is_some_and(|n| self.printed >= n)
    }

    fn timed_out(&self) -> ExitCode {
        match self.count {
            Some(n) if self.printed < n => ExitCode::from(EXIT_TOO_FEW),
            _ => ExitCode::SUCCESS,
        }
    }

    async fn run(&mut self, conn: &mut Connection, deadline: Option<Instant>) -> Result<ExitCode, ClientError> {
        let mut stop_by: Option<Instant> = None;
        loop {
            if (self.done() || stop_by.is_some()) && self.unacked.is_empty() {
                return Ok(if self.done() {
                    ExitCode::SUCCESS
                } else {
                    self.timed_out()
                });
            }
            let wait_until = stop_by.or(deadline);
            let frame = match until(wait_until, conn.recv()).await {
                Some(frame) => frame?,
                None if stop_by.is_none() => {
                    stop_by = Some(Instant::now() + ACK_GRACE);
                    continue;
                }
                None => return Ok(self.timed_out()),
            };
            match frame {
                ServerFrame::Message {
                    id,
                    from,
                    to,
                    text,
                    at,
                    client_id,
                } => {
                    if self.done() {
                        // Past --count: leave it in the mailbox for the next reader.
                        continue;
                    }
                    if self.seen.first_time(&id) {
                        let json = serde_json::json!({ "id": id, "from": from, "to": to, "text": text, "at": at, "client_id": client_id });
                        let mut out = std::io::stdout().lock();
                        // A closed stdout (e.g. `| head`) ends the listener like a signal would.
                        if writeln!(out, "{json}").and_then(|()| out.flush()).is_err() {
                            return Ok(ExitCode::SUCCESS);
                        }
                        self.printed += 1;
                    }
                    self.unacked.insert(id.clone());
                    conn.send(&ClientFrame::Ack { ids: vec![id] }).await?;
                    if self.done() && stop_by.is_none() {
                        stop_by = Some(Instant::now() + ACK_GRACE);
                    }
                }
                ServerFrame::Acked { ids } => {
                    for id in ids {
                        self.unacked.remove(&id);
                    }
                }
                ServerFrame::Error { code, message, .. } => {
                    eprintln!("chinwag listen: server error {code}: {message}")
                }
                _ => {}
            }
        }
    }
}

/// Runs `fut` until `deadline`; `None` if the deadline came first.
pub async fn until<T>(deadline: Option<Instant>, fut: impl std::future::Future<Output = T>) -> Option<T> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at, fut).await.ok(),
        None => Some(fut.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_client_ids_increase_are_valid_and_never_repeat() {
        let ids: Vec<String> = (0..1000).map(|_| new_client_id()).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids must increase within a process"
        );
        for id in &ids {
            chinwag_core::ClientMsgId::parse(id).unwrap();
        }
        let random: HashSet<&str> = ids.iter().map(|id| &id[12..]).collect();
        assert_eq!(random.len(), ids.len());
    }
}
