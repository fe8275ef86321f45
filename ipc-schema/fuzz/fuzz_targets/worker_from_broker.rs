#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ipc_schema::fuzzing::worker_from_broker(data));
