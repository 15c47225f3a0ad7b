//! Restore benchmark, host-side: the work from a load request to the first KVM_RUN of a VM
//! restored from a snapshot, on this host's /dev/kvm. Prints the median and worst of each step
//! over many restores; checks nothing. The VM itself is made before the load request
//! (`snapshot::prepare`), as a VMM process waiting for one does; that is reported apart.
//!
//!     cargo bench -p ember-benches --bench restore
//!
//! The guest is a hand-assembled loop (this host's KVM may not boot Linux) with EMBER_RESTORE_MIB
//! of RAM (default 256), one drive (raw) and a vsock device; EMBER_RESTORE_VCPUS vCPUs (default
//! 1), EMBER_RESTORE_RUNS restores (default 50). Its memory is mostly untouched, as a freshly
//! booted guest's is not; restore does not depend on it, since the memory file is mapped and
//! never read here.

mod common;

use common::{elf, env};
use std::path::Path;
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vmm::builder::build;
use vmm::config::{DriveConfig, VmConfig, VsockConfig};
use vmm::snapshot::{self, MemoryFiles, Overrides, SnapshotFiles};
use vmm::Vmm;
use vmm_sys_util::tempdir::TempDir;

/// `inc rbx; out 0x80, eax; jmp $-5`: one port write per loop.
const GUEST: [u8; 7] = [0x48, 0xff, 0xc3, 0xe7, 0x80, 0xeb, 0xf9];

/// Boots the guest, lets it run a few loops, and snapshots it into `dir/snap`.
fn make_snapshot(dir: &Path, mem_mib: u64, vcpus: u8) -> snapshot::SnapshotInfo {
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, elf(&GUEST)).unwrap();
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let cfg = VmConfig {
        kernel,
        initrd: None,
        cmdline: None,
        mem_mib,
        vcpus,
        drives: vec![DriveConfig { id: None, path: disk, read_only: false, root: true, format: disk::Format::Raw }],
        vsock: Some(VsockConfig { cid: 3, uds: dir.join("vsock.sock") }),
        backing: Default::default(),
    };
    let mut vm = build(&cfg, Box::new(std::io::sink())).expect("VM builds");
    let fd = vm.vcpus_mut()[0].kvm_fd();
    for _ in 0..10 {
        assert!(matches!(fd.run().expect("KVM_RUN"), VcpuExit::IoOut(0x80, _)));
    }
    fd.set_kvm_immediate_exit(1);
    let _ = fd.run();
    fd.set_kvm_immediate_exit(0);
    let vcpus = vm.save_vcpus().unwrap();
    vm.snapshot(&SnapshotFiles::in_dir(&dir.join("snap")), vcpus).expect("snapshot written")
}

#[derive(Default)]
struct Steps {
    prepare: Vec<Duration>,
    state: Vec<Duration>,
    devices: Vec<Duration>,
    memory: Vec<Duration>,
    kvm: Vec<Duration>,
    total: Vec<Duration>,
    first_exit: Vec<Duration>,
}

fn report(label: &str, times: &mut [Duration]) {
    times.sort();
    let n = times.len();
    println!("  {label:44} median {:>9.1?}  max {:>9.1?}", times[n / 2], times[n - 1]);
}

fn main() {
    let mem_mib = env("EMBER_RESTORE_MIB", 256);
    let vcpus = env("EMBER_RESTORE_VCPUS", 1) as u8;
    let runs = env("EMBER_RESTORE_RUNS", 50) as usize;
    let dir = TempDir::new_with_prefix("/tmp/ember-restore-bench-").unwrap();
    let info = make_snapshot(dir.as_path(), mem_mib, vcpus);
    let snap = SnapshotFiles::in_dir(&dir.as_path().join("snap"));
    println!(
        "snapshot: {mem_mib} MiB guest, {vcpus} vCPU(s), state file {} bytes, {} KiB of memory data",
        info.state_bytes,
        info.memory_bytes >> 10
    );

    let overrides = Overrides { vsock_uds: Some(dir.as_path().join("restored.sock")), ..Default::default() };
    let mut steps = Steps::default();
    for _ in 0..runs {
        let p0 = Instant::now();
        let prepared = snapshot::prepare().unwrap();
        steps.prepare.push(p0.elapsed());
        let t0 = Instant::now();
        let state = snapshot::read_state(&snap.state).unwrap();
        snapshot::check_limits(&state, prepared.max_vcpus()).unwrap();
        let t1 = Instant::now();
        let devices = snapshot::open_devices(&state, &overrides, &Default::default()).unwrap();
        let t2 = Instant::now();
        let ram = snapshot::map_memory(MemoryFiles::Path(snap.memory.clone()), &state).unwrap();
        let t3 = Instant::now();
        let mut vm = Vmm::restore(prepared, &state, ram, devices, Box::new(std::io::sink())).unwrap();
        let t4 = Instant::now();
        let exit = vm.vcpus_mut()[0].kvm_fd().run().expect("KVM_RUN");
        let t5 = Instant::now();
        assert!(matches!(exit, VcpuExit::IoOut(0x80, _)), "the restored guest runs its loop");
        steps.state.push(t1 - t0);
        steps.devices.push(t2 - t1);
        steps.memory.push(t3 - t2);
        steps.kvm.push(t4 - t3);
        steps.total.push(t4 - t0);
        steps.first_exit.push(t5 - t4);
        drop(vm);
    }
    println!("made before the load request, {runs} runs:");
    report("KVM VM, irqchip, PIT, first memory slot", &mut steps.prepare);
    println!("host-side restore, {runs} runs:");
    report("state file read + verify + check", &mut steps.state);
    report("disk open + vsock socket", &mut steps.devices);
    report("memory file mapping (private)", &mut steps.memory);
    report("KVM VM + devices + vCPUs, state restored", &mut steps.kvm);
    report("total: load request to first KVM_RUN entry", &mut steps.total);
    report("(first KVM_RUN until the guest's first exit)", &mut steps.first_exit);
}
