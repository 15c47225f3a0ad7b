//! See `ember_fuzz::virtio_mmio`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz::virtio_mmio::run(data));
