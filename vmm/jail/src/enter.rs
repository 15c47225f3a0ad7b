//! The VMM's side: turning the running process (root, single-threaded, API socket bound) into
//! a jailed, unprivileged one.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::{step, Jail, JailError, MAX_OPEN_FILES, MAX_PROCESSES};

/// Devices a VMM opens after it is jailed (the KVM VM of a spare is made inside the jail).
const DEVICES: &[&str] = &["/dev/kvm"];

impl Jail {
    /// Enters the jail. Must run before any other thread exists (uid changes and namespaces
    /// are per thread underneath) and before any input from the API or a guest is read.
    pub fn enter(&self) -> Result<(), JailError> {
        if !self.user_namespace && (self.uid == 0 || self.gid == 0) {
            return Err(JailError::Root);
        }
        for path in std::iter::once(&self.root).chain(&self.read_only) {
            if !path.is_absolute() {
                return Err(JailError::Relative { path: path.clone() });
            }
        }
        // Mount points and their parents are made root's, and must be passable by the jail
        // user (0755); the VMM's own files are made private at the end.
        // SAFETY: umask only changes this process's file creation mask.
        unsafe { libc::umask(0o022) };
        // The pid namespace came from the spawner (a process cannot move itself into one);
        // the others are cheaper made here, and made even when `ember vmm --jail` is started
        // by hand, so that the host's mount table is never what this changes.
        check(
            // SAFETY: unshare has no memory effects; this process is single-threaded.
            unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET) },
            "unshare the mount, ipc, uts and network namespaces",
        )?;
        // Nothing mounted from here on may reach back into the host's namespace.
        mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, "make / private")?;
        mount(Some(&self.root), &self.root, None, libc::MS_BIND, "bind the jail directory onto itself")?;
        for path in &self.read_only {
            self.bind(path, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC)?;
        }
        for device in DEVICES {
            let device = Path::new(device);
            match device.exists() {
                false => {}
                // A user namespace may not make device nodes; the caller's access to the
                // host's is what it has.
                true if self.user_namespace => self.bind(device, libc::MS_NOSUID | libc::MS_NOEXEC)?,
                true => self.make_device(device)?,
            }
        }
        // /proc/self/pagemap finds a restored VM's written pages when it is frozen for a fork.
        // A procfs of the VMM's own pid namespace, pid directories only, shows no other process
        // and none of /proc/sys.
        let proc = self.host_path(Path::new("/proc"));
        std::fs::create_dir_all(&proc).map_err(step(format!("create {}", proc.display())))?;
        // subset=pid (Linux 5.8): only the pid directories; hidepid=invisible: only this
        // user's processes, all the pid namespace holds anyway.
        let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount_data(Path::new("proc"), &proc, c"proc", proc_flags, c"subset=pid,hidepid=invisible")
            .or_else(|_| mount_data(Path::new("proc"), &proc, c"proc", proc_flags, c"hidepid=invisible"))?;
        let last_capability = last_capability();
        self.pivot()?;
        // While still root, which may raise a hard limit to what the VMM needs (root of a user
        // namespace may only lower one).
        let lower_only = self.user_namespace;
        set_limit(libc::RLIMIT_NOFILE, MAX_OPEN_FILES, lower_only)?;
        set_limit(libc::RLIMIT_NPROC, MAX_PROCESSES, lower_only)?;
        set_limit(libc::RLIMIT_FSIZE, self.max_file_size, lower_only)?;
        set_limit(libc::RLIMIT_CORE, 0, lower_only)?;
        self.drop_privileges(last_capability)?;
        // SAFETY: umask only changes this process's file creation mask.
        unsafe { libc::umask(0o077) };
        tracing::info!("jailed in {} as {}:{}", self.root.display(), self.uid, self.gid);
        Ok(())
    }

    /// Bind-mounts host `path` at the same path inside the jail, then remounts it with
    /// `flags` (a bind mount takes no flags of its own on its first mount).
    fn bind(&self, path: &Path, flags: libc::c_ulong) -> Result<(), JailError> {
        let target = self.host_path(path);
        let is_dir = std::fs::metadata(path).map_err(step(format!("look at {}", path.display())))?.is_dir();
        let made = if is_dir {
            std::fs::create_dir_all(&target)
        } else {
            target
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&target).map(drop))
        };
        made.map_err(step(format!("make the mount point {}", target.display())))?;
        let what = format!("bind {} into the jail", path.display());
        mount(Some(path), &target, None, libc::MS_BIND | libc::MS_REC, &what)?;
        mount(None, &target, None, libc::MS_BIND | libc::MS_REMOUNT | flags, &what)
    }

    /// Makes a device node inside the jail like the host's `device` (same numbers), for the
    /// jail uid alone: the host's node is usually root's only, and a bind mount would share it.
    fn make_device(&self, device: &Path) -> Result<(), JailError> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(device).map_err(step(format!("look at {}", device.display())))?.rdev();
        let target = self.host_path(device);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(step(format!("create {}", parent.display())))?;
        }
        let _ = std::fs::remove_file(&target);
        let target_c = cstring(&target)?;
        let what = format!("make the device node {}", target.display());
        // SAFETY: mknod and chown with a valid NUL-terminated path.
        unsafe {
            check(libc::mknod(target_c.as_ptr(), libc::S_IFCHR | 0o600, rdev), &what)?;
            check(libc::chown(target_c.as_ptr(), self.uid, self.gid), &what)
        }
    }

    /// Makes the jail directory `/`. pivot_root cannot leave the initial ramfs (a host booted
    /// into its initramfs, as the nested harness's middle machine is): there the jail is
    /// moved over `/` and chrooted into instead, which with every capability dropped after is
    /// as final.
    fn pivot(&self) -> Result<(), JailError> {
        std::env::set_current_dir(&self.root).map_err(step("enter the jail directory"))?;
        let dot = c".";
        // SAFETY: pivot_root with two valid NUL-terminated paths.
        let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
        if pivoted == 0 {
            // The old root is now stacked under the new one, at ".": detach it.
            // SAFETY: umount2 of a valid path.
            check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }, "detach the host's root")?;
        } else {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EINVAL) {
                return Err(JailError::Step { step: "pivot_root into the jail".into(), error });
            }
            mount(Some(Path::new(".")), Path::new("/"), None, libc::MS_MOVE, "move the jail over /")?;
            // SAFETY: chroot of a valid path.
            check(unsafe { libc::chroot(dot.as_ptr()) }, "chroot into the jail")?;
        }
        std::env::set_current_dir("/").map_err(step("enter /"))
    }

    fn drop_privileges(&self, last_capability: libc::c_ulong) -> Result<(), JailError> {
        // The bounding set first (that needs CAP_SETPCAP, gone after the uid change), so that
        // nothing can gain a capability back; then the ambient set.
        for cap in 0..=last_capability {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        }
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
        if self.user_namespace {
            // The one id the namespace maps is the caller's; its capabilities go explicitly.
            clear_capabilities()?;
        } else {
            // SAFETY: setgroups with an empty list; setresgid/setresuid with plain ids. The C
            // library applies them to every thread, and there is only this one.
            unsafe {
                check(libc::setgroups(0, std::ptr::null()), "drop supplementary groups")?;
                check(libc::setresgid(self.gid, self.gid, self.gid), "set the jail gid")?;
                check(libc::setresuid(self.uid, self.uid, self.uid), "set the jail uid")?;
            }
        }
        // A uid change makes the process undumpable, which closes its own /proc/self/pagemap
        // to it (freezing a restored VM for a fork reads it). Dumpable again: core dumps stay
        // off (RLIMIT_CORE 0), and no one could attach anyway (no ptrace in its seccomp filters,
        // and no other process in its pid namespace).
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) }, "set dumpable")?;
        // Leaving uid 0 for good (or capset) cleared the permitted and effective sets; a check
        // is cheap.
        // SAFETY: prctl with integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, "set no_new_privs")?;
        if capabilities_held() {
            return Err(JailError::Step {
                step: "drop capabilities".into(),
                error: std::io::Error::other("capabilities are still held after leaving uid 0"),
            });
        }
        Ok(())
    }
}

fn mount(source: Option<&Path>, target: &Path, fstype: Option<&std::ffi::CStr>, flags: libc::c_ulong, what: &str) -> Result<(), JailError> {
    let source = source.map(cstring).transpose()?;
    let target = cstring(target)?;
    // SAFETY: mount with valid NUL-terminated strings or null pointers where the call
    // allows them.
    let rc = unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    check(rc, what)
}

/// Mounts a file system of type `fstype` with mount options `data`.
fn mount_data(source: &Path, target: &Path, fstype: &std::ffi::CStr, flags: libc::c_ulong, data: &std::ffi::CStr) -> Result<(), JailError> {
    let source = cstring(source)?;
    let target_c = cstring(target)?;
    // SAFETY: mount with valid NUL-terminated strings.
    let rc = unsafe { libc::mount(source.as_ptr(), target_c.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    check(rc, &format!("mount {} on {}", fstype.to_string_lossy(), target.display()))
}

fn cstring(path: &Path) -> Result<CString, JailError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| JailError::Relative { path: path.into() })
}

fn check(rc: impl Into<i64>, what: &str) -> Result<(), JailError> {
    match rc.into() {
        -1 => Err(JailError::Step { step: what.into(), error: std::io::Error::last_os_error() }),
        _ => Ok(()),
    }
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64, lower_only: bool) -> Result<(), JailError> {
    let mut now = libc::rlimit { rlim_cur: 0, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: getrlimit writes the valid struct passed.
    if lower_only && unsafe { libc::getrlimit(resource, &mut now) } != 0 {
        return check(-1, &format!("read resource limit {resource}"));
    }
    let value = if lower_only { value.min(now.rlim_max) } else { value };
    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads the valid struct passed.
    check(unsafe { libc::setrlimit(resource, &limit) }, &format!("set resource limit {resource}"))
}

/// The highest capability number this kernel knows.
fn last_capability() -> libc::c_ulong {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: two `CapData`, capabilities 0–31 and 32–63.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Empties this thread's effective, permitted and inheritable sets (capset, version 3).
fn clear_capabilities() -> Result<(), JailError> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two CapData structs (version 3) from valid memory.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) }, "clear the capabilities")
}

/// Whether any capability is still permitted or effective (capget, version 3).
fn capabilities_held() -> bool {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData structs (version 3) into the array passed.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    rc != 0 || data.iter().any(|d| d.effective != 0 || d.permitted != 0)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;

    use super::*;

    const CHILD: &str = "EMBER_JAIL_TEST_ROOT";

    /// Runs in a child test process (one thread: `--test-threads=1`), jailed in the directory
    /// the parent made (in a user namespace of its own if `EMBER_JAIL_TEST_USERNS` is set),
    /// and reports what it can see.
    #[test]
    fn a_jailed_process_sees_only_its_jail_as_an_unprivileged_user() {
        if let Some(root) = std::env::var_os(CHILD) {
            let ro = PathBuf::from(std::env::var_os("EMBER_JAIL_TEST_RO").unwrap());
            let user_namespace = std::env::var_os("EMBER_JAIL_TEST_USERNS").is_some();
            let jail = Jail { root: root.into(), uid: 60123, gid: 60124, read_only: vec![ro.clone()], max_file_size: 1 << 20, user_namespace };
            jail.enter().unwrap();
            let mut seen: Vec<String> = std::fs::read_dir("/").unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            seen.sort();
            println!("root: {}", seen.join(","));
            // SAFETY: getuid/getgid have no preconditions.
            println!("ids: {} {}", unsafe { libc::getuid() }, unsafe { libc::getgid() });
            println!("caps held: {}", capabilities_held());
            println!("read-only file: {}", std::fs::read_to_string(&ro).unwrap().trim());
            println!("write to it: {}", std::fs::write(&ro, "x").is_ok());
            let procs = std::fs::read_dir("/proc").unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().parse::<u32>().is_ok()).count();
            println!("processes: {procs}");
            println!("kvm opens: {}", std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok());
            println!("no_new_privs: {}", std::fs::read_to_string("/proc/thread-self/status").unwrap().lines().any(|l| l == "NoNewPrivs:\t1"));
            return;
        }
        if !crate::privileged() {
            eprintln!("skipped: needs root");
            return;
        }
        let (stdout, ro, _tmp) = jailed_child(false);
        let dev = if Path::new("/dev/kvm").exists() { "dev," } else { "" };
        let top = ro.strip_prefix("/").unwrap().iter().next().unwrap().to_string_lossy().into_owned();
        assert!(stdout.contains(&format!("root: {dev}mine,proc,{top}\n")), "{stdout}");
        assert!(stdout.contains("ids: 60123 60124"), "{stdout}");
        assert!(stdout.contains("caps held: false"), "{stdout}");
        assert!(stdout.contains("read-only file: base image"), "{stdout}");
        assert!(stdout.contains("write to it: false"), "the read-only bind mount was writable: {stdout}");
        assert!(stdout.contains("processes: 1\n"), "other processes are visible: {stdout}");
        assert!(stdout.contains("no_new_privs: true"), "{stdout}");
        if !dev.is_empty() {
            assert!(stdout.contains("kvm opens: true"), "the jail's /dev/kvm is not the jail user's: {stdout}");
        }
        assert_eq!(std::fs::read_to_string(&ro).unwrap(), "base image\n", "the host file changed");
    }

    /// Not the plain test's jail uid: its hidepid /proc would show this test's processes.
    const USERNS_UID: u32 = 60125;

    /// The same jail entered by a process that an unprivileged user (USERNS_UID) started in
    /// a user namespace of its own: root there, the caller outside, no capabilities after.
    /// Run as root, the test starts itself as that user (`EMBER_JAIL_TEST_SPAWNER`), which
    /// spawns the jailed child as the control plane would.
    #[test]
    fn a_process_jailed_in_its_own_user_namespace_keeps_the_callers_uid_and_no_capabilities() {
        if let Some(script) = std::env::var_os("EMBER_JAIL_TEST_SPAWNER") {
            use std::os::fd::AsFd;
            let stdout = || std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().unwrap());
            // SAFETY: getuid/getgid have no preconditions.
            let ids = unsafe { (libc::getuid(), libc::getgid()) };
            let mut process = crate::spawn::spawn(crate::spawn::Spawn {
                program: Path::new("/bin/sh"),
                args: vec!["-c".into(), script],
                stdout: stdout(),
                stderr: stdout(),
                new_pid_namespace: true,
                user_namespace: Some(ids),
                cgroup: None,
                tied: true,
            })
            .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            let status = loop {
                if let Some(status) = process.try_wait() {
                    break status;
                }
                assert!(std::time::Instant::now() < deadline, "the jailed child did not end");
                std::thread::sleep(std::time::Duration::from_millis(10));
            };
            assert!(status.success(), "the jailed child failed");
            return;
        }
        if !crate::privileged() || !crate::user_namespaces_allowed() {
            eprintln!("skipped: needs root (to act as another user) and user namespaces");
            return;
        }
        // The other user runs this test binary: every directory above it must let others in.
        let exe = std::env::current_exe().unwrap();
        let reachable = exe.ancestors().all(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
        });
        if !reachable {
            eprintln!("skipped: {} is not reachable by other users", exe.display());
            return;
        }
        let (stdout, ro, _tmp) = jailed_child(true);
        let dev = if Path::new("/dev/kvm").exists() { "dev," } else { "" };
        let top = ro.strip_prefix("/").unwrap().iter().next().unwrap().to_string_lossy().into_owned();
        assert!(stdout.contains(&format!("root: {dev}mine,proc,{top}\n")), "{stdout}");
        assert!(stdout.contains("ids: 0 0"), "not uid 0 of its namespace: {stdout}");
        assert!(stdout.contains("caps held: false"), "{stdout}");
        assert!(stdout.contains("write to it: false"), "the read-only bind mount was writable: {stdout}");
        assert!(stdout.contains("processes: 1\n"), "other processes are visible: {stdout}");
        assert!(stdout.contains("no_new_privs: true"), "{stdout}");
        assert_eq!(std::fs::read_to_string(&ro).unwrap(), "base image\n", "the host file changed");
    }

    /// Runs the test above in a child jailed in a new directory; its output, the read-only
    /// file it was given, and the directory (removed on drop).
    fn jailed_child(user_namespace: bool) -> (String, PathBuf, vmm_sys_util::tempdir::TempDir) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-jail-").unwrap();
        // Passable by the user of the user namespace, which root's capabilities there do not
        // reach.
        std::fs::set_permissions(tmp.as_path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root = tmp.as_path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("mine"), "").unwrap();
        if user_namespace {
            // The jail directory is the caller's, as the control plane makes it.
            std::os::unix::fs::chown(&root, Some(USERNS_UID), Some(USERNS_UID)).unwrap();
        }
        let ro = tmp.as_path().join("image");
        std::fs::write(&ro, "base image\n").unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o666)).unwrap();
        let name = "enter::tests::a_jailed_process_sees_only_its_jail_as_an_unprivileged_user";
        let test = std::env::current_exe().unwrap();
        if !user_namespace {
            let out = Command::new(&test)
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(CHILD, &root)
                .env("EMBER_JAIL_TEST_RO", &ro)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(out.status.success(), "the jailed child failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
            return (stdout, ro, tmp);
        }
        // As user USERNS_UID would: it spawns the child, its ids mapped to 0 in the new namespace.
        let script = format!(
            "{CHILD}={} EMBER_JAIL_TEST_RO={} EMBER_JAIL_TEST_USERNS=1 exec {} --exact {name} --nocapture --test-threads=1",
            root.display(),
            ro.display(),
            test.display()
        );
        let spawner = "enter::tests::a_process_jailed_in_its_own_user_namespace_keeps_the_callers_uid_and_no_capabilities";
        let out = std::os::unix::process::CommandExt::gid(std::os::unix::process::CommandExt::uid(&mut Command::new(&test), USERNS_UID), USERNS_UID)
            .args(["--exact", spawner, "--nocapture", "--test-threads=1"])
            .env("EMBER_JAIL_TEST_SPAWNER", script)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "the spawner failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        (stdout, ro, tmp)
    }
}
