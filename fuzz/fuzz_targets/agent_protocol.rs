//! See `ember_fuzz::agent_protocol`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::agent_protocol::run(data));
