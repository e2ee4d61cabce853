//! A lower bound, kept outside the journal, on how many batches the journal must hold.
//!
//! fjall treats a journal that ends early as a write torn by a crash and replays what is
//! left. That is right after a crash, but the same repair would silently drop acknowledged
//! messages if the journal were truncated or overwritten later. So after every durable
//! commit the writer also records the commit count in this small file, without an fsync
//! of its own: whatever survives of it was written after the journal's fsync, so it never
//! claims more than the journal really had. At open, a store whose journal holds fewer
//! commits than the watermark has lost data, and is reported as damaged instead of being
//! opened.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub const FILE: &str = "watermark";

/// Mixed into the stored value so that a damaged file is recognised as such.
const CHECK: u64 = 0x6368_696e_7761_6721;

pub struct Watermark {
    file: File,
}

/// What the watermark file says.
pub enum Reading {
    Absent,
    Commits(u64),
    Damaged,
}

impl Watermark {
    pub fn open(dir: &Path) -> io::Result<(Self, Reading)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(FILE))?;
        let mut buf = [0u8; 16];
        let reading = match file.read_exact_at(&mut buf, 0) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                if file.metadata()?.len() == 0 {
                    Reading::Absent
                } else {
                    Reading::Damaged
                }
            }
            Err(e) => return Err(e),
            Ok(()) => {
                let value = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                let check = u64::from_be_bytes(buf[8..].try_into().expect("8 bytes"));
                if value ^ CHECK == check {
                    Reading::Commits(value)
                } else {
                    Reading::Damaged
                }
            }
        };
        Ok((Self { file }, reading))
    }

    pub fn record(&self, commits: u64) -> io::Result<()> {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&commits.to_be_bytes());
        buf[8..].copy_from_slice(&(commits ^ CHECK).to_be_bytes());
        self.file.write_all_at(&buf, 0)
    }
}
