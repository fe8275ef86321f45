//! Keeps the seed inputs of the `handshake_responder` and `session_receive` fuzz targets
//! in `fuzz/corpus/<target>/seed-*` equal to what `vshp::fuzzing::seed_inputs` makes, and
//! checks each seed really goes deep (completes the handshake / delivers records).
//!
//! Rewrite the seed files: `VSHP_REGENERATE_SEEDS=1 cargo test -p vshp --test fuzz_seeds`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn seed_files_match_the_generator() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let seeds = vshp::fuzzing::seed_inputs();
    assert_eq!(seeds.len(), 6, "every seed could be generated");
    for (target, name, bytes) in seeds {
        let path = root.join(target).join(&name);
        if std::env::var_os("VSHP_REGENERATE_SEEDS").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
            continue;
        }
        let on_disk = std::fs::read(&path)
            .unwrap_or_else(|_| panic!("{} missing: regenerate the seeds", path.display()));
        assert_eq!(on_disk, bytes, "{} is stale", path.display());
        // Each seed reaches the data plane: all its DATA records are delivered.
        match target {
            "handshake_responder" => {
                assert_eq!(
                    vshp::fuzzing::handshake_responder_delivered(&bytes),
                    2,
                    "{name}"
                )
            }
            _ => assert_eq!(
                vshp::fuzzing::session_receive_delivered(&bytes),
                10,
                "{name}"
            ),
        }
    }
}
