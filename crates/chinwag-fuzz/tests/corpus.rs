//! Replays every committed fuzz corpus input through its target's function: inputs that
//! once exposed a bug, and the coverage the fuzzer found, stay tested on every run.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{target}: {} fails", path.display());
        inputs += 1;
    }
    assert!(inputs > 0, "{target}: empty corpus in {}", dir.display());
    println!("{target}: {inputs} inputs replayed");
}

#[test]
fn client_frame_corpus() {
    replay("client_frame", chinwag_fuzz::client_frames);
}

#[test]
fn inter_dc_corpus() {
    replay("inter_dc", chinwag_fuzz::inter_dc_frame);
}

#[test]
fn token_corpus() {
    replay("token", chinwag_fuzz::token);
}
