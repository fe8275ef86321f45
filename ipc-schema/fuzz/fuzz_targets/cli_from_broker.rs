#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_schema::fuzzing::cli_from_broker(data));
