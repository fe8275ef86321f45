#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_schema::fuzzing::session_from_helper(data));
