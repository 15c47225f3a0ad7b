//! Per-vCPU CPUID, derived from what KVM supports on this host: each vCPU gets its own APIC ID
//! and a topology of `num_cpus` single-threaded cores in one package, so that the guest's view
//! agrees with the MP table.

use kvm_bindings::kvm_cpuid_entry2;

/// What the host's KVM can do that CPUID should advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidOptions {
    pub cpu_index: u8,
    pub num_cpus: u8,
    /// KVM_CAP_TSC_DEADLINE_TIMER: the in-kernel LAPIC emulates the TSC deadline timer, which
    /// spares the guest a timer-calibration dance and an MSR round trip per timer.
    pub tsc_deadline: bool,
}

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const ECX_AMD_TOPOEXT: u32 = 1 << 22;
const ECX_X2APIC: u32 = 1 << 21;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const CLFLUSH_LINE_8_BYTES: u32 = 8;

/// KVM's paravirtual features (KVM_CPUID_FEATURES, EAX).
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
const KVM_ASYNC_PF_FEATURES: u32 = KVM_FEATURE_ASYNC_PF | KVM_FEATURE_ASYNC_PF_VMEXIT | KVM_FEATURE_ASYNC_PF_INT;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things: the x2APIC ID shift of a topology level.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .map(|e| {
            let mut v = [0u8; 12];
            v[0..4].copy_from_slice(&e.ebx.to_le_bytes());
            v[4..8].copy_from_slice(&e.edx.to_le_bytes());
            v[8..12].copy_from_slice(&e.ecx.to_le_bytes());
            &v == b"AuthenticAMD" || &v == b"HygonGenuine"
        })
        .unwrap_or(false)
}

/// KVM_CPUID_FLAG_SIGNIFCANT_INDEX: the entry is selected by ECX as well as EAX.
const FLAG_SIGNIFICANT_INDEX: u32 = 1;
/// Subleaves of the topology leaves ember describes: SMT, core, and the terminating level.
const TOPOLOGY_SUBLEAVES: u32 = 3;

/// KVM may report only subleaf 0 of the topology leaves; the guest needs the core level too,
/// or it takes every vCPU for a package of its own.
fn add_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>, leaf: u32) {
    if !entries.iter().any(|e| e.function == leaf) {
        return;
    }
    for index in 0..TOPOLOGY_SUBLEAVES {
        if !entries.iter().any(|e| e.function == leaf && e.index == index) {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index,
                flags: FLAG_SIGNIFICANT_INDEX,
                ..Default::default()
            });
        }
    }
}

/// Rewrites the host-supported `entries` for one vCPU.
pub fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, opts: CpuidOptions) {
    let amd = is_amd(entries);
    add_topology_subleaves(entries, LEAF_TOPOLOGY);
    add_topology_subleaves(entries, LEAF_TOPOLOGY_V2);
    let apic_id = opts.cpu_index as u32;
    let cpus = opts.num_cpus.max(1) as u32;
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (apic_id << 24) | (cpus.min(255) << 16) | (CLFLUSH_LINE_8_BYTES << 8);
                e.ecx |= ECX_HYPERVISOR | ECX_X2APIC;
                if opts.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if cpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE if !amd => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((cpus - 1).min(63)) << 26);
            }
            // No virtual PMU: the guest then leaves the performance counters alone instead of
            // probing MSRs that would only exit to KVM.
            LEAF_PMU => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (shift, count, level) = match e.index {
                    0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                    1 => (bits_for(cpus), cpus, TOPOLOGY_LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = apic_id;
            }
            // With TOPOEXT the guest reads its topology from leaf 0xB and 0x8000001E, which
            // describe it exactly; without it, AMD guests fall back to guessing from 0x80000008.
            LEAF_AMD_FEATURES if amd => {
                e.ecx |= ECX_AMD_TOPOEXT;
            }
            LEAF_AMD_SIZES if amd => {
                e.ecx = (bits_for(cpus) << 12) | (cpus - 1);
            }
            LEAF_AMD_TOPOLOGY if amd => {
                e.eax = apic_id;
                // Core ID, and one thread per core (bits 15:8 hold threads per core - 1).
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
                e.edx = 0;
            }
            // No asynchronous page faults. With them, a guest task whose page KVM is still
            // fetching sleeps until KVM tells it "page ready"; that promise lives in the host
            // kernel, not in any state a snapshot can save, so a snapshot or fork taken
            // meanwhile holds a task that sleeps for ever in every copy (seen: a forked child
            // whose agent never answered again; Firecracker #3020 and #4099 are the same).
            LEAF_KVM_FEATURES => {
                e.eax &= !KVM_ASYNC_PF_FEATURES;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn vendor(name: &[u8; 12]) -> kvm_cpuid_entry2 {
        let w = |i: usize| u32::from_le_bytes(name[i..i + 4].try_into().unwrap());
        kvm_cpuid_entry2 {
            function: 0,
            eax: 0x1f,
            ebx: w(0),
            edx: w(4),
            ecx: w(8),
            ..Default::default()
        }
    }

    fn find(es: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *es.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn host(v: &[u8; 12]) -> Vec<kvm_cpuid_entry2> {
        let mut pmu = entry(LEAF_PMU, 0);
        pmu.eax = 0x0803_0802;
        let mut l3 = entry(LEAF_CACHE, 3);
        l3.eax = (3 << 5) | 3;
        vec![
            vendor(v),
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE, 0),
            l3,
            pmu,
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_AMD_FEATURES, 0),
            entry(LEAF_AMD_SIZES, 0),
            entry(LEAF_AMD_TOPOLOGY, 0),
        ]
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_cpu_count() {
        for idx in 0..4u8 {
            let mut es = host(b"GenuineIntel");
            normalize(&mut es, CpuidOptions { cpu_index: idx, num_cpus: 4, tsc_deadline: true });
            let f = find(&es, LEAF_FEATURES, 0);
            assert_eq!(f.ebx >> 24, idx as u32);
            assert_eq!((f.ebx >> 16) & 0xff, 4);
            assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(f.ecx & ECX_TSC_DEADLINE, 0);
            assert_ne!(f.ecx & ECX_X2APIC, 0);
            assert_ne!(f.edx & EDX_HTT, 0);
            for sub in 0..3 {
                assert_eq!(find(&es, LEAF_TOPOLOGY, sub).edx, idx as u32);
            }
            let core = find(&es, LEAF_TOPOLOGY, 1);
            assert_eq!((core.eax, core.ebx, (core.ecx >> 8) & 0xff), (2, 4, TOPOLOGY_LEVEL_CORE));
            let smt = find(&es, LEAF_TOPOLOGY, 0);
            assert_eq!((smt.eax, smt.ebx, (smt.ecx >> 8) & 0xff), (0, 1, TOPOLOGY_LEVEL_SMT));
            assert_eq!((find(&es, LEAF_TOPOLOGY, 2).ecx >> 8) & 0xff, 0, "end of levels");
            assert_eq!(find(&es, LEAF_CACHE, 0).eax >> 26, 3);
            assert_eq!((find(&es, LEAF_CACHE, 3).eax >> 14) & 0xfff, 3, "L3 shared by all");
            assert_eq!(find(&es, LEAF_PMU, 0).eax, 0);
            assert_eq!(find(&es, LEAF_AMD_SIZES, 0).ecx, 0, "AMD leaves untouched on Intel");
        }
    }

    #[test]
    fn amd_core_count_and_extended_apic_id() {
        let mut es = host(b"AuthenticAMD");
        normalize(&mut es, CpuidOptions { cpu_index: 2, num_cpus: 3, tsc_deadline: false });
        assert_eq!(find(&es, LEAF_AMD_SIZES, 0).ecx, (2 << 12) | 2);
        assert_eq!(find(&es, LEAF_AMD_TOPOLOGY, 0).eax, 2);
        assert_eq!(find(&es, LEAF_FEATURES, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(find(&es, LEAF_AMD_FEATURES, 0).ecx & ECX_AMD_TOPOEXT, 0);
        let core = find(&es, LEAF_TOPOLOGY, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
    }

    #[test]
    fn missing_topology_subleaves_are_added_once() {
        let mut es = host(b"GenuineIntel");
        normalize(&mut es, CpuidOptions { cpu_index: 1, num_cpus: 2, tsc_deadline: true });
        normalize(&mut es, CpuidOptions { cpu_index: 1, num_cpus: 2, tsc_deadline: true });
        let topo: Vec<_> = es.iter().filter(|e| e.function == LEAF_TOPOLOGY).collect();
        assert_eq!(topo.len(), 3);
        assert!(topo.iter().all(|e| e.flags & FLAG_SIGNIFICANT_INDEX != 0 || e.index == 0));
        assert!(!es.iter().any(|e| e.function == LEAF_TOPOLOGY_V2), "absent leaves stay absent");
        assert_eq!(find(&es, LEAF_AMD_FEATURES, 0).ecx & ECX_AMD_TOPOEXT, 0, "not on Intel");
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let mut es = host(b"GenuineIntel");
        es[1].edx = EDX_HTT;
        normalize(&mut es, CpuidOptions { cpu_index: 0, num_cpus: 1, tsc_deadline: true });
        assert_eq!(find(&es, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&es, LEAF_TOPOLOGY, 1).eax, 0);
    }

    #[test]
    fn guests_get_no_asynchronous_page_faults_and_keep_the_other_kvm_features() {
        let mut es = host(b"AuthenticAMD");
        let mut kvm = entry(LEAF_KVM_FEATURES, 0);
        let steal_time = 1 << 5;
        kvm.eax = KVM_ASYNC_PF_FEATURES | steal_time;
        es.push(kvm);
        normalize(&mut es, CpuidOptions { cpu_index: 0, num_cpus: 1, tsc_deadline: true });
        assert_eq!(find(&es, LEAF_KVM_FEATURES, 0).eax, steal_time);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
