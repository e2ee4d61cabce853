//! `chinwag cluster`: credentials for a multi-DC deployment.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chinwag_core::DcName;
use chinwag_gateway::pki;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create the cluster CA, a certificate for each DC and the shared token key.
    Init {
        /// Directory for the credentials (created; existing files are never overwritten).
        #[arg(long, default_value = "chinwag-cluster")]
        dir: PathBuf,
        /// A DC of the cluster; repeat for each.
        #[arg(long = "dc", required = true)]
        dcs: Vec<String>,
    },
    /// Issue a certificate for a DC joining an existing cluster.
    AddDc {
        #[arg(long, default_value = "chinwag-cluster")]
        dir: PathBuf,
        #[arg(long)]
        dc: String,
    },
}

pub fn parse_dc(name: &str) -> anyhow::Result<DcName> {
    DcName::parse(name).map_err(|e| anyhow::anyhow!("DC name {name:?}: {e} ({})", DcName::ALLOWED))
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init { dir, dcs } => {
            let dcs = dcs.iter().map(|d| parse_dc(d)).collect::<anyhow::Result<Vec<_>>>()?;
            pki::init_cluster(&dir, &dcs)?;
            chinwag_auth::TokenKey::load_or_create(&dir.join(chinwag_auth::KEY_FILE))?;
            println!("cluster credentials in {}:", dir.display());
            println!(
                "  {} (every DC)  {} (keep offline)  {} (every DC)",
                pki::CA_CERT,
                pki::CA_KEY,
                chinwag_auth::KEY_FILE
            );
            for dc in &dcs {
                println!("  {} {} (DC {dc} only)", pki::cert_file(dc), pki::key_file(dc));
            }
        }
        Command::AddDc { dir, dc } => {
            let dc = parse_dc(&dc)?;
            pki::issue(&dir, &dc).with_context(|| format!("issuing a certificate for {dc}"))?;
            println!(
                "{} and {} written to {}",
                pki::cert_file(&dc),
                pki::key_file(&dc),
                dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
