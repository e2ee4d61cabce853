//! The `chinwag` command: the server and its command-line clients in one binary.

mod bench;
mod chat;
mod clients;
mod cluster;
mod demo;
mod serve;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// glibc's allocator spent about a sixth of the server's CPU at saturation (see
/// docs/performance.md); mimalloc is made for many threads allocating small objects.
/// Built without transparent huge pages (`no_thp`): a growing heap then faults in 4 KiB
/// at a time instead of zeroing 2 MiB per touch, which costs a few per cent of peak
/// throughput but a tenth of idle memory and much of a cold node's first burst.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "chinwag",
    version,
    about = "Instant messaging, active-active across datacenters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (zero config: a single-DC node on 127.0.0.1:7700, data in ./chinwag-data).
    Serve(serve::Args),
    /// Print a login token for a user, signed with the data directory's token key.
    Token(token::Args),
    /// Send one message and print the server's acceptance as JSON.
    Send(clients::SendArgs),
    /// Print received messages as JSON lines, acknowledging each.
    Listen(clients::ListenArgs),
    /// Chat interactively in the terminal.
    Chat(chat::Args),
    /// Credentials for a deployment of several DCs.
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Run several DCs as separate processes on this machine, linked by their gateways.
    Demo(demo::Args),
    /// Load a server with real WebSocket clients and measure it.
    Bench(bench::Args),
}

/// Where a client finds the server and its token.
#[derive(clap::Args, Clone)]
pub struct ServerArgs {
    /// Server address: `host:port`, `http://host:port` or a full `ws://` URL.
    #[arg(long, env = "CHINWAG_SERVER", default_value = "127.0.0.1:7700")]
    pub server: String,
    /// Login token (see `chinwag token`).
    #[arg(long, env = "CHINWAG_TOKEN", hide_env_values = true)]
    pub token: String,
    /// For `wss://` servers with a private certificate authority: its PEM file (else the
    /// system's roots are used).
    #[arg(long, env = "CHINWAG_CA")]
    pub ca: Option<std::path::PathBuf>,
}

impl ServerArgs {
    /// Logs in, naming the device if it numbers its sends.
    pub async fn login(
        &self,
        device: Option<&str>,
    ) -> Result<(chinwag_client::Connection, chinwag_client::Welcome), chinwag_client::ClientError> {
        let options = chinwag_client::ConnectOptions {
            ca: self.ca.clone(),
            device: device.map(str::to_owned),
            ..Default::default()
        };
        chinwag_client::Connection::login_with(&self.server, &self.token, &options).await
    }
}

/// Parses durations such as `500ms`, `10s`, `24h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// The default data directory, shared by `serve` and `token`.
pub fn default_data() -> PathBuf {
    PathBuf::from("chinwag-data")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chinwag: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve::run(args).await,
            Command::Token(args) => token::run(args),
            Command::Send(args) => clients::send(args).await,
            Command::Listen(args) => clients::listen(args).await,
            Command::Chat(args) => chat::run(args).await,
            Command::Cluster(command) => cluster::run(command),
            Command::Demo(args) => demo::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chinwag: {e:#}");
            ExitCode::FAILURE
        }
    }
}
