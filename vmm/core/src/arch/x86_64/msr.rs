//! MSR values a vCPU starts with, as a firmware would leave them.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back: without it the guest maps all RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// MSRs of a vCPU whose values a snapshot keeps, as ranges `(first, count)`: the ones a Linux guest
/// writes or KVM changes for it (time, syscall entry, segment bases, caches, the kvmclock and
/// other paravirtual MSRs). Read-only identification MSRs, performance counters, machine check
/// banks and nested-virtualization MSRs are left out: the restoring host supplies those.
const SNAPSHOT_MSR_RANGES: [(u32, u32); 20] = [
    (MSR_IA32_TSC, 1),
    (0x3b, 1),  // IA32_TSC_ADJUST
    (0x48, 1),  // IA32_SPEC_CTRL
    (0x140, 1), // MISC_FEATURES_ENABLES
    (MSR_IA32_SYSENTER_CS, 3),
    (MSR_IA32_MISC_ENABLE, 1),
    (0x1d9, 1),   // IA32_DEBUGCTL
    (0x200, 0x20), // variable-range MTRRs
    (0x250, 1),   // fixed-range MTRRs
    (0x258, 2),
    (0x268, 8),
    (MSR_IA32_CR_PAT, 1),
    (MSR_MTRR_DEF_TYPE, 1),
    (MSR_IA32_TSC_DEADLINE, 1),
    (0xda0, 1), // IA32_XSS
    (MSR_EFER, 1),
    (MSR_STAR, 4), // STAR, LSTAR, CSTAR, SYSCALL_MASK
    (0xc000_0100, 4), // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
    (MSR_KVM_FIRST, MSR_KVM_COUNT),
    (0x11, 2), // kvmclock's original MSRs: WALL_CLOCK, SYSTEM_TIME
];

const MSR_IA32_CR_PAT: u32 = 0x277;
const MSR_EFER: u32 = 0xc000_0080;
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Where the guest's kvmclock (pvclock) structure is, bit 0 set when enabled.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// KVM's paravirtual MSRs 0x4b564d00..: kvmclock (WALL_CLOCK_NEW, SYSTEM_TIME_NEW), async page
/// faults, steal time, PV EOI, poll control.
const MSR_KVM_FIRST: u32 = 0x4b56_4d00;
const MSR_KVM_COUNT: u32 = 7;

/// Whether a snapshot keeps MSR `index`.
pub fn snapshot_keeps(index: u32) -> bool {
    SNAPSHOT_MSR_RANGES.iter().any(|&(first, count)| index >= first && index - first < count)
}

/// The MSRs to save for a snapshot: those KVM lists for this host (KVM_GET_MSR_INDEX_LIST) that a
/// snapshot keeps, plus the MTRRs and PAT, which KVM emulates without listing them.
pub fn snapshot_msr_list(kvm_list: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = kvm_list.iter().copied().filter(|&i| snapshot_keeps(i)).collect();
    let unlisted = (0x200..0x210).chain([0x250, 0x258, 0x259]).chain(0x268..0x270).chain([MSR_IA32_CR_PAT, MSR_MTRR_DEF_TYPE]);
    for index in unlisted {
        if !list.contains(&index) {
            list.push(index);
        }
    }
    list
}

/// The boot MSRs in the form KVM_SET_MSRS takes.
pub fn boot_msr_list() -> Msrs {
    Msrs::from_entries(&boot_msrs()).expect("the boot MSR list is far below KVM's limit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtrrs_write_back_and_fast_strings() {
        let m = boot_msrs();
        let get = |i| m.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(boot_msr_list().as_slice().len(), m.len());
    }

    #[test]
    fn snapshots_keep_time_syscall_and_kvmclock_msrs_but_not_identification_ones() {
        for kept in [MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_LSTAR, MSR_EFER, 0x4b56_4d01, 0x12, 0x20f, MSR_IA32_CR_PAT] {
            assert!(snapshot_keeps(kept), "{kept:#x}");
        }
        for dropped in [0x17, 0x8b, 0x10a, 0x179, 0x480, 0x38d, 0x4b56_4d07] {
            assert!(!snapshot_keeps(dropped), "{dropped:#x}");
        }
        let list = snapshot_msr_list(&[0x10a, MSR_IA32_TSC, 0x4b56_4d00, MSR_IA32_CR_PAT]);
        assert_eq!(&list[..3], &[MSR_IA32_TSC, 0x4b56_4d00, MSR_IA32_CR_PAT]);
        assert!(list.contains(&MSR_MTRR_DEF_TYPE) && list.contains(&0x200));
        assert_eq!(list.iter().filter(|&&i| i == MSR_IA32_CR_PAT).count(), 1);
    }
}
