//! The host's KVM: whether it can run an ordinary Linux guest, and what it offers.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Hint given whenever this host cannot boot a guest itself.
const HARNESS_HINT: &str =
    "on a host without hardware virtualization, run ember inside the nested harness: tests/nested/run SCRIPT";

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd); {HARNESS_HINT}")]
    Missing,
    #[error("cannot open /dev/kvm: {0} (is this user in the kvm group?)")]
    Open(kvm_ioctls::Error),
    #[error(
        "/dev/kvm here is the PVM nested hypervisor (module kvm_pvm), which cannot run an ordinary \
         Linux guest; {HARNESS_HINT}"
    )]
    Pvm,
    #[error(
        "this CPU has no hardware virtualization (no vmx or svm flag in /proc/cpuinfo), so this host \
         has no /dev/kvm; {HARNESS_HINT}"
    )]
    NoHardwareVirtualization,
    #[error("KVM lacks {0:?}, which ember needs")]
    MissingCapability(Cap),
    #[error("{requested} vCPUs requested but KVM allows at most {max} per VM")]
    TooManyVcpus { requested: u64, max: usize },
}

/// Checks, before anything is built, that this host's /dev/kvm can run a Linux guest.
pub fn check_host() -> Result<(), KvmError> {
    check_host_at(Path::new("/"))
}

/// [`check_host`] against a file-system root, so that tests can build fake hosts.
///
/// /proc/cpuinfo is read only to explain a missing /dev/kvm: it is slow to generate (tens of
/// milliseconds on an emulated CPU), and kvm_intel and kvm_amd only offer /dev/kvm on a CPU
/// with hardware virtualization anyway. Every sandbox start pays for this check twice (the
/// command and its VMM).
pub fn check_host_at(root: &Path) -> Result<(), KvmError> {
    if !root.join("dev/kvm").exists() {
        let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
        let has_virt = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        return Err(if has_virt { KvmError::Missing } else { KvmError::NoHardwareVirtualization });
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return Err(KvmError::Pvm);
    }
    Ok(())
}

/// Opens /dev/kvm and checks the capabilities ember relies on.
pub fn open(vcpus: u8) -> Result<Kvm, KvmError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(KvmError::Missing);
    }
    let kvm = Kvm::new().map_err(KvmError::Open)?;
    for cap in [Cap::Irqchip, Cap::Pit2, Cap::Irqfd, Cap::Ioeventfd, Cap::UserMemory, Cap::SetTssAddr, Cap::ImmediateExit] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability(cap));
        }
    }
    let max = kvm.get_max_vcpus();
    if vcpus as usize > max {
        return Err(KvmError::TooManyVcpus { requested: vcpus as u64, max });
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn fake_host(kvm: bool, pvm: bool, flags: &str) -> TempDir {
        let d = TempDir::new().unwrap();
        let root = d.as_path();
        std::fs::create_dir_all(root.join("dev")).unwrap();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        if kvm {
            std::fs::write(root.join("dev/kvm"), b"").unwrap();
        }
        if pvm {
            std::fs::create_dir_all(root.join("sys/module/kvm_pvm")).unwrap();
        }
        std::fs::write(root.join("proc/cpuinfo"), format!("processor\t: 0\nflags\t\t: {flags}\n")).unwrap();
        d
    }

    #[test]
    fn each_unusable_host_gets_its_own_error() {
        let h = fake_host(false, false, "fpu svm");
        assert!(matches!(check_host_at(h.as_path()), Err(KvmError::Missing)));
        let h = fake_host(true, true, "fpu");
        let err = check_host_at(h.as_path()).unwrap_err();
        assert!(matches!(err, KvmError::Pvm));
        assert!(err.to_string().contains("tests/nested/run"));
        let h = fake_host(false, false, "fpu sse2");
        assert!(matches!(check_host_at(h.as_path()), Err(KvmError::NoHardwareVirtualization)));
        let h = fake_host(true, false, "fpu vmx sse2");
        assert!(check_host_at(h.as_path()).is_ok());
        let h = fake_host(true, false, "fpu svm");
        assert!(check_host_at(h.as_path()).is_ok());
    }
}
