//! What a VM will be made of, as configured piece by piece through the API before it starts
//! (Firecracker's "pre-boot" resources), and the [`VmConfig`] they amount to.

use std::path::{Path, PathBuf};

use api::models::{BootSource, MachineConfig};
use crate::config::{DriveConfig, VmConfig, VsockConfig};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{what} {} is not a regular file", path.display())]
    NotAFile { what: &'static str, path: PathBuf },
    #[error("{what} {}: {source}", path.display())]
    Unreadable { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("drive {0} is already the root device")]
    SecondRoot(String),
    #[error("guest_cid {0} is reserved; use 3 or more")]
    ReservedCid(u32),
    #[error("uds_path is empty")]
    NoUdsPath,
    #[error("Cannot start microvm without kernel configuration.")]
    NoKernel,
}

#[derive(Debug, Default)]
pub struct VmResources {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    /// In the order they were first configured; the root drive becomes /dev/vda.
    pub drives: Vec<DriveConfig>,
    pub vsock: Option<VsockConfig>,
}

fn readable_file(what: &'static str, path: &Path) -> Result<(), ResourceError> {
    match path.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ResourceError::NotAFile { what, path: path.to_owned() }),
        Err(source) => Err(ResourceError::Unreadable { what, path: path.to_owned(), source }),
    }
}

impl VmResources {
    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), ResourceError> {
        readable_file("kernel_image_path", boot.kernel_image_path.as_ref())?;
        if let Some(initrd) = &boot.initrd_path {
            readable_file("initrd_path", initrd.as_ref())?;
        }
        self.boot_source = Some(boot);
        Ok(())
    }

    /// Adds a drive, or replaces the one with the same id (as Firecracker does).
    pub fn set_drive(&mut self, drive: DriveConfig) -> Result<(), ResourceError> {
        readable_file("path_on_host", &drive.path)?;
        if drive.root {
            if let Some(other) = self.drives.iter().find(|d| d.root && d.id != drive.id) {
                return Err(ResourceError::SecondRoot(other.id.clone().unwrap_or_default()));
            }
        }
        match self.drives.iter_mut().find(|d| d.id == drive.id) {
            Some(existing) => *existing = drive,
            None => self.drives.push(drive),
        }
        Ok(())
    }

    pub fn set_vsock(&mut self, vsock: VsockConfig) -> Result<(), ResourceError> {
        // CIDs 0-2 are the hypervisor, the local loopback and the host.
        if vsock.cid < 3 {
            return Err(ResourceError::ReservedCid(vsock.cid));
        }
        if vsock.uds.as_os_str().is_empty() {
            return Err(ResourceError::NoUdsPath);
        }
        self.vsock = Some(vsock);
        Ok(())
    }

    /// The configuration; the drives' backing files may lie where `backing` allows.
    pub fn vm_config(&self, backing: &disk::BackingPolicy) -> Result<VmConfig, ResourceError> {
        let boot = self.boot_source.as_ref().ok_or(ResourceError::NoKernel)?;
        // The root drive goes first, so that it is /dev/vda whatever order the client used.
        let mut drives: Vec<DriveConfig> = self.drives.iter().filter(|d| d.root).cloned().collect();
        drives.extend(self.drives.iter().filter(|d| !d.root).cloned());
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline: boot.boot_args.clone(),
            mem_mib: self.machine.mem_size_mib,
            vcpus: self.machine.vcpu_count,
            drives,
            vsock: self.vsock.clone(),
            backing: backing.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, path: &Path, root: bool) -> DriveConfig {
        DriveConfig { id: Some(id.into()), path: path.to_owned(), read_only: false, root, format: disk::Format::Raw }
    }

    #[test]
    fn resources_become_a_config_with_the_root_drive_first() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-res-").unwrap();
        let file = |n: &str| {
            let p = dir.as_path().join(n);
            std::fs::write(&p, b"x").unwrap();
            p
        };
        let mut r = VmResources::default();
        assert!(r.vm_config(&Default::default()).unwrap_err().to_string().contains("without kernel"));
        let missing = BootSource { kernel_image_path: "/nonexistent/vmlinux".into(), boot_args: None, initrd_path: None };
        assert!(r.set_boot_source(missing).unwrap_err().to_string().contains("/nonexistent/vmlinux"));
        let kernel = file("vmlinux");
        r.set_boot_source(BootSource { kernel_image_path: kernel.display().to_string(), boot_args: Some("quiet".into()), initrd_path: None })
            .unwrap();
        r.set_drive(drive("data", &file("data.img"), false)).unwrap();
        r.set_drive(drive("rootfs", &file("root.img"), true)).unwrap();
        assert!(r.set_drive(drive("other", &file("o.img"), true)).unwrap_err().to_string().contains("already the root"));
        let mut replaced = drive("data", &file("data2.img"), false);
        replaced.read_only = true;
        r.set_drive(replaced).unwrap();
        assert!(r.set_vsock(VsockConfig { cid: 2, uds: "/tmp/v".into() }).is_err());
        r.set_vsock(VsockConfig { cid: 7, uds: "/tmp/v".into() }).unwrap();

        let cfg = r.vm_config(&Default::default()).unwrap();
        assert_eq!(cfg.kernel, kernel);
        assert_eq!(cfg.cmdline.as_deref(), Some("quiet"));
        assert_eq!((cfg.mem_mib, cfg.vcpus), (128, 1));
        assert_eq!(cfg.drives.len(), 2);
        assert!(cfg.drives[0].root && cfg.drives[0].path.ends_with("root.img"));
        assert!(cfg.drives[1].read_only && cfg.drives[1].path.ends_with("data2.img"));
        assert_eq!(cfg.vsock.unwrap().cid, 7);
    }
}
