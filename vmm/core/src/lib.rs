//! ember's VMM: builds a KVM virtual machine that direct-boots a Linux kernel, and runs it.
//!
//! The story of a VM, in module order: [`config`] says what it is made of, [`builder`] puts the
//! kernel and boot structures ([`arch`], [`boot`]) into guest memory and creates a [`Vmm`]: the
//! KVM state ([`vstate`]) and the [`devices`] its [`device_manager`] wires; [`runtime`] runs
//! the vCPUs until the guest stops, and [`controller`] answers the API meanwhile. Devices save
//! and restore themselves ([`persist`]) for [`snapshot`]s.

pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod controller;
pub mod device_manager;
pub mod devices;
pub mod files;
pub mod persist;
pub mod resources;
pub mod runtime;
pub mod snapshot;
pub mod stats;
pub mod vmm;
pub mod vstate;

pub use self::vmm::Vmm;
