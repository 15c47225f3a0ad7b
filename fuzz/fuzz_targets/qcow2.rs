//! See `ember_fuzz::qcow2`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::qcow2::run(data));
