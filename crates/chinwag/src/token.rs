//! `chinwag token`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chinwag_auth::{TokenKey, TokenPolicy};
use chinwag_core::UserId;

#[derive(clap::Args)]
pub struct Args {
    /// The user the token logs in as.
    #[arg(long)]
    user: String,
    /// Data directory holding the token key (created with a new key if missing).
    #[arg(long, env = "CHINWAG_DATA", default_value_os_t = crate::default_data())]
    data: PathBuf,
    /// Token key file; defaults to <data>/token.key.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// How long the token is valid.
    #[arg(long, default_value = "24h", value_parser = crate::parse_duration)]
    ttl: Duration,
    /// `iss` claim, for nodes configured with `tokens.issuer`.
    #[arg(long)]
    issuer: Option<String>,
    /// `aud` claim, for nodes configured with `tokens.audience`.
    #[arg(long)]
    audience: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let user =
        UserId::parse(&args.user).map_err(|e| anyhow::anyhow!("--user {:?}: {e} ({})", args.user, UserId::ALLOWED))?;
    let path = args.key_file.unwrap_or_else(|| args.data.join(chinwag_auth::KEY_FILE));
    let key = TokenKey::load_or_create(&path)?;
    let policy = TokenPolicy {
        issuer: args.issuer,
        audience: args.audience,
    };
    println!(
        "{}",
        chinwag_auth::mint(&key, &user, args.ttl, chinwag_server::now_ms(), &policy)
    );
    Ok(ExitCode::SUCCESS)
}
