//! What it takes to start a Linux kernel on an x86_64 vCPU: memory layout, the zero page,
//! identity page tables and GDT, the MP table, CPUID, MSRs and the LAPIC.

pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod paging;
pub mod regs;
