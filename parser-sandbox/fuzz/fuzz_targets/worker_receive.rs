#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| parser_sandbox::fuzzing::worker_receive(data));
