//! KVM state of a VM: the host's KVM, the VM fd with its memory, and the vCPUs.

pub mod freeze;
pub mod kvm;
pub mod memory;
pub mod pause;
pub mod tsc;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
