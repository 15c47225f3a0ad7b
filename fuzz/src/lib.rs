//! ember's fuzz targets. Each target is a module here with a `run(data)` that the libFuzzer
//! binary in `fuzz_targets/` calls, so that the seeds (`seeds`) run through the same code in a
//! plain `cargo test` and stay meaningful: a seed is built as the input values it stands for,
//! and a test checks that it decodes back to them.
//!
//! Structured targets read their input as a sequence of operations with `arbitrary`; the
//! others take the bytes a hostile peer or file would hold.

pub mod agent_client;
pub mod agent_protocol;
pub mod agent_server;
pub mod api_http;
pub mod api_models;
pub mod guest;
pub mod memdisk;
pub mod qcow2;
pub mod seed;
pub mod seeds;
pub mod snapshot;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod vsock;

use arbitrary::{Arbitrary, Unstructured};

/// Sets the process up as the `ember` binary is: SIGPIPE ignored (Rust's `main` does that, and
/// the devices rely on it to get EPIPE from a host socket whose peer left; a libFuzzer binary
/// has no Rust `main`). Targets that write to sockets call it first.
pub fn like_the_vmm() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN has no handler to be unsound in.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// Every operation `data` holds, in order, as far as they decode.
pub fn ops<'a, T: Arbitrary<'a>>(data: &'a [u8]) -> Vec<T> {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    while !u.is_empty() {
        match u.arbitrary() {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops
}
