//! Replays every saved fuzz input as an ordinary test, so CI re-checks what the fuzzer
//! found without needing cargo-fuzz or a nightly toolchain.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::Path;

fn target_body(name: &str) -> Option<fn(&[u8])> {
    match name {
        "worker_receive" => Some(parser_sandbox::fuzzing::worker_receive),
        _ => None,
    }
}

#[test]
fn replay_saved_corpora() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut inputs = 0;
    for dir in std::fs::read_dir(&root).expect("fuzz/corpus exists") {
        let dir = dir.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let body = target_body(&name)
            .unwrap_or_else(|| panic!("corpus {name} has no replay entry in tests/fuzz_corpus.rs"));
        for file in std::fs::read_dir(&dir).unwrap() {
            let data = std::fs::read(file.unwrap().path()).unwrap();
            body(&data);
            inputs += 1;
        }
    }
    assert!(
        inputs > 0,
        "no corpus inputs found under {}",
        root.display()
    );
}
