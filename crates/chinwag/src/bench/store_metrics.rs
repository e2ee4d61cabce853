//! What each server's store did during a run, read from its `/metrics` before and after:
//! how many commits, how long they took, and how much of that was the journal's sync. A
//! report then shows how much of the latency was the disk's without a second tool.

use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One server's store over the run.
#[derive(Debug, Serialize)]
pub struct StoreReport {
    pub server: String,
    /// Every commit, durable or not (logins commit their coordinates without a sync).
    pub commits: u64,
    pub commit_ms: Timing,
    /// The commits that synced the journal, and those syncs.
    pub journal_syncs: u64,
    pub journal_sync_ms: Timing,
}

/// From a Prometheus histogram: the mean, and the upper bound of the bucket holding the
/// 99th percentile (the buckets double, so it is within a factor of two).
#[derive(Debug, Serialize)]
pub struct Timing {
    pub mean: f64,
    pub p99_at_most: f64,
}

/// The metrics text of the server a WebSocket URL names, if it serves plain HTTP and
/// answers within a second or two (`wss://` servers are skipped: no TLS client here).
pub async fn scrape(ws_url: &str) -> Option<String> {
    if !ws_url.starts_with("ws://") {
        return None;
    }
    let authority = super::authority(ws_url);
    let fetch = async {
        let mut tcp = TcpStream::connect(authority).await.ok()?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        (&mut tcp)
            .take(METRICS_MAX_BYTES)
            .read_to_end(&mut response)
            .await
            .ok()?;
        let response = String::from_utf8(response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?;
        (status == "200").then(|| body.to_owned())
    };
    tokio::time::timeout(SCRAPE_TIMEOUT, fetch).await.ok().flatten()
}

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Far above what a node's metrics take (a few KiB); a longer answer is cut and then
/// most likely unreadable, which only leaves that server out of the report.
const METRICS_MAX_BYTES: u64 = 4 << 20;

/// What the store did between two scrapes of one server.
pub fn between(server: &str, before: &str, after: &str) -> Option<StoreReport> {
    let delta = |name| Some(Histogram::parse(after, name)?.minus(&Histogram::parse(before, name)?));
    let commits = delta("chinwag_store_commit_seconds")?;
    let syncs = delta("chinwag_store_journal_sync_seconds")?;
    Some(StoreReport {
        server: server.to_owned(),
        commits: commits.count as u64,
        commit_ms: commits.timing(),
        journal_syncs: syncs.count as u64,
        journal_sync_ms: syncs.timing(),
    })
}

/// A histogram in seconds, as the Prometheus text format gives it: cumulative buckets.
#[derive(Debug, Default, PartialEq)]
struct Histogram {
    sum: f64,
    count: f64,
    /// (upper bound, observations at or below it), in the order given (increasing).
    buckets: Vec<(f64, f64)>,
}

impl Histogram {
    fn parse(text: &str, name: &str) -> Option<Histogram> {
        let mut h = Histogram::default();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else { continue };
            let (key, value) = rest.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            match key {
                "_sum" => h.sum = value,
                "_count" => h.count = value,
                _ => {
                    let le = key.strip_prefix("_bucket{le=\"")?.strip_suffix("\"}")?;
                    let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                    h.buckets.push((bound, value));
                }
            }
        }
        (!h.buckets.is_empty()).then_some(h)
    }

    fn minus(&self, before: &Histogram) -> Histogram {
        let buckets = self
            .buckets
            .iter()
            .zip(&before.buckets)
            .map(|(&(bound, n), &(_, m))| (bound, n - m))
            .collect();
        Histogram {
            sum: self.sum - before.sum,
            count: self.count - before.count,
            buckets,
        }
    }

    fn timing(&self) -> Timing {
        if self.count <= 0.0 {
            return Timing {
                mean: 0.0,
                p99_at_most: 0.0,
            };
        }
        let ms = |s: f64| s * 1e3;
        let p99 = self.buckets.iter().find(|(_, n)| *n >= 0.99 * self.count);
        Timing {
            mean: ms(self.sum / self.count),
            p99_at_most: p99.map_or(f64::INFINITY, |&(bound, _)| ms(bound)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A histogram as the server's metrics show it: its sum, count and cumulative buckets.
    type Shown<'a> = (f64, u64, &'a [(&'a str, u64)]);

    /// The metrics text of a server whose commits and journal syncs are as given.
    fn metrics(commits: Shown, syncs: Shown) -> String {
        let mut text = String::from("# HELP chinwag_store_commit_seconds x\n");
        for (name, (sum, count, buckets)) in [("commit", commits), ("journal_sync", syncs)] {
            let name = format!("chinwag_store_{name}_seconds");
            text += &format!("{name}_sum {sum}\n{name}_count {count}\n");
            for (le, n) in buckets {
                text += &format!("{name}_bucket{{le=\"{le}\"}} {n}\n");
            }
        }
        text
    }

    fn before() -> String {
        metrics(
            (0.5, 10, &[("0.001", 8), ("0.002", 10), ("+Inf", 10)]),
            (0.0, 0, &[("0.001", 0), ("+Inf", 0)]),
        )
    }

    fn after() -> String {
        metrics(
            (1.5, 110, &[("0.001", 8), ("0.002", 109), ("+Inf", 110)]),
            (0.05, 100, &[("0.001", 100), ("+Inf", 100)]),
        )
    }

    #[test]
    fn a_run_is_the_difference_of_two_scrapes() {
        let r = between("ws://x", &before(), &after()).unwrap();
        assert_eq!((r.commits, r.journal_syncs), (100, 100));
        assert!((r.commit_ms.mean - 10.0).abs() < 1e-9, "{r:?}");
        // 99 of the run's 100 commits took at most 2 ms and none at most 1 ms.
        assert_eq!(r.commit_ms.p99_at_most, 2.0);
        assert!((r.journal_sync_ms.mean - 0.5).abs() < 1e-9, "{r:?}");
        assert_eq!(r.journal_sync_ms.p99_at_most, 1.0);
    }

    #[test]
    fn servers_without_the_metrics_or_with_garbage_give_nothing() {
        assert!(between("ws://x", "", &after()).is_none());
        assert!(between("ws://x", &before(), "chinwag_store_commit_seconds_sum nope\n").is_none());
        let empty = between("ws://x", &before(), &before()).unwrap();
        assert_eq!((empty.commits, empty.journal_sync_ms.mean), (0, 0.0));
        assert_eq!(empty.journal_sync_ms.p99_at_most, 0.0);
    }
}
