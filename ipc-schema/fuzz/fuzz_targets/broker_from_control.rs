#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_schema::fuzzing::broker_from_control(data));
