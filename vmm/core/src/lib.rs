//! ember's VMM: builds a KVM virtual machine that direct-boots a Linux kernel, and runs it.
//!
//! The story of a VM, in module order: [`config`] says what it is made of, [`builder`] puts the
//! kernel and boot structures ([`arch`], [`boot`]) into guest memory and creates the KVM state
//! ([`vstate`]) and [`devices`], and [`runtime`] runs the vCPUs until the guest stops.

pub mod arch;
pub mod boot;
pub mod builder;
pub mod config;
pub mod controller;
pub mod devices;
pub mod resources;
pub mod runtime;
pub mod snapshot;
pub mod stats;
pub mod vstate;
