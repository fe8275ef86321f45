//! Fuzz bodies (see `fuzz/`); replayed by `tests/fuzz_corpus.rs`.
