//! What a sandbox's machine may be on this host: checked before anything is made for it (a
//! template, a state directory, a VMM), so that a size the VMM would refuse seconds later, or
//! one the host cannot give, fails at once with the range that is accepted.

use std::fs::File;
use std::os::fd::AsRawFd;

use crate::{SandboxError, SandboxSpec, Store};

/// The bounds on a sandbox's memory and vCPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    /// The host's RAM.
    pub ram_mib: u64,
    /// A bound on guest memory below the RAM, set by whoever runs ember (`EMBER_MAX_MEM_MIB`).
    pub mem_cap_mib: Option<u64>,
    /// Online CPUs.
    pub cpus: u32,
    /// What KVM says a VM may have (`KVM_CAP_MAX_VCPUS`); unknown without /dev/kvm.
    pub kvm_max_vcpus: Option<u32>,
}

/// Guest memory comes in 2 MiB steps (the VMM's layout and huge-page alignment).
const MEM_STEP_MIB: u64 = 2;

impl HostLimits {
    /// This host's: its RAM, its online CPUs, and KVM's vCPU limit.
    pub fn of_host() -> Self {
        // SAFETY: sysconf only reads system configuration.
        let (pages, page_size, cpus) = unsafe {
            (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE), libc::sysconf(libc::_SC_NPROCESSORS_ONLN))
        };
        let ram = u64::try_from(pages).unwrap_or(0).saturating_mul(u64::try_from(page_size).unwrap_or(0));
        HostLimits {
            ram_mib: ram >> 20,
            mem_cap_mib: None,
            cpus: u32::try_from(cpus).unwrap_or(1).max(1),
            kvm_max_vcpus: kvm_max_vcpus(),
        }
    }

    /// Guest memory at most `cap_mib`, if that is below the host's RAM.
    pub fn with_mem_cap(self, cap_mib: u64) -> Self {
        HostLimits { mem_cap_mib: Some(cap_mib), ..self }
    }

    /// Fails unless `mem_mib` MiB of memory and `vcpus` vCPUs fit this host.
    pub fn check(&self, mem_mib: u64, vcpus: u8) -> Result<(), SandboxError> {
        self.check_memory(mem_mib)?;
        let (max_vcpus, vcpu_bound) = match self.kvm_max_vcpus {
            Some(kvm) if kvm < self.cpus => (kvm, "KVM's limit"),
            _ => (self.cpus, "this host's CPUs"),
        };
        if vcpus == 0 || u32::from(vcpus) > max_vcpus {
            return Err(SandboxError::BadVcpus { vcpus, max: max_vcpus, bound: vcpu_bound });
        }
        Ok(())
    }

    /// Fails unless `mem_mib` MiB is a size of guest memory this host can give.
    pub fn check_memory(&self, mem_mib: u64) -> Result<(), SandboxError> {
        let (max_mib, mem_bound) = match self.mem_cap_mib {
            Some(cap) if cap < self.ram_mib => (cap, "EMBER_MAX_MEM_MIB"),
            _ => (self.ram_mib, "this host's RAM"),
        };
        // The largest multiple of the step within the bound is what can be asked for.
        let max_mib = max_mib - max_mib % MEM_STEP_MIB;
        if mem_mib == 0 || mem_mib % MEM_STEP_MIB != 0 || mem_mib > max_mib {
            return Err(SandboxError::BadMemory { mem_mib, max_mib, bound: mem_bound });
        }
        Ok(())
    }
}

/// Fails unless `mem_mib` is a positive multiple of 2 MiB, whatever the host: what a command
/// line can check before it looks at anything. The message names the nearest sizes that are.
pub fn check_memory_step(mem_mib: u64) -> Result<(), String> {
    if mem_mib != 0 && mem_mib % MEM_STEP_MIB == 0 {
        return Ok(());
    }
    Err(step_advice(mem_mib))
}

/// `255 is not a multiple of 2 MiB: give 254 or 256`.
fn step_advice(mem_mib: u64) -> String {
    let below = mem_mib - mem_mib % MEM_STEP_MIB;
    match below.checked_add(MEM_STEP_MIB) {
        _ if below == 0 => format!("{mem_mib} is not a positive multiple of {MEM_STEP_MIB} MiB: give {MEM_STEP_MIB} or more"),
        Some(above) => format!("{mem_mib} is not a multiple of {MEM_STEP_MIB} MiB: give {below} or {above}"),
        None => format!("{mem_mib} is not a multiple of {MEM_STEP_MIB} MiB: give {below}"),
    }
}

/// What to give instead of `mem_mib` MiB of guest memory when at most `max_mib` is allowed
/// (by `bound`): the nearest multiples of the step below the bound, or the bound.
pub(crate) fn memory_advice(mem_mib: u64, max_mib: u64, bound: &str) -> String {
    if mem_mib > max_mib {
        return format!("give --mem-mib at most {max_mib} ({bound})");
    }
    format!("--mem-mib {}", step_advice(mem_mib))
}

/// KVM_CHECK_EXTENSION of KVM_CAP_MAX_VCPUS, else of KVM_CAP_NR_VCPUS, else 4 (what the KVM
/// API documentation says to assume); `None` without /dev/kvm.
fn kvm_max_vcpus() -> Option<u32> {
    const KVM_CHECK_EXTENSION: libc::c_ulong = 0xae03;
    const KVM_CAP_NR_VCPUS: libc::c_ulong = 9;
    const KVM_CAP_MAX_VCPUS: libc::c_ulong = 66;
    let kvm = File::open("/dev/kvm").ok()?;
    let check = |cap: libc::c_ulong| {
        // SAFETY: KVM_CHECK_EXTENSION takes an integer argument and touches no memory.
        unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CHECK_EXTENSION, cap) }
    };
    [KVM_CAP_MAX_VCPUS, KVM_CAP_NR_VCPUS].into_iter().map(check).find(|&n| n > 0).map_or(Some(4), |n| u32::try_from(n).ok())
}

impl Store {
    /// Bounds sandboxes by `limits` instead of this host's.
    pub fn with_limits(self, limits: HostLimits) -> Self {
        Self { limits: Some(limits), ..self }
    }

    /// Bounds sandboxes' memory by `cap_mib` too (see [`HostLimits::with_mem_cap`]).
    pub fn with_mem_cap(self, cap_mib: u64) -> Self {
        Self { mem_cap_mib: Some(cap_mib), ..self }
    }

    /// Fails unless the machine `spec` asks for fits the host. The host is looked at only
    /// now: commands that start nothing do not pay for it.
    pub(crate) fn check_machine(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        let limits = self.limits.clone().unwrap_or_else(HostLimits::of_host);
        let limits = match self.mem_cap_mib {
            Some(cap) => limits.with_mem_cap(cap),
            None => limits,
        };
        limits.check(spec.mem_mib, spec.vcpus)?;
        match spec.disk_gib {
            Some(gib) => self.check_disk(gib),
            None => Ok(()),
        }
    }

    /// Fails unless a disk of `gib` GiB could fill up without filling the file system of
    /// `$EMBER_STATE`, where its overlay grows (a disk is sparse: this bounds one sandbox, not
    /// all of them together).
    fn check_disk(&self, gib: u64) -> Result<(), SandboxError> {
        let state = self.root.parent().unwrap_or(&self.root).to_path_buf();
        let max_gib = match self.state_fs() {
            Some(fs) => fs.f_blocks.saturating_mul(u64::try_from(fs.f_bsize).unwrap_or(0)) >> 30,
            None => 0,
        };
        if gib == 0 || gib > max_gib {
            return Err(SandboxError::BadDisk { gib, max_gib, state });
        }
        Ok(())
    }

    /// The file system `$EMBER_STATE` is on, as statfs says.
    pub(crate) fn state_fs(&self) -> Option<libc::statfs> {
        let state = self.root.parent().unwrap_or(&self.root);
        let path = std::ffi::CString::new(state.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: a zeroed statfs is valid for statfs to fill.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs with a NUL-terminated path and a struct to fill; the result is checked.
        let ok = unsafe { libc::statfs(path.as_ptr(), &mut fs) } == 0;
        ok.then_some(fs)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;

    const SMALL_HOST: HostLimits = HostLimits { ram_mib: 4095, mem_cap_mib: None, cpus: 2, kvm_max_vcpus: Some(8) };

    #[test]
    fn memory_is_a_positive_multiple_of_2_mib_within_the_host_ram() {
        let err = |mem| SMALL_HOST.check(mem, 1).unwrap_err().to_string();
        assert_eq!(
            err(255),
            "guest memory of 255 MiB is refused: --mem-mib 255 is not a multiple of 2 MiB: give 254 or 256"
        );
        assert_eq!(err(0), "guest memory of 0 MiB is refused: --mem-mib 0 is not a positive multiple of 2 MiB: give 2 or more");
        assert_eq!(err(1), "guest memory of 1 MiB is refused: --mem-mib 1 is not a positive multiple of 2 MiB: give 2 or more");
        for mem in [4096, 4095, 1 << 40, u64::MAX] {
            assert_eq!(err(mem), format!("guest memory of {mem} MiB is refused: give --mem-mib at most 4094 (this host's RAM)"));
        }
        SMALL_HOST.check(2, 1).unwrap();
        SMALL_HOST.check(4094, 1).unwrap();
        let capped = SMALL_HOST.with_mem_cap(1024);
        assert!(capped.check(1026, 1).unwrap_err().to_string().ends_with("at most 1024 (EMBER_MAX_MEM_MIB)"));
        capped.check(1024, 1).unwrap();
        assert!(SMALL_HOST.with_mem_cap(1 << 20).check(4096, 1).is_err(), "a cap above the RAM is no help");
    }

    #[test]
    fn a_command_line_checks_the_step_alone_naming_the_nearest_sizes() {
        assert_eq!(check_memory_step(256), Ok(()));
        assert_eq!(check_memory_step(255).unwrap_err(), "255 is not a multiple of 2 MiB: give 254 or 256");
        assert_eq!(check_memory_step(0).unwrap_err(), "0 is not a positive multiple of 2 MiB: give 2 or more");
        assert_eq!(check_memory_step(u64::MAX).unwrap_err(), format!("{} is not a multiple of 2 MiB: give {}", u64::MAX, u64::MAX - 1));
    }

    #[test]
    fn vcpus_are_at_most_the_host_cpus_and_what_kvm_allows() {
        SMALL_HOST.check(256, 2).unwrap();
        let message = SMALL_HOST.check(256, 3).unwrap_err().to_string();
        assert!(message.contains("3 vCPUs") && message.contains("from 1 to 2 (this host's CPUs)"), "{message}");
        assert!(SMALL_HOST.check(256, 0).is_err());
        let big = HostLimits { cpus: 64, kvm_max_vcpus: Some(16), ..SMALL_HOST };
        let message = big.check(256, 17).unwrap_err().to_string();
        assert!(message.contains("from 1 to 16 (KVM's limit)"), "{message}");
    }

    #[test]
    fn this_host_has_some_of_everything() {
        let host = HostLimits::of_host();
        assert!(host.ram_mib > 0 && host.cpus > 0, "{host:?}");
        assert!(host.kvm_max_vcpus.is_none_or(|n| n > 0), "{host:?}");
    }

    #[test]
    fn a_machine_too_big_or_odd_makes_nothing() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-limits-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/bin/true")).with_limits(SMALL_HOST);
        let (kernel, image) = (tmp.as_path().join("vmlinux"), tmp.as_path().join("image.ext4"));
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&image, b"image").unwrap();
        let spec = |mem_mib, vcpus| SandboxSpec {
            name: Some("big".into()),
            kernel: kernel.clone(),
            image: image.clone(),
            mem_mib,
            vcpus,
            boot_args: None,
            disk_gib: None,
            ready_timeout: Duration::from_secs(1),
        };
        for (mem, vcpus) in [(255, 1), (0, 1), (1 << 30, 1), (256, 3)] {
            let making = std::cell::Cell::new(false);
            let errors = [
                store.start_auto(&spec(mem, vcpus), |_| making.set(true)).unwrap_err(),
                store.start(&spec(mem, vcpus)).unwrap_err(),
                store.create_template("t", &spec(mem, vcpus)).unwrap_err(),
            ];
            for e in errors {
                assert!(matches!(e, SandboxError::BadMemory { .. } | SandboxError::BadVcpus { .. }), "{mem} MiB, {vcpus} vCPUs: {e}");
            }
            assert!(!making.get(), "a template was begun for {mem} MiB, {vcpus} vCPUs");
            let made: Vec<_> = std::fs::read_dir(tmp.as_path()).unwrap().flatten().map(|e| e.file_name()).collect();
            assert_eq!(made.len(), 2, "{mem} MiB, {vcpus} vCPUs made {made:?}");
        }
        let fs_gib = store.state_fs().map(|fs| (fs.f_blocks * fs.f_bsize as u64) >> 30).unwrap();
        for gib in [0, fs_gib + 1, u64::MAX >> 30] {
            let disk = SandboxSpec { disk_gib: Some(gib), ..spec(256, 1) };
            let e = store.start(&disk).unwrap_err();
            let message = e.to_string();
            assert!(matches!(e, SandboxError::BadDisk { .. }) && message.contains(&format!("from 1 to {fs_gib}")), "{message}");
            assert!(store.start_auto(&disk, |_| panic!("a template was begun for a {gib} GiB disk")).is_err());
        }
    }
}
