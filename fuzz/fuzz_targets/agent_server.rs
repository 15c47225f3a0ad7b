//! See `ember_fuzz::agent_server`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::agent_server::run(data));
