//! Memory benchmark: the private memory of an idle VMM process started from a snapshot, as a
//! forked child sandbox is. Prints its anonymous memory by kind; checks nothing.
//!
//!     cargo bench -p ember-benches --bench vmm_memory
//!
//! EMBER_BIN is the `ember` binary to measure (default: `ember` built first into the release
//! directory this bench was built into; the figures that matter are those of the static build the harness
//! uses). EMBER_IDLE_SECS is how long the VMM idles before it is measured (default 2).
//!
//! A hand-assembled guest of 256 MiB (this host's KVM may not boot Linux) with a drive and a
//! vsock device is built in this process; its devices are driven through their registers as a
//! guest driver would (so that they are active, with a disk write and a flush waiting in the
//! block queue and buffers in the vsock queues), then its memory is frozen and its state
//! written, as `ember fork` has a parent VMM do. A new `ember vmm` loads it as a fork's child
//! does: metrics file, its own qcow2 overlay on the drive's frozen layer (over a 1 GiB raw
//! base), its own vsock socket. The restored device serves the waiting requests, and the guest
//! halts. Memory counts as in the harness: `Anonymous` of /proc/PID/smaps, guest RAM mappings
//! (the frozen memfd) apart from the VMM's own.

mod common;

use common::{elf, env};
use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use api::client::ApiClient;
use api::models::{
    DiskFormat, DriveOverride, MetricsConfig, SnapshotLoadParams, VsockOverride,
};
use vmm::arch::x86_64::layout::VIRTIO_MMIO_START;
use vmm::builder::build;
use vmm::config::{DriveConfig, VmConfig, VsockConfig};
use disk::overlay;
use vmm::Vmm;
use vmm_sys_util::tempdir::TempDir;

/// `out 0x80, al; hlt; jmp $-1`: one exit to show it ran, then halted for good (interrupts off).
const GUEST: [u8; 5] = [0xe6, 0x80, 0xf4, 0xeb, 0xfd];
const MEM_MIB: u64 = 256;
const BASE_BYTES: u64 = 1 << 30;
/// Where the driver's rings go: 64 KiB per device, 16 KiB per queue.
const RINGS: u64 = 0x20_0000;
/// Where the block requests and the vsock buffers go.
const BUFFERS: u64 = 0x30_0000;
const QUEUE_SIZE: u16 = 256;
/// What the guest writes to its disk; the child's write goes to this sector.
const DATA_BYTE: u8 = 0xab;
const CHILD_SECTOR: u64 = 100 << 11;

/// Guest memory addresses of queue `q` of virtio device `dev`: descriptors, avail, used.
fn ring(dev: u64, q: u64) -> (u64, u64, u64) {
    let at = RINGS + dev * 0x1_0000 + q * 0x4000;
    (at, at + 0x1000, at + 0x2000)
}

/// Sets up virtio device `dev` through its MMIO registers as a guest driver does, with
/// `queues` queues, and starts it.
fn activate(vm: &Vmm, dev: u64, queues: u64) {
    let reg = |offset: u64, value: u32| {
        vm.devices().mmio().write(VIRTIO_MMIO_START + dev * 0x1000 + offset, &value.to_le_bytes());
    };
    reg(0x70, 1);
    reg(0x70, 3);
    reg(0x24, 1);
    reg(0x20, 1); // VIRTIO_F_VERSION_1
    reg(0x70, 11);
    for q in 0..queues {
        let (desc, avail, used) = ring(dev, q);
        reg(0x30, q as u32);
        reg(0x38, QUEUE_SIZE as u32);
        reg(0x80, desc as u32);
        reg(0x90, avail as u32);
        reg(0xa0, used as u32);
        reg(0x44, 1);
    }
    reg(0x70, 15);
    let mut status = [0u8; 4];
    vm.devices().mmio().read(VIRTIO_MMIO_START + dev * 0x1000 + 0x70, &mut status);
    assert_eq!(u32::from_le_bytes(status), 15, "virtio device {dev} is active");
}

/// Hands queue `q` of device `dev` the descriptor chains `chains` (address, length, device
/// writable) from avail ring position `from` on (descriptors from `4 * from`), without
/// notifying the device.
fn offer(mem: &GuestMemoryMmap, dev: u64, q: u64, from: u16, chains: &[&[(u64, u32, bool)]]) {
    let (desc, avail, _) = ring(dev, q);
    for (n, chain) in chains.iter().enumerate() {
        let slot = from + n as u16;
        let head = 4 * slot;
        mem.write_obj(head, GuestAddress(avail + 4 + 2 * (slot % QUEUE_SIZE) as u64)).unwrap();
        for (i, &(addr, len, writable)) in chain.iter().enumerate() {
            let d = head + i as u16;
            let next = i + 1 < chain.len();
            let flags = if writable { VRING_DESC_F_WRITE } else { 0 } | if next { VRING_DESC_F_NEXT } else { 0 };
            let at = desc + 16 * d as u64;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags as u16, GuestAddress(at + 12)).unwrap();
            mem.write_obj(d + 1, GuestAddress(at + 14)).unwrap();
        }
    }
    mem.write_obj(from + chains.len() as u16, GuestAddress(avail + 2)).unwrap();
}

/// A virtio-blk request header at `at`: type, then the sector.
fn blk_header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) -> u64 {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    at
}

/// Builds the guest, starts its devices, runs it to its first exit, freezes its memory and
/// writes its state to `state`. Returns the VM, its frozen memory and its drive's file.
fn make_parent(dir: &Path, state: &Path) -> (Vmm, std::sync::Arc<std::fs::File>, PathBuf) {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, elf(&GUEST)).unwrap();
    let base = dir.join("base.raw");
    std::fs::File::create(&base).unwrap().set_len(BASE_BYTES).unwrap();
    let layer = dir.join("layer.qcow2");
    let backing = disk::BackingPolicy::new([dir]).unwrap();
    overlay::create(overlay::Base { path: &base, format: disk::Format::Raw, policy: &backing }, &layer).unwrap();
    let cfg = VmConfig {
        kernel,
        initrd: None,
        cmdline: None,
        mem_mib: MEM_MIB,
        vcpus: 1,
        drives: vec![DriveConfig {
            id: Some("rootfs".into()),
            path: layer.clone(),
            read_only: false,
            root: true,
            format: disk::Format::Qcow2,
        }],
        vsock: Some(VsockConfig { cid: 3, uds: dir.join("parent.sock") }),
        backing,
    };
    let mut vm = build(&cfg, Box::new(std::io::sink())).expect("VM builds");
    activate(&vm, 0, 1);
    activate(&vm, 1, 3);
    let mem = &vm.ram().memory;
    // The parent's disk holds data of its own (as a booted guest's overlay does), so the layer
    // under the child's overlay is not empty: three writes and a flush, served now. Then a
    // write and a flush wait in the queue, for the child to serve.
    let (data, status) = (BUFFERS + 0x1000, BUFFERS + 0x800);
    mem.write_slice(&[DATA_BYTE; 4096], GuestAddress(data)).unwrap();
    let flush = blk_header(mem, BUFFERS + 0x400, VIRTIO_BLK_T_FLUSH, 0);
    let mut chains: Vec<Vec<(u64, u32, bool)>> = [0u64, 1 << 20, 3 << 20]
        .iter()
        .enumerate()
        .map(|(i, &sector)| {
            let header = blk_header(mem, BUFFERS + 0x100 * i as u64, VIRTIO_BLK_T_OUT, sector);
            vec![(header, 16, false), (data, 4096, false), (status + i as u64, 1, true)]
        })
        .collect();
    chains.push(vec![(flush, 16, false), (status + 3, 1, true)]);
    offer(mem, 0, 0, 0, &chains.iter().map(|c| &c[..]).collect::<Vec<_>>());
    vm.devices().mmio().write(VIRTIO_MMIO_START + 0x50, &0u32.to_le_bytes());
    let served: u16 = mem.read_obj(GuestAddress(ring(0, 0).2 + 2)).unwrap();
    assert_eq!(served, 4, "the parent's disk requests were served");
    let write = blk_header(mem, BUFFERS + 0x300, VIRTIO_BLK_T_OUT, CHILD_SECTOR);
    let child: [&[_]; 2] =
        [&[(write, 16, false), (data, 4096, false), (status + 4, 1, true)], &[(flush, 16, false), (status + 5, 1, true)]];
    offer(mem, 0, 0, 4, &child);
    // The vsock device gets receive buffers and event buffers, as Linux's driver gives it.
    let rx: Vec<[(u64, u32, bool); 1]> = (0..64).map(|i| [(0x40_0000 + i * 0x1000, 0x1000, true)]).collect();
    offer(mem, 1, 0, 0, &rx.iter().map(|c| &c[..]).collect::<Vec<_>>());
    let ev: Vec<[(u64, u32, bool); 1]> = (0..4).map(|i| [(BUFFERS + 0x900 + i * 8, 8, true)]).collect();
    offer(mem, 1, 2, 0, &ev.iter().map(|c| &c[..]).collect::<Vec<_>>());

    let fd = vm.vcpus_mut()[0].kvm_fd();
    assert!(matches!(fd.run().expect("KVM_RUN"), VcpuExit::IoOut(0x80, _)));
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
    let vcpus = vm.save_vcpus().unwrap();
    let frozen = vm.snapshot_frozen(state, vcpus).expect("state written and memory frozen");
    (vm, frozen.base, layer)
}

#[derive(Default, Clone)]
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    name: String,
    fields: HashMap<String, u64>,
}

impl Mapping {
    fn kib(&self, field: &str) -> u64 {
        self.fields.get(field).copied().unwrap_or(0)
    }
}

fn smaps(pid: u32) -> Vec<Mapping> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-').filter(|(a, _)| u64::from_str_radix(a, 16).is_ok()) {
            let perms = words.next().unwrap_or_default().to_string();
            let name = words.nth(3).map(|_| line.splitn(6, char::is_whitespace).last().unwrap_or("").trim().to_string());
            maps.push(Mapping {
                start: u64::from_str_radix(a, 16).unwrap(),
                end: u64::from_str_radix(b, 16).unwrap(),
                perms,
                name: name.unwrap_or_default(),
                fields: HashMap::new(),
            });
        } else if let (Some(m), Some(key), Some(v)) = (maps.last_mut(), first.strip_suffix(':'), words.next()) {
            if let Ok(v) = v.parse() {
                m.fields.insert(key.to_string(), v);
            }
        }
    }
    maps
}

/// Each thread's name and stack pointer (from /proc/PID/task/TID/syscall: the threads are
/// blocked in system calls).
fn threads(pid: u32) -> Vec<(String, Option<u64>)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let syscall = std::fs::read_to_string(task.path().join("syscall")).unwrap_or_default();
        let words: Vec<&str> = syscall.split_whitespace().collect();
        let sp = (words.len() == 9).then(|| u64::from_str_radix(words[7].trim_start_matches("0x"), 16).ok()).flatten();
        out.push((comm, sp));
    }
    out.sort();
    out
}

/// Has the VMM run where this host's /dev/kvm passes its host check, though it cannot run a
/// Linux guest (the PVM nested hypervisor: the hand-assembled guest runs): in a mount namespace
/// of its own without /sys/module and with a /proc/cpuinfo that names `svm`. Needs root.
fn pass_host_check(command: &mut Command, dir: &Path) {
    let cpuinfo = dir.join("cpuinfo");
    std::fs::write(&cpuinfo, "flags\t\t: svm\n").unwrap();
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let (cpuinfo, proc_cpuinfo, sys_module) = (c(&cpuinfo), c(Path::new("/proc/cpuinfo")), c(Path::new("/sys/module")));
    let tmpfs = c(Path::new("tmpfs"));
    // SAFETY: unshare and mount are async-signal-safe and use only memory made before the fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            let null = std::ptr::null();
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, null as _) == 0
                && libc::mount(tmpfs.as_ptr(), sys_module.as_ptr(), tmpfs.as_ptr(), 0, null as _) == 0
                && libc::mount(cpuinfo.as_ptr(), proc_cpuinfo.as_ptr(), null, libc::MS_BIND, null as _) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

fn main() {
    let ember = std::env::var_os("EMBER_BIN").map(PathBuf::from).unwrap_or_else(|| {
        // Built here, so that a stale binary from an older tree (another snapshot format) is
        // never what gets measured.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let built = Command::new(cargo)
            .args(["build", "--release", "--quiet", "--bin", "ember", "--manifest-path"])
            .arg(&manifest)
            .status()
            .expect("cargo runs");
        assert!(built.success(), "cargo build --release --bin ember failed");
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().join("ember")
    });
    assert!(ember.exists(), "{} is missing: build it (cargo build --release --bin ember) or set EMBER_BIN", ember.display());
    let idle = Duration::from_secs(env("EMBER_IDLE_SECS", 2));
    let tmp = TempDir::new_with_prefix("/tmp/ember-memory-bench-").unwrap();
    let dir = tmp.as_path();
    let state = dir.join("state");
    let (parent, memory, layer) = make_parent(dir, &state);
    // The parent lets go of its disk (a forked parent moves to a new overlay); its frozen
    // memory stays open here.
    drop(parent);
    let child_disk = dir.join("child.qcow2");
    let backing = disk::BackingPolicy::new([dir]).unwrap();
    overlay::create(overlay::Base { path: &layer, format: disk::Format::Qcow2, policy: &backing }, &child_disk).unwrap();

    let api_sock = dir.join("api.sock");
    let mut command = Command::new(&ember);
    command
        .args(["vmm", "--id", "child", "--disk-dir"])
        .arg(dir)
        .arg("--api-sock")
        .arg(&api_sock)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("console.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("vmm.log")).unwrap());
    if vmm::vstate::kvm::check_host().is_err() {
        pass_host_check(&mut command, dir);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&api_sock).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
            panic!("the VMM exited ({status}): {log}");
        }
        assert!(Instant::now() < deadline, "the VMM's API socket did not appear");
        std::thread::sleep(Duration::from_millis(5));
    }
    let api = ApiClient::new(&api_sock);
    api.put("/metrics", &MetricsConfig { metrics_path: dir.join("metrics.json").display().to_string() }).unwrap();
    api.put_with_fds(
        "/snapshot/load",
        &SnapshotLoadParams {
            snapshot_path: state.display().to_string(),
            mem_backend: None,
            mem_file_path: None,
            enable_diff_snapshots: false,
            track_dirty_pages: false,
            resume_vm: true,
            drive_overrides: vec![DriveOverride {
                index: 0,
                path_on_host: child_disk.display().to_string(),
                is_read_only: Some(false),
                format: Some(DiskFormat::Qcow2),
            }],
            vsock_override: Some(VsockOverride { guest_cid: Some(4), uds_path: Some(dir.join("vsock.sock").display().to_string()) }),
            mem_fds: Some(1),
        },
        &[memory.as_fd()],
    )
    .unwrap();
    std::thread::sleep(idle);

    let pid = child.id();
    let maps = smaps(pid);
    let threads = threads(pid);
    let _ = child.kill();
    let _ = child.wait();
    let mut sector = [0u8; 512];
    let mut disk = disk::open(&child_disk, disk::Format::Qcow2, true, &backing).unwrap();
    disk.read_vectored(CHILD_SECTOR * 512, &[vm_memory::VolatileSlice::from(&mut sector[..])]).unwrap();
    assert_eq!(sector, [DATA_BYTE; 512], "the child served the write waiting in its queue");

    let binary = std::fs::canonicalize(&ember).unwrap().display().to_string();
    let binary_end = maps.iter().filter(|m| m.name == binary).map(|m| m.end).max().unwrap_or(0);
    let stack_of = |m: &Mapping| threads.iter().find(|(_, sp)| sp.is_some_and(|sp| m.start <= sp && sp < m.end));
    let mut stacks = Vec::new();
    let mut kinds: Vec<(&str, u64)> = vec![
        ("guest RAM mappings", 0),
        ("heap ([heap])", 0),
        ("thread stacks", 0),
        ("binary: relocated data", 0),
        ("binary: .bss", 0),
        ("other", 0),
    ];
    let mut others = Vec::new();
    for m in &maps {
        let anon = m.kib("Anonymous");
        let kind = if m.name.contains("ember-guest-ram") || m.name.ends_with("/memory") {
            0
        } else if m.name == "[heap]" {
            1
        } else if let Some((thread, _)) = stack_of(m) {
            stacks.push(format!("{thread} {anon}"));
            2
        } else if m.name == binary {
            3
        } else if m.name.is_empty() && m.start == binary_end {
            4
        } else {
            if anon > 0 {
                others.push(m.clone());
            }
            5
        };
        kinds[kind].1 += anon;
    }
    let total: u64 = kinds.iter().map(|k| k.1).sum();
    println!(
        "idle VMM restored as a fork's child ({MEM_MIB} MiB guest, 1 vCPU, qcow2 overlay drive, vsock), after {idle:?}"
    );
    println!("  binary {binary}");
    println!("  threads: {}", threads.len());
    println!("anonymous memory, KiB:");
    println!("  {:32} {:>6}", kinds[0].0, kinds[0].1);
    println!("  {:32} {:>6}", "VMM's own", total - kinds[0].1);
    for (what, kib) in &kinds[1..] {
        println!("    {what:30} {kib:>6}");
        if what.starts_with("thread stacks") {
            println!("      ({})", stacks.join(", "));
        }
    }
    for m in others {
        println!("      {:x}-{:x} {} {:24} {:>6}", m.start, m.end, m.perms, m.name, m.kib("Anonymous"));
    }
}
