//! Putting a Linux kernel, its initramfs and its command line into guest memory.

pub mod cmdline;
pub mod kernel;
