#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vshp::fuzzing::session_receive(data));
