//! `chinwag demo`: several DCs as separate processes on loopback.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use chinwag_core::DcName;
use chinwag_gateway::pki;
use chinwag_server::Config;
use chinwag_server::config::{ClusterConfig, ClusterTiming, PeerConfig, default_link_queue, default_max_log_entries};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[derive(clap::Args)]
pub struct Args {
    /// Number of DCs: east, west, south, north, centre, then dc6, dc7…
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=64))]
    dcs: u16,
    /// Directory for the cluster credentials, the token key and each DC's data.
    #[arg(long, default_value = "chinwag-demo")]
    data: PathBuf,
    /// One JSON object per DC instead of text.
    #[arg(long)]
    json: bool,
}

const NAMES: [&str; 5] = ["east", "west", "south", "north", "centre"];

fn dc_names(n: u16) -> Vec<DcName> {
    (0..usize::from(n))
        .map(|i| NAMES.get(i).map_or_else(|| format!("dc{}", i + 1), |s| (*s).to_owned()))
        .map(|name| DcName::parse(&name).expect("valid names"))
        .collect()
}

/// Where the demo looks for ports: below Linux's default ephemeral range (32768 and up).
/// A port the OS picks for port 0 comes from that range, where any outgoing connection
/// on the machine (the first DC dialling its peers, say) can take it between the demo
/// choosing it and the DC binding it. Ports below the range are never handed out that way.
const PORTS: std::ops::Range<u16> = 20_000..32_000;

/// `n` loopback ports nobody is listening on, searched from a start that differs from
/// run to run, so demos started together rarely try the same ports.
fn free_ports(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let span = PORTS.end - PORTS.start;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    let start = (seed % u32::from(span)) as u16;
    // Each port stays bound until all are found, so none is chosen twice.
    let held: Vec<TcpListener> = (0..span)
        .map(|i| PORTS.start + (start + i) % span)
        .filter_map(|port| TcpListener::bind(("127.0.0.1", port)).ok())
        .take(n)
        .collect();
    anyhow::ensure!(held.len() == n, "fewer than {n} free ports on 127.0.0.1 in {PORTS:?}");
    Ok(held.iter().map(|l| l.local_addr()).collect::<std::io::Result<_>>()?)
}

struct Planned {
    dc: DcName,
    client: SocketAddr,
    gateway: SocketAddr,
}

/// The config of one demo DC.
fn config_for(dir: &Path, me: &Planned, all: &[Planned]) -> Config {
    let creds = dir.join("cluster");
    let mut config = Config {
        listen: me.client,
        data: dir.join(me.dc.as_str()).join("data"),
        dc: me.dc.to_string(),
        ..Config::default()
    };
    config.tokens.key_file = Some(dir.join(chinwag_auth::KEY_FILE));
    config.log.level = "info".into();
    // The demo is for trying chinwag out: its web app offers "sign in as NAME".
    config.dev.sign_in = true;
    config.cluster = Some(ClusterConfig {
        gateway_listen: me.gateway,
        ca: creds.join(pki::CA_CERT),
        cert: creds.join(pki::cert_file(&me.dc)),
        key: creds.join(pki::key_file(&me.dc)),
        peers: all
            .iter()
            .filter(|p| p.dc != me.dc)
            .map(|p| PeerConfig {
                dc: p.dc.to_string(),
                gateway: p.gateway.to_string(),
            })
            .collect(),
        timing: ClusterTiming::default(),
        link_queue: default_link_queue(),
        gossip_fanout: 0,
        max_log_entries: default_max_log_entries(),
    });
    config
}

/// Makes the credentials the demo needs, keeping any that exist.
fn ensure_credentials(dir: &Path, dcs: &[DcName]) -> anyhow::Result<()> {
    let creds = dir.join("cluster");
    if !creds.join(pki::CA_CERT).exists() {
        pki::init_cluster(&creds, &[])?;
    }
    for dc in dcs {
        if !creds.join(pki::cert_file(dc)).exists() {
            pki::issue(&creds, dc)?;
        }
    }
    chinwag_auth::TokenKey::load_or_create(&dir.join(chinwag_auth::KEY_FILE))?;
    Ok(())
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let dir = std::path::absolute(&args.data)?;
    let dcs = dc_names(args.dcs);
    ensure_credentials(&dir, &dcs)?;
    let ports = free_ports(2 * dcs.len())?;
    let plan: Vec<Planned> = dcs
        .iter()
        .zip(ports.chunks(2))
        .map(|(dc, pair)| Planned {
            dc: dc.clone(),
            client: pair[0],
            gateway: pair[1],
        })
        .collect();
    let exe = std::env::current_exe().context("cannot find the chinwag executable")?;
    let mut children = Vec::new();
    for planned in &plan {
        let node_dir = dir.join(planned.dc.as_str());
        std::fs::create_dir_all(&node_dir)?;
        let config_path = node_dir.join("config.toml");
        std::fs::write(&config_path, toml::to_string(&config_for(&dir, planned, &plan))?)?;
        let log = std::fs::File::create(node_dir.join("chinwag.log"))?;
        let child = Command::new(&exe)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("CHINWAG_LISTEN")
            .env_remove("CHINWAG_DATA")
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting DC {}", planned.dc))?;
        children.push(child);
    }
    for (planned, child) in plan.iter().zip(children.iter_mut()) {
        wait_ready(child, &planned.dc, &dir).await?;
        print_dc(planned, child.id(), args.json);
    }
    if !args.json {
        println!(
            "tokens: chinwag token --data {} --user NAME   (valid in every DC)",
            dir.display()
        );
        println!("web chat: open any DC's http URL and sign in as any name (development sign-in is on);");
        println!(
            "cluster map: the same URL + cluster, e.g. http://{}/cluster",
            plan[0].client
        );
        println!("logs in {}/<dc>/chinwag.log; Ctrl-C stops every DC", dir.display());
    }
    wait_for_stop(&mut children).await;
    Ok(ExitCode::SUCCESS)
}

async fn wait_ready(child: &mut Child, dc: &DcName, dir: &Path) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("child stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    match first {
        Ok(Ok(Some(line))) if line.starts_with("chinwag listening") => {
            // Keep draining so the DC never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(())
        }
        _ => anyhow::bail!("DC {dc} did not start; see {}/{dc}/chinwag.log", dir.display()),
    }
}

fn print_dc(p: &Planned, pid: Option<u32>, json: bool) {
    let ws = format!("ws://{}/v1/ws", p.client);
    let http = format!("http://{}/", p.client);
    if json {
        let cluster = format!("{http}cluster");
        let line = serde_json::json!({ "dc": p.dc.as_str(), "ws": ws, "http": http, "cluster": cluster, "gateway": p.gateway.to_string(), "pid": pid });
        println!("{line}");
    } else {
        println!("{:<8} {ws}  {http}  gateway {}", p.dc.as_str(), p.gateway);
    }
}

/// Runs until Ctrl-C or SIGTERM (or a DC exits on its own), then stops every DC.
async fn wait_for_stop(children: &mut [Child]) {
    let any_exit = async {
        let waits = children.iter_mut().map(|c| Box::pin(c.wait()));
        let _ = futures_util::future::select_all(waits).await;
    };
    tokio::select! {
        () = crate::serve::shutdown_signal() => {}
        () = any_exit => eprintln!("chinwag demo: a DC exited; stopping the others"),
    }
    // On Ctrl-C in a terminal the DCs got the signal too and are shutting down cleanly;
    // give them a moment, then make sure.
    let all = futures_util::future::join_all(children.iter_mut().map(|c| c.wait()));
    if tokio::time::timeout(Duration::from_secs(3), all).await.is_err() {
        for child in children.iter_mut() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_unused_and_below_the_ephemeral_range() {
        let ports = free_ports(10).unwrap();
        let distinct: std::collections::BTreeSet<_> = ports.iter().map(SocketAddr::port).collect();
        assert_eq!(distinct.len(), 10);
        assert!(distinct.iter().all(|p| PORTS.contains(p)), "{distinct:?}");
        // Released once chosen, so the DCs can bind them.
        for addr in ports {
            TcpListener::bind(addr).unwrap();
        }
    }
}
