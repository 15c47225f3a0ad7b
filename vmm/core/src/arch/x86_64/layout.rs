//! Guest physical memory layout of an ember VM on x86_64.
//!
//! Everything the VMM writes before the first instruction lives below 1 MiB, in the places
//! the Linux boot protocol and the MP specification expect; the kernel is loaded at the physical
//! address its ELF headers name (16 MiB for x86_64 vmlinux).

/// The GDT used for the 64-bit entry.
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_ADDR: u64 = 0x520;
/// `struct boot_params`, the "zero page".
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4, PDPT and PD of the identity mapping, one page each.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room for the command line, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the Extended BIOS Data Area; RAM below it is usable, the MP table lives in it.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte above the legacy hole (VGA, option ROMs, BIOS).
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole below 4 GiB, where the IOAPIC, the LAPIC and device windows live.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Default IOAPIC and LAPIC addresses; the MP table repeats them for the guest.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM keeps the TSS it needs on Intel hosts: inside the MMIO hole, away from RAM.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Interrupt pins of the IOAPIC that KVM's in-kernel irqchip offers.
pub const IOAPIC_PINS: u8 = 24;
/// virtio-mmio device windows, one page each, at the bottom of the MMIO hole's upper part.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// IOAPIC pins for virtio devices: 0-4 are the legacy ISA devices' (COM1 is 4).
pub const VIRTIO_IRQ_FIRST: u32 = 5;
pub const VIRTIO_IRQ_LAST: u32 = IOAPIC_PINS as u32 - 1;
