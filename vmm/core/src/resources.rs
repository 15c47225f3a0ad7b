//! What a VM will be made of, as configured piece by piece through the API before it starts
//! (Firecracker's "pre-boot" resources), and the [`VmConfig`] they amount to.

use std::path::{Path, PathBuf};

use api::models::{BootSource, Drive, MachineConfig, Vsock};
use crate::config::{DriveConfig, VmConfig, VsockConfig};

#[derive(Debug, Default)]
pub struct VmResources {
    pub boot_source: Option<BootSource>,
    pub machine: MachineConfig,
    /// In the order they were first configured; the root drive becomes /dev/vda.
    pub drives: Vec<Drive>,
    /// Where FlushMetrics appends (PUT /metrics).
    pub metrics_path: Option<PathBuf>,
    pub vsock: Option<Vsock>,
}

fn readable_file(what: &str, path: &str) -> Result<(), String> {
    match Path::new(path).metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("{what} {path} is not a regular file")),
        Err(e) => Err(format!("{what} {path}: {e}")),
    }
}

impl VmResources {
    pub fn set_boot_source(&mut self, boot: BootSource) -> Result<(), String> {
        readable_file("kernel_image_path", &boot.kernel_image_path)?;
        if let Some(initrd) = &boot.initrd_path {
            readable_file("initrd_path", initrd)?;
        }
        self.boot_source = Some(boot);
        Ok(())
    }

    /// Adds a drive, or replaces the one with the same id (as Firecracker does).
    pub fn set_drive(&mut self, drive: Drive) -> Result<(), String> {
        readable_file("path_on_host", &drive.path_on_host)?;
        if drive.is_root_device {
            if let Some(other) = self.drives.iter().find(|d| d.is_root_device && d.drive_id != drive.drive_id) {
                return Err(format!("drive {} is already the root device", other.drive_id));
            }
        }
        match self.drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            Some(existing) => *existing = drive,
            None => self.drives.push(drive),
        }
        Ok(())
    }

    pub fn set_vsock(&mut self, vsock: Vsock) -> Result<(), String> {
        // CIDs 0-2 are the hypervisor, the local loopback and the host.
        if vsock.guest_cid < 3 {
            return Err(format!("guest_cid {} is reserved; use 3 or more", vsock.guest_cid));
        }
        if vsock.uds_path.is_empty() {
            return Err("uds_path is empty".into());
        }
        self.vsock = Some(vsock);
        Ok(())
    }

    pub fn vm_config(&self) -> Result<VmConfig, String> {
        let boot = self.boot_source.as_ref().ok_or("Cannot start microvm without kernel configuration.")?;
        // The root drive goes first, so that it is /dev/vda whatever order the client used.
        let mut drives: Vec<&Drive> = self.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(self.drives.iter().filter(|d| !d.is_root_device));
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline: boot.boot_args.clone(),
            mem_mib: self.machine.mem_size_mib,
            vcpus: self.machine.vcpu_count,
            drives: drives
                .into_iter()
                .map(|d| DriveConfig {
                    id: Some(d.drive_id.clone()),
                    path: PathBuf::from(&d.path_on_host),
                    read_only: d.is_read_only,
                    root: d.is_root_device,
                })
                .collect(),
            vsock: self.vsock.as_ref().map(|v| VsockConfig { cid: v.guest_cid, uds: PathBuf::from(&v.uds_path) }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drive(id: &str, path: &Path, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            path_on_host: path.display().to_string(),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
        }
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
        assert!(r.vm_config().unwrap_err().contains("without kernel"));
        let missing = BootSource { kernel_image_path: "/nonexistent/vmlinux".into(), boot_args: None, initrd_path: None };
        assert!(r.set_boot_source(missing).unwrap_err().contains("/nonexistent/vmlinux"));
        let kernel = file("vmlinux");
        r.set_boot_source(BootSource { kernel_image_path: kernel.display().to_string(), boot_args: Some("quiet".into()), initrd_path: None })
            .unwrap();
        r.set_drive(drive("data", &file("data.img"), false)).unwrap();
        r.set_drive(drive("rootfs", &file("root.img"), true)).unwrap();
        assert!(r.set_drive(drive("other", &file("o.img"), true)).unwrap_err().contains("already the root"));
        let mut replaced = drive("data", &file("data2.img"), false);
        replaced.is_read_only = true;
        r.set_drive(replaced).unwrap();
        assert!(r.set_vsock(Vsock { guest_cid: 2, uds_path: "/tmp/v".into(), vsock_id: None }).is_err());
        r.set_vsock(Vsock { guest_cid: 7, uds_path: "/tmp/v".into(), vsock_id: None }).unwrap();

        let cfg = r.vm_config().unwrap();
        assert_eq!(cfg.kernel, kernel);
        assert_eq!(cfg.cmdline.as_deref(), Some("quiet"));
        assert_eq!((cfg.mem_mib, cfg.vcpus), (128, 1));
        assert_eq!(cfg.drives.len(), 2);
        assert!(cfg.drives[0].root && cfg.drives[0].path.ends_with("root.img"));
        assert!(cfg.drives[1].read_only && cfg.drives[1].path.ends_with("data2.img"));
        assert_eq!(cfg.vsock.unwrap().cid, 7);
    }
}
