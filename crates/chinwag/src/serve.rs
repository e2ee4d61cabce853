//! `chinwag serve`.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chinwag_server::{Config, LogFormat, Node};
use tracing_subscriber::EnvFilter;

#[derive(clap::Args)]
pub struct Args {
    /// TOML config file; keys are documented in docs/operations.md.
    #[arg(long, env = "CHINWAG_CONFIG")]
    config: Option<PathBuf>,
    /// Address for HTTP and WebSocket clients (overrides `listen`).
    #[arg(long, env = "CHINWAG_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (overrides `data`).
    #[arg(long, env = "CHINWAG_DATA")]
    data: Option<PathBuf>,
    /// Directory of the store's journal, best on a device of its own (overrides
    /// `store.journal_dir`).
    #[arg(long, env = "CHINWAG_JOURNAL_DIR")]
    journal_dir: Option<PathBuf>,
    /// Development only: let anyone sign in as any user (sets `dev.sign_in`).
    #[arg(long, env = "CHINWAG_DEV_SIGN_IN")]
    dev_sign_in: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(data) = args.data {
        config.data = data;
    }
    if let Some(dir) = args.journal_dir {
        config.store.journal_dir = Some(dir);
    }
    if args.dev_sign_in {
        config.dev.sign_in = true;
    }
    config.validate()?;
    init_logging(&config)?;

    let listener = listen(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let (dc, node_name) = (config.dc.clone(), config.node.clone());
    let (http, ws) = if config.tls.is_some() {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    let node = Node::start(config, listener).await?;
    let addr = node.local_addr()?;
    // One line on stdout, once the node is ready, for people and scripts; logs go to stderr.
    println!("chinwag listening on {http}://{addr} (dc {dc}, node {node_name}), WebSocket at {ws}://{addr}/v1/ws");
    std::io::stdout().flush()?;
    node.serve(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Connections waiting to be accepted. The usual default (1024) overflows when thousands
/// of clients reconnect at once, and an overflowed SYN costs the client a one-second retry.
const LISTEN_BACKLOG: u32 = 8192;

fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    // RUST_LOG, when set, wins over the config file: it is how one debugs a running setup.
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log.level))
        .with_context(|| format!("log.level {:?} is not a valid filter", config.log.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "SIGTERM handler unavailable; stop with Ctrl-C");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}
