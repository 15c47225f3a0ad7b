//! Register state of the boot vCPU at the kernel's 64-bit entry point.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};

use super::gdt::{kvm_segment_from_gdt, BOOT_GDT, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 0x2;

/// General registers: the Linux 64-bit boot protocol wants the zero page in RSI.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// x87 control word and MXCSR at their power-on defaults (all exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Special registers for long mode with the boot GDT and identity page tables, starting from
/// what KVM_GET_SREGS returned so that fields ember does not own keep KVM's values.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = kvm_segment_from_gdt(BOOT_GDT[CODE_SELECTOR as usize], CODE_SELECTOR);
    let data = kvm_segment_from_gdt(BOOT_GDT[DATA_SELECTOR as usize], DATA_SELECTOR);
    let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_SELECTOR as usize], TSS_SELECTOR);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_with_paging_and_boot_gdt() {
        let s = boot_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!((s.gdt.base, s.gdt.limit), (GDT_ADDR, 31));
        assert_eq!((s.cs.selector, s.cs.l), (8, 1));
        assert_eq!(s.ss.selector, 16);
        assert_eq!(s.tr.selector, 24);
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, ZERO_PAGE_ADDR, BOOT_STACK_POINTER, 2));
        assert_eq!(boot_fpu().mxcsr, 0x1f80);
    }
}
