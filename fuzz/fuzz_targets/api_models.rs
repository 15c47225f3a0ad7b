//! See `ember_fuzz::api_models`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::api_models::run(data));
