#!/usr/bin/env bash
# Runs one cargo-fuzz target for a bounded time and grows its saved corpus.
#   scripts/fuzz.sh CRATE_DIR TARGET SECONDS      e.g. scripts/fuzz.sh vshp record_decode 600
# cargo-fuzz needs nightly-only sanitizer flags; RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them, and is set here only, never for normal builds.
set -euo pipefail
cd "$(dirname "$0")/.."
crate=${1:?crate dir}; target=${2:?target}; secs=${3:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
mkdir -p "$crate/fuzz/corpus/$target"
cd "$crate"
RUSTC_BOOTSTRAP=1 exec cargo fuzz run "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$secs" -max_len=70000 -rss_limit_mb=2048 -print_final_stats=1
