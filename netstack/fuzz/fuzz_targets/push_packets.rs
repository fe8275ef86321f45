#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| netstack::fuzzing::push_packets(data));
