//! A disk that fills up under a running node: sends fail with a clear error, nothing is
//! acknowledged that was not stored, and after space is freed and the node restarted,
//! exactly the acknowledged messages are there. The disk is a small tmpfs mounted for the
//! test, so it needs root; skipped otherwise.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use chinwag_client::ClientError;
use chinwag_proto::{ErrorCode, ServerFrame};
use common::*;

/// A tmpfs of a few MiB, unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(at: &Path, size: &str) -> Option<SmallDisk> {
        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .is_some_and(|o| o.stdout.starts_with(b"0\n"));
        if !is_root {
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallDisk { path: at.to_owned() })
    }

    /// Writes a file until the disk refuses; returns its path.
    fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let block = vec![0xAB; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        // Whatever partial block fits, so that not even a small write does.
        while file.write_all(&[0xAB]).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_sends_clearly_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("disk"), "16m") else {
        eprintln!("skipped: needs root to mount a tmpfs");
        return;
    };
    let mut node = Node::start_in(&disk.path, "");
    let mut alice = node.login("alice").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let sent = alice
            .send_message("bob", &format!("before{i}"), &format!("before {i}"))
            .await
            .unwrap();
        acked.push(sent.id);
    }

    let filler = disk.fill();
    let mut refused = 0;
    for i in 0..20 {
        match alice
            .send_message("bob", &format!("full{i}"), &format!("full {i}"))
            .await
        {
            Ok(sent) => acked.push(sent.id),
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::Unavailable, "{message}");
                assert!(
                    message.contains("space") || message.contains("commit failed"),
                    "unclear: {message}"
                );
                refused += 1;
            }
            Err(ClientError::Closed(_)) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0, "a full disk refused nothing");
    // The node itself is still up and says what is wrong.
    let (status, body) = http_request(&node.http("/healthz")).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store"), "{body}");

    std::fs::remove_file(filler).unwrap();
    node.restart();
    let mut bob = node.login("bob").await;
    let mut delivered = Vec::new();
    loop {
        match tokio::time::timeout(std::time::Duration::from_millis(500), bob.recv()).await {
            Ok(Ok(ServerFrame::Message { id, .. })) => delivered.push(id),
            Ok(other) => panic!("{other:?}"),
            Err(_) => break,
        }
    }
    assert_eq!(delivered, acked, "exactly the acknowledged messages, in order");
    drop(node);
}
