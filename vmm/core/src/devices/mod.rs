//! Devices the guest sees. Each is a state machine driven by the bytes the guest reads and
//! writes; none knows about KVM or threads, so tests drive them directly.

pub mod bus;
pub mod legacy;
pub mod virtio;
