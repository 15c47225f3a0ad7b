//! See `ember_fuzz::agent_client`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::agent_client::run(data));
