//! See `ember_fuzz::vsock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::vsock::run(data));
