//! `chinwag chat`: an interactive terminal client.
//!
//! Lines typed are sent to the current recipient (`@name text` sends to `name` and makes
//! it current; `/to name` only switches). Incoming messages are printed and acknowledged.
//! If the connection drops it reconnects and resends what was not yet accepted, with the
//! same numbers, so nothing is lost or sent twice. Each run is a device of its own (its
//! unaccepted sends live only as long as the process), numbering its sends from 1.

use std::collections::{HashSet, VecDeque};
use std::process::ExitCode;
use std::time::Duration;

use chinwag_client::{ClientError, Connection};
use chinwag_proto::{ClientFrame, ServerFrame};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::ServerArgs;
use crate::clients::{new_client_id, random_hex};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Initial recipient.
    #[arg(long)]
    to: Option<String>,
}

/// How long to wait, after input ends, for sent messages to be accepted.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

struct Outgoing {
    client_id: String,
    seq: u64,
    to: String,
    text: String,
}

#[derive(Default)]
struct Chat {
    to: Option<String>,
    /// This run's device name, and how many sends it has numbered.
    device: String,
    numbered: u64,
    /// Sent, not yet accepted; resent after a reconnect.
    unaccepted: VecDeque<Outgoing>,
    shown: HashSet<String>,
    input_done: bool,
}

enum Line {
    Send { to: String, text: String },
    Switch(String),
    Quit,
    Nothing,
    Help,
}

fn parse_line(line: &str, current: Option<&str>) -> Result<Line, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Line::Nothing);
    }
    if line == "/quit" {
        return Ok(Line::Quit);
    }
    if line == "/help" {
        return Ok(Line::Help);
    }
    if let Some(name) = line.strip_prefix("/to ") {
        return Ok(Line::Switch(name.trim().to_owned()));
    }
    if let Some(rest) = line.strip_prefix('@') {
        let (to, text) = rest.split_once(' ').ok_or("write `@name message`")?;
        return Ok(Line::Send {
            to: to.to_owned(),
            text: text.trim().to_owned(),
        });
    }
    match current {
        Some(to) => Ok(Line::Send {
            to: to.to_owned(),
            text: line.to_owned(),
        }),
        None => Err("no recipient yet: write `@name message` or `/to name`".into()),
    }
}

const HELP: &str = "@name text: send to name | text: send to the current recipient | /to name | /quit";

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut chat = Chat {
        to: args.to,
        device: format!("chat-{}", random_hex(8)),
        ..Chat::default()
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut attempt = 0u32;
    loop {
        let (mut conn, welcome) = match args.server.login(Some(&chat.device)).await {
            Ok(ok) => ok,
            Err(e @ (ClientError::Server { .. } | ClientError::Protocol(_))) => {
                anyhow::bail!("{e}")
            }
            Err(e) => {
                eprintln!("* {e}; reconnecting");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt.min(10) + 1))).await;
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        println!(
            "* connected as {} (dc {}, node {}). {HELP}",
            welcome.user, welcome.dc, welcome.node
        );
        for out in &chat.unaccepted {
            conn.send(&send_frame(out)).await?;
        }
        match chat.session(&mut conn, &mut lines).await {
            Ok(()) => {
                let _ = conn.close().await;
                return Ok(ExitCode::SUCCESS);
            }
            Err(ClientError::Server { code, message }) => anyhow::bail!("{code}: {message}"),
            Err(e) => eprintln!("* connection lost ({e}); reconnecting"),
        }
    }
}

fn send_frame(out: &Outgoing) -> ClientFrame {
    ClientFrame::Send {
        to: out.to.clone(),
        client_id: out.client_id.clone(),
        text: out.text.clone(),
        seq: Some(out.seq),
    }
}

impl Chat {
    /// Runs until input ends and everything sent is accepted (`Ok`), or the connection
    /// fails (`Err`).
    async fn session(
        &mut self,
        conn: &mut Connection,
        lines: &mut tokio::io::Lines<BufReader<tokio::io::Stdin>>,
    ) -> Result<(), ClientError> {
        let mut flush_deadline: Option<Instant> = None;
        loop {
            if self.input_done && self.unaccepted.is_empty() {
                return Ok(());
            }
            if self.input_done && flush_deadline.is_none() {
                flush_deadline = Some(Instant::now() + FLUSH_TIMEOUT);
            }
            tokio::select! {
                line = lines.next_line(), if !self.input_done => match line {
                    Ok(Some(line)) => self.typed(conn, &line).await?,
                    Ok(None) | Err(_) => self.input_done = true,
                },
                frame = conn.recv() => self.received(conn, frame?).await?,
                () = tokio::time::sleep_until(flush_deadline.unwrap_or_else(Instant::now)), if flush_deadline.is_some() => {
                    eprintln!("* {} message(s) not accepted before exit", self.unaccepted.len());
                    return Ok(());
                }
            }
        }
    }

    async fn typed(&mut self, conn: &mut Connection, line: &str) -> Result<(), ClientError> {
        match parse_line(line, self.to.as_deref()) {
            Ok(Line::Send { to, text }) => {
                self.numbered += 1;
                let out = Outgoing {
                    client_id: new_client_id(),
                    seq: self.numbered,
                    to: to.clone(),
                    text,
                };
                conn.send(&send_frame(&out)).await?;
                self.unaccepted.push_back(out);
                self.to = Some(to);
            }
            Ok(Line::Switch(to)) => {
                println!("* now talking to {to}");
                self.to = Some(to);
            }
            Ok(Line::Quit) => self.input_done = true,
            Ok(Line::Help) => println!("* {HELP}"),
            Ok(Line::Nothing) => {}
            Err(hint) => println!("* {hint}"),
        }
        Ok(())
    }

    async fn received(&mut self, conn: &mut Connection, frame: ServerFrame) -> Result<(), ClientError> {
        match frame {
            ServerFrame::Message { id, from, text, .. } => {
                if self.shown.insert(id.clone()) {
                    println!("{from}: {text}");
                }
                conn.send(&ClientFrame::Ack { ids: vec![id] }).await?;
            }
            ServerFrame::Sent { client_id, .. } => {
                if let Some(i) = self.unaccepted.iter().position(|o| o.client_id == client_id) {
                    let out = self.unaccepted.remove(i).expect("position is in range");
                    println!("* sent to {}", out.to);
                }
            }
            ServerFrame::Error {
                code,
                message,
                client_id,
                ..
            } => {
                if let Some(c) = client_id {
                    self.unaccepted.retain(|o| o.client_id != c);
                }
                println!("* error {code}: {message}");
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_parsed() {
        assert!(
            matches!(parse_line("@bob hi there", None), Ok(Line::Send { to, text }) if to == "bob" && text == "hi there")
        );
        assert!(matches!(parse_line("hello", Some("carol")), Ok(Line::Send { to, .. }) if to == "carol"));
        assert!(parse_line("hello", None).is_err());
        assert!(matches!(parse_line("/to dave", None), Ok(Line::Switch(to)) if to == "dave"));
        assert!(matches!(parse_line("  ", None), Ok(Line::Nothing)));
        assert!(matches!(parse_line("/quit", None), Ok(Line::Quit)));
    }
}
