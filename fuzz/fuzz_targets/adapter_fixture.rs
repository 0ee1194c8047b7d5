#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ess_agent::fuzzing::adapter_fixture(data));
