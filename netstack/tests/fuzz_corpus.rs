//! Replays every saved `push_packets` fuzz input as an ordinary test, so CI re-checks
//! what the fuzzer found without cargo-fuzz or a nightly toolchain.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

#[test]
fn replay_saved_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/push_packets");
    let mut inputs = 0;
    for file in std::fs::read_dir(&dir).expect("fuzz/corpus/push_packets exists") {
        let data = std::fs::read(file.unwrap().path()).unwrap();
        netstack::fuzzing::push_packets(&data);
        inputs += 1;
    }
    assert!(inputs > 0, "no corpus inputs under {}", dir.display());
}
