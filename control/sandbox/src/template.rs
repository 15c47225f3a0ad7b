//! Templates: snapshots of freshly booted sandboxes, kept by name, from which new sandboxes are
//! restored instead of booted.
//!
//! A template is a directory `$EMBER_STATE/templates/NAME/` (beside the sandboxes) holding a
//! sandbox snapshot (`state`, `memory`, `disk.qcow2`) and `template.json` (what it was booted
//! from). Making one boots a hidden sandbox, waits for its agent, snapshots it into a
//! temporary directory beside the final one, removes the sandbox, and renames the directory
//! into place without replacing anything: a template directory is complete or absent, and of
//! two makers of one name the second finds the first's.
//!
//! `ember run --detach` restores from an automatic template, `auto-<16 hex digits>`, named
//! after everything a boot would depend on (kernel, image and ember binary by path, size and
//! modification time; memory, vCPUs, boot arguments), made on first use.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::record::Record;
use super::snapshot::SNAPSHOT_DISK;
use crate::error::io;
use crate::names::{check_name, random_hex};
use crate::{SandboxError, SandboxSpec, Store};

/// What a template was made from, in its directory.
pub const TEMPLATE_INFO: &str = "template.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    pub name: String,
    pub kernel: PathBuf,
    pub image: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Seconds since the Unix epoch.
    pub created: u64,
}

/// FNV-1a: a hash whose values do not depend on the Rust release, unlike std's.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// rename(2) that fails rather than replace `to`, even an empty directory.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from, to) = (c(from)?, c(to)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_NOREPLACE)
    };
    if r == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

impl Store {
    /// What template `name` was made from, if it exists.
    pub fn template(&self, name: &str) -> Result<TemplateInfo, SandboxError> {
        check_name(name)?;
        let path = self.template_dir(name).join(TEMPLATE_INFO);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SandboxError::TemplateNotFound(name.into()))
            }
            Err(e) => return Err(io("cannot read", &path)(e)),
        };
        let info: TemplateInfo =
            serde_json::from_slice(&bytes).map_err(|e| SandboxError::BadRecord { path, reason: e.to_string() })?;
        Ok(TemplateInfo { name: name.to_string(), ..info })
    }

    pub fn templates(&self) -> Result<Vec<TemplateInfo>, SandboxError> {
        let root = self.templates_dir();
        let entries = match std::fs::read_dir(&root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("cannot list", &root)(e)),
        };
        // Directories being made or removed have names `template` refuses.
        let mut out: Vec<TemplateInfo> =
            entries.flatten().filter_map(|e| self.template(&e.file_name().to_string_lossy()).ok()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Makes template `name` by booting a sandbox as `spec` says (its name aside).
    pub fn create_template(&self, name: &str, spec: &SandboxSpec) -> Result<TemplateInfo, SandboxError> {
        check_name(name)?;
        self.check_machine(spec)?;
        // Checked first so that a taken name costs no boot; the final rename checks again.
        if self.template_dir(name).exists() {
            return Err(SandboxError::TemplateExists(name.into()));
        }
        self.build_template(name, spec)
    }

    fn build_template(&self, name: &str, spec: &SandboxSpec) -> Result<TemplateInfo, SandboxError> {
        let root = self.templates_dir();
        std::fs::create_dir_all(&root).map_err(io("cannot create", &root))?;
        let building = root.join(format!(".{name}.{}", random_hex()));
        let result = self.build_template_in(name, spec, &building);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        result
    }

    fn build_template_in(&self, name: &str, spec: &SandboxSpec, building: &Path) -> Result<TemplateInfo, SandboxError> {
        let booted = self.start_hidden(spec)?;
        let taken = self.snapshot(&booted.name, building);
        let removed = self.remove(&booted.name);
        taken?;
        removed?;
        let absolute = |p: &Path| std::path::absolute(p).map_err(io("cannot resolve", p));
        let info = TemplateInfo {
            name: name.to_string(),
            kernel: absolute(&spec.kernel)?,
            image: absolute(&spec.image)?,
            mem_mib: spec.mem_mib,
            vcpus: spec.vcpus,
            boot_args: spec.boot_args.clone(),
            created: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs(),
        };
        let info_path = building.join(TEMPLATE_INFO);
        let json = serde_json::to_vec_pretty(&info)
            .map_err(|e| SandboxError::BadRecord { path: info_path.clone(), reason: e.to_string() })?;
        std::fs::write(&info_path, json).map_err(io("cannot write", &info_path))?;
        let dir = self.template_dir(name);
        match rename_noreplace(building, &dir) {
            Ok(()) => Ok(info),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ENOTEMPTY)) => {
                Err(SandboxError::TemplateExists(name.into()))
            }
            Err(e) => Err(io("cannot rename a new template to", &dir)(e)),
        }
    }

    /// Deletes template `name`, unless a sandbox's disk is stacked on the template's.
    pub fn remove_template(&self, name: &str) -> Result<(), SandboxError> {
        check_name(name)?;
        let dir = self.template_dir(name);
        if !dir.is_dir() {
            return Err(SandboxError::TemplateNotFound(name.into()));
        }
        let users = self.template_users(&dir);
        if !users.is_empty() {
            return Err(SandboxError::TemplateInUse { name: name.into(), users: users.join(", ") });
        }
        // Out of the way first, so that no restore finds it half deleted.
        let doomed = self.templates_dir().join(format!(".{name}.{}", random_hex()));
        std::fs::rename(&dir, &doomed).map_err(io("cannot remove", &dir))?;
        std::fs::remove_dir_all(&doomed).map_err(io("cannot remove", &doomed))
    }

    /// The sandboxes whose disk's backing chain goes through the template in `dir`: directly
    /// (restored from it), or through a layer (forked from such a sandbox).
    fn template_users(&self, dir: &Path) -> Vec<String> {
        let Ok(disk) = dir.join(SNAPSHOT_DISK).canonicalize() else { return Vec::new() };
        let entries = std::fs::read_dir(&self.root).into_iter().flatten().flatten();
        let mut users: Vec<String> = entries
            .filter(|e| {
                let chain = self.sandbox_chain(&e.file_name().to_string_lossy()).unwrap_or_default();
                chain.iter().any(|layer| layer.path.canonicalize().is_ok_and(|p| p == disk))
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        users.sort();
        users
    }

    /// Starts a new sandbox restored from template `template`.
    pub fn start_from_template(
        &self,
        template: &str,
        name: Option<String>,
        ready_timeout: Duration,
    ) -> Result<Record, SandboxError> {
        let info = self.template(template)?;
        self.start_from_snapshot_over(name, &self.template_dir(template), Some(&info.image), ready_timeout)
    }

    /// The automatic template for `spec`: `auto-` and 16 hex digits of a hash of everything a
    /// boot as `spec` says depends on.
    pub fn auto_template_name(&self, spec: &SandboxSpec) -> Result<String, SandboxError> {
        let mut key = format!(
            "ember auto template\nember {}\nmem {} MiB\nvcpus {}\nboot args {:?}\ndisk {:?} GiB\n",
            env!("CARGO_PKG_VERSION"),
            spec.mem_mib,
            spec.vcpus,
            spec.boot_args,
            spec.disk_gib
        );
        // The VMM binary too: a rebuilt ember may restore devices differently, or read another
        // snapshot format.
        for (what, path) in [("kernel", &spec.kernel), ("image", &spec.image), ("vmm", &self.vmm_binary)] {
            let real = std::fs::canonicalize(path).map_err(io("cannot read", path))?;
            let meta = std::fs::metadata(&real).map_err(io("cannot read", &real))?;
            let stamp = format!("{} {} {}.{:09}", real.display(), meta.len(), meta.mtime(), meta.mtime_nsec());
            key.push_str(&format!("{what} {stamp}\n"));
        }
        Ok(format!("auto-{:016x}", fnv1a(key.as_bytes())))
    }

    /// Starts a sandbox as `spec` says by restoring the automatic template for it, made first
    /// if it does not exist yet (`making` hears its name then).
    pub fn start_auto(&self, spec: &SandboxSpec, making: impl FnOnce(&str)) -> Result<Record, SandboxError> {
        self.check_machine(spec)?;
        if let Some(name) = &spec.name {
            self.check_new_name(name)?;
        }
        let auto = self.auto_template_name(spec)?;
        if !self.template_dir(&auto).exists() {
            making(&auto);
            match self.build_template(&auto, spec) {
                // Another ember made it meanwhile: theirs serves as well.
                Ok(_) | Err(SandboxError::TemplateExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.start_from_snapshot_over(spec.name.clone(), &self.template_dir(&auto), Some(&spec.image), spec.ready_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::OVERLAY;
    use vmm_sys_util::tempdir::TempDir;

    struct Fixture {
        tmp: TempDir,
        store: Store,
    }

    /// A store whose "VMM" is `vmm`, with no sandboxes and no templates.
    fn fixture(vmm: &str) -> Fixture {
        let tmp = TempDir::new_with_prefix("/tmp/ember-templates-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from(vmm));
        Fixture { tmp, store }
    }

    impl Fixture {
        fn spec(&self, image: &str) -> SandboxSpec {
            SandboxSpec {
                name: None,
                kernel: self.file("vmlinux", 4096),
                image: self.tmp.as_path().join(image),
                mem_mib: 128,
                vcpus: 1,
                boot_args: None,
                disk_gib: None,
                ready_timeout: Duration::from_secs(5),
            }
        }

        fn file(&self, name: &str, len: u64) -> PathBuf {
            let path = self.tmp.as_path().join(name);
            std::fs::File::create(&path).unwrap().set_len(len).unwrap();
            path
        }

        /// What is in the sandboxes and templates directories, hidden entries included.
        fn leftovers(&self) -> Vec<String> {
            [self.store.root.clone(), self.store.templates_dir()]
                .iter()
                .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
                .map(|e| e.path().display().to_string())
                .collect()
        }

        /// A template directory as `build_template` leaves one, with a disk over a 1 MiB base
        /// but no VM state.
        fn fake_template(&self, name: &str) {
            let dir = self.store.template_dir(name);
            std::fs::create_dir_all(&dir).unwrap();
            let base = self.file("base.raw", 1 << 20);
            crate::test_overlay(&base, &dir.join(SNAPSHOT_DISK));
            let info = TemplateInfo {
                name: name.into(),
                kernel: "/k".into(),
                image: base,
                mem_mib: 256,
                vcpus: 1,
                boot_args: None,
                created: 1,
            };
            std::fs::write(dir.join(TEMPLATE_INFO), serde_json::to_vec(&info).unwrap()).unwrap();
        }

        /// A sandbox directory whose overlay is stacked on `backing`.
        fn sandbox_on(&self, name: &str, backing: &Path) {
            std::fs::create_dir_all(self.store.dir(name)).unwrap();
            crate::test_overlay(backing, &self.store.dir(name).join(OVERLAY));
        }
    }

    #[test]
    fn a_failed_create_leaves_no_template_and_no_sandbox() {
        // The image is missing: the boot fails before any VMM runs.
        let f = fixture("/nonexistent/ember");
        let err = f.store.create_template("t1", &f.spec("missing.ext4")).unwrap_err();
        assert!(err.to_string().contains("missing.ext4"), "{err}");
        assert_eq!(f.leftovers(), Vec::<String>::new());
        // The VMM dies at once: its sandbox was started, and is torn down.
        let f = fixture("/bin/false");
        f.file("zeros.img", 1 << 20);
        let err = f.store.create_template("t1", &f.spec("zeros.img")).unwrap_err();
        assert!(matches!(err, SandboxError::VmmDied { ref name, .. } if name.starts_with(".sb-")), "{err}");
        assert_eq!(f.leftovers(), Vec::<String>::new());
    }

    #[test]
    fn names_are_checked_before_anything_boots() {
        let f = fixture("/nonexistent/ember");
        let spec = f.spec("missing.ext4");
        assert!(matches!(f.store.create_template("../up", &spec), Err(SandboxError::BadName(_))));
        f.fake_template("t1");
        assert!(matches!(f.store.create_template("t1", &spec), Err(SandboxError::TemplateExists(_))));
        // An automatic start under a taken sandbox name fails before it makes a template.
        std::fs::create_dir_all(f.store.dir("taken")).unwrap();
        let named = SandboxSpec { name: Some("taken".into()), ..spec.clone() };
        let made = std::cell::Cell::new(false);
        let err = f.store.start_auto(&named, |_| made.set(true)).unwrap_err();
        assert!(matches!(err, SandboxError::Exists(_)) && !made.get(), "{err}");
        let err = f.store.start_from_template("nope", None, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("there is no template named nope"), "{err}");
    }

    #[test]
    fn ls_shows_complete_templates_only() {
        let f = fixture("/nonexistent/ember");
        assert!(f.store.templates().unwrap().is_empty());
        f.fake_template("b");
        f.fake_template("a");
        std::fs::create_dir_all(f.store.template_dir(".b.0123abcd")).unwrap();
        std::fs::create_dir_all(f.store.template_dir("no-info")).unwrap();
        let names: Vec<String> = f.store.templates().unwrap().into_iter().map(|t| t.name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn rm_refuses_while_a_sandbox_disk_is_stacked_on_the_template() {
        let f = fixture("/nonexistent/ember");
        assert!(matches!(f.store.remove_template("t1"), Err(SandboxError::TemplateNotFound(_))));
        f.fake_template("t1");
        let disk = f.store.template_dir("t1").join(SNAPSHOT_DISK);
        // Restored from it, and forked from such a sandbox (its disk on a layer on the template's).
        f.sandbox_on("restored", &disk);
        let layer = f.tmp.as_path().join("layer.qcow2");
        crate::test_overlay(&disk, &layer);
        f.sandbox_on("forked", &layer);
        f.sandbox_on("unrelated", &f.tmp.as_path().join("base.raw"));
        let err = f.store.remove_template("t1").unwrap_err();
        assert!(err.to_string().contains("in use by sandbox forked, restored:"), "{err}");
        std::fs::remove_dir_all(f.store.dir("restored")).unwrap();
        std::fs::remove_dir_all(f.store.dir("forked")).unwrap();
        f.store.remove_template("t1").unwrap();
        assert!(f.store.templates_dir().read_dir().unwrap().next().is_none(), "nothing left of it");
    }

    #[test]
    fn the_automatic_template_is_named_after_what_the_boot_depends_on() {
        let f = fixture("/bin/true");
        let spec = f.spec("image.ext4");
        f.file("image.ext4", 1 << 20);
        let name = f.store.auto_template_name(&spec).unwrap();
        assert!(name.starts_with("auto-") && name.len() == 21 && check_name(&name).is_ok(), "{name}");
        assert_eq!(f.store.auto_template_name(&spec).unwrap(), name);
        let differs = |s: &SandboxSpec| f.store.auto_template_name(s).unwrap() != name;
        assert!(differs(&SandboxSpec { mem_mib: 256, ..spec.clone() }));
        assert!(differs(&SandboxSpec { vcpus: 2, ..spec.clone() }));
        assert!(differs(&SandboxSpec { boot_args: Some("quiet".into()), ..spec.clone() }));
        assert!(differs(&SandboxSpec { disk_gib: Some(4), ..spec.clone() }));
        // The sandbox's own name and patience are no part of it.
        let patient = Duration::from_secs(1);
        assert!(!differs(&SandboxSpec { name: Some("x".into()), ready_timeout: patient, ..spec.clone() }));
        // A rebuilt image is another image.
        f.file("image.ext4", 2 << 20);
        assert!(differs(&spec));
        let err = f.store.auto_template_name(&f.spec("gone.ext4")).unwrap_err();
        assert!(err.to_string().contains("gone.ext4"), "{err}");
    }

    #[test]
    fn renaming_into_place_never_replaces() {
        let f = fixture("/nonexistent/ember");
        let (a, b, c) = (f.file("a", 0), f.tmp.as_path().join("b"), f.tmp.as_path().join("c"));
        std::fs::create_dir(&b).unwrap();
        std::fs::create_dir(&c).unwrap();
        assert_eq!(rename_noreplace(&b, &c).unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert!(rename_noreplace(&b, &a).is_err());
        rename_noreplace(&b, &f.tmp.as_path().join("d")).unwrap();
        assert!(!b.exists() && f.tmp.as_path().join("d").is_dir());
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
