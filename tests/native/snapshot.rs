//! Snapshot and restore on this host's /dev/kvm with a hand-assembled guest that counts: in a
//! register and in memory, reporting both through port I/O. A VM is run, stopped, snapshotted,
//! and restored into fresh VMs (new KVM, VM and vCPU fds): each must carry on counting from
//! where the snapshot was taken, with memory of its own.

mod common;

use std::path::Path;

use common::{config, elf, Console, Guest, LOAD_ADDR};
use vm_memory::{Bytes, GuestAddress};
use vmm::builder::build;
use vmm::config::{DriveConfig, VsockConfig};
use vmm::snapshot::{self, DriveOverride, Overrides, SnapshotFiles, MEMORY_FILE};
use vmm::vstate::vcpu::Vcpu;
use vmm::vstate::vm::VmState;
use vmm::Vmm;

/// Where the guest keeps its memory counter.
const COUNTER: u64 = 0x30_0000;

/// ```text
/// top: inc rbx                      ; the register counter
///      inc qword [COUNTER]          ; the memory counter
///      mov eax, ebx
///      out 0x80, eax
///      mov eax, [COUNTER]
///      out 0x81, eax
///      jmp top
/// ```
const COUNTING_GUEST: [u8; 26] = [
    0x48, 0xff, 0xc3, // inc rbx
    0x48, 0xff, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, // inc qword [0x300000]
    0x89, 0xd8, // mov eax, ebx
    0xe7, 0x80, // out 0x80, eax
    0x8b, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00, // mov eax, [0x300000]
    0xe7, 0x81, // out 0x81, eax
    0xeb, 0xe6, // jmp top
];

/// Runs vCPU 0 until the guest has reported `steps` times; returns (register, memory) counters.
/// Then completes the last port write without running further guest code, as KVM requires
/// before the vCPU's state is read.
fn run_steps(vcpu: &mut Vcpu, steps: usize) -> Vec<(u32, u32)> {
    use kvm_ioctls::VcpuExit;
    let fd = vcpu.kvm_fd();
    let mut reports = Vec::new();
    let mut register = None;
    while reports.len() < steps {
        match fd.run().expect("KVM_RUN") {
            VcpuExit::IoOut(0x80, data) => register = Some(u32::from_le_bytes(data.try_into().unwrap())),
            VcpuExit::IoOut(0x81, data) => {
                let memory = u32::from_le_bytes(data.try_into().unwrap());
                reports.push((register.take().expect("register reported first"), memory));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    fd.set_kvm_immediate_exit(1);
    let err = fd.run().expect_err("KVM_RUN with immediate_exit returns at once");
    assert_eq!(err.errno(), libc::EINTR);
    fd.set_kvm_immediate_exit(0);
    reports
}

fn counting_vm(g: &Guest, vcpus: u8) -> Vmm {
    let kernel = g.file("vmlinux", &elf(&COUNTING_GUEST, LOAD_ADDR, 0));
    let mut cfg = config(&kernel, vcpus, 32);
    cfg.drives.push(DriveConfig { id: Some("rootfs".into()), path: g.file("disk.raw", &vec![0u8; 1 << 20]), read_only: false, root: true, format: disk::Format::Raw });
    cfg.vsock = Some(VsockConfig { cid: 3, uds: g.dir.as_path().join("vsock.sock") });
    build(&cfg, Box::new(Console::default())).expect("VM builds")
}

/// A disk and vsock socket of its own for a VM restored from `counting_vm`'s snapshot (a state
/// file names no host files).
fn own_devices(g: &Guest, name: &str) -> Overrides {
    let disk = g.file(&format!("disk-{name}.raw"), &vec![0u8; 1 << 20]);
    Overrides {
        drives: [(0, DriveOverride { path: disk, read_only: Some(false) })].into(),
        vsock_uds: Some(g.dir.as_path().join(format!("{name}.sock"))),
        vsock_cid: None,
        drive_formats: Default::default(),
    }
}

fn take_snapshot(vm: &Vmm, dir: &Path) -> snapshot::SnapshotInfo {
    let vcpus = vm.save_vcpus().expect("vCPU states read");
    vm.snapshot(&SnapshotFiles::in_dir(dir), vcpus).expect("snapshot written")
}

fn mmio_read_u64(vm: &Vmm, addr: u64) -> u64 {
    let mut lo = [0u8; 4];
    let mut hi = [0u8; 4];
    vm.devices().mmio().read(addr, &mut lo);
    vm.devices().mmio().read(addr + 4, &mut hi);
    u32::from_le_bytes(lo) as u64 | (u32::from_le_bytes(hi) as u64) << 32
}

#[test]
fn a_restored_vm_continues_where_the_snapshot_was_taken_and_forks_do_not_share_memory() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 2);
    let before = run_steps(&mut original.vcpus_mut()[0], 5);
    let (reg0, mem0) = before[0];
    assert_eq!(before, (0..5).map(|i| (reg0 + i, mem0 + i)).collect::<Vec<_>>());
    let (reg_at, mem_at) = before[4];

    let snap = g.dir.as_path().join("snap");
    let info = take_snapshot(&original, &snap);
    assert!(info.memory_bytes > 0 && info.memory_bytes < 1 << 20, "sparse: {info:?}");
    // The original goes on; nothing it does reaches the snapshot.
    run_steps(&mut original.vcpus_mut()[0], 3);

    let overrides_a = Overrides { vsock_cid: Some(7), ..own_devices(&g, "a") };
    let mut a = snapshot::restore(&SnapshotFiles::in_dir(&snap), &overrides_a, &Default::default(), Box::new(Console::default())).expect("restore A");
    assert_eq!(a.vcpus().len(), 2);
    let after_a = run_steps(&mut a.vcpus_mut()[0], 4);
    assert_eq!(after_a, (1..=4).map(|i| (reg_at + i, mem_at + i)).collect::<Vec<_>>(), "A continues, not restarts");

    // B restores from the same files while A is alive: A's writes are A's own.
    // The original still holds its disk's write lock, so B gets its own disk too.
    let overrides_b = own_devices(&g, "b");
    let mut b = snapshot::restore(&SnapshotFiles::in_dir(&snap), &overrides_b, &Default::default(), Box::new(Console::default())).expect("restore B");
    let after_b = run_steps(&mut b.vcpus_mut()[0], 2);
    assert_eq!(after_b, vec![(reg_at + 1, mem_at + 1), (reg_at + 2, mem_at + 2)], "B starts where the snapshot did");
    assert_eq!(a.ram().memory.read_obj::<u64>(GuestAddress(COUNTER)).unwrap(), (mem_at + 4) as u64);
    assert_eq!(b.ram().memory.read_obj::<u64>(GuestAddress(COUNTER)).unwrap(), (mem_at + 2) as u64);
    let mut on_disk = [0u8; 8];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(snap.join(MEMORY_FILE)).unwrap(), &mut on_disk, COUNTER)
        .unwrap();
    assert_eq!(u64::from_le_bytes(on_disk), mem_at as u64, "the memory file is never written by a restored VM");

    // The overrides took: A's vsock device reports CID 7, B's the snapshot's 3; the drive's
    // transport is where it was.
    let vsock_config = 0xd000_1000 + 0x100;
    assert_eq!(mmio_read_u64(&a, vsock_config), 7);
    assert_eq!(mmio_read_u64(&b, vsock_config), 3);
    assert!(g.dir.as_path().join("a.sock").exists() && g.dir.as_path().join("b.sock").exists());
    assert_eq!(mmio_read_u64(&a, 0xd000_0000 + 0x100), (1 << 20) / 512, "drive capacity in sectors");
}

#[test]
fn kvm_state_survives_a_round_trip_through_a_fresh_vm() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 2);
    run_steps(&mut original.vcpus_mut()[0], 3);
    let snap = g.dir.as_path().join("snap");
    take_snapshot(&original, &snap);
    let saved = snapshot::read_state(&snap.join(snapshot::STATE_FILE)).unwrap();

    let overrides = own_devices(&g, "r");
    let restored = snapshot::restore(&SnapshotFiles::in_dir(&snap), &overrides, &Default::default(), Box::new(Console::default())).unwrap();
    for (index, vcpu) in restored.vcpus().iter().enumerate() {
        let (before, after) = (&saved.vcpus[index], vcpu.save_state().unwrap());
        assert_eq!(after.regs, before.regs, "vCPU {index} registers");
        assert_eq!(after.sregs, before.sregs, "vCPU {index} special registers");
        assert_eq!(after.mp_state, before.mp_state, "vCPU {index} MP state");
        assert_eq!(after.lapic.regs[..0x300], before.lapic.regs[..0x300], "vCPU {index} LAPIC");
        assert_eq!(after.xcrs, before.xcrs, "vCPU {index} XCRs");
        assert_eq!(after.cpuid, before.cpuid, "vCPU {index} CPUID");
        let msr = |s: &vmm::vstate::vcpu_state::VcpuState, i| s.msrs.iter().find(|m| m.index == i).map(|m| m.data);
        for index_msr in [0xc000_0080, 0x277, 0x2ff, 0x1a0] {
            assert_eq!(msr(&after, index_msr), msr(before, index_msr), "vCPU {index} MSR {index_msr:#x}");
        }
        assert_eq!(after.msrs.len(), before.msrs.len());
    }
    let vm_state: VmState = restored.vm().save_state().unwrap();
    for (a, b) in [(&vm_state.pic_master, &saved.vm.pic_master), (&vm_state.ioapic, &saved.vm.ioapic)] {
        // SAFETY: reading the plain-data union as the bytes KVM filled in.
        let bytes = |c: &kvm_bindings::kvm_irqchip| unsafe { c.chip.dummy };
        assert_eq!(bytes(a), bytes(b));
    }
    // count_load_time is the host's clock at the write, so only the programmed values compare.
    let pit = |s: &VmState| s.pit.channels.map(|c| (c.count, c.mode, c.rw_mode, c.gate));
    assert_eq!(pit(&vm_state), pit(&saved.vm));
}

/// The guest TSC minus kvmclock (in TSC ticks) at one moment: what a guest's clocksource
/// watchdog compares over time. Two reads a few microseconds apart.
fn tsc_minus_kvmclock(vm: &mut Vmm) -> (i128, u32) {
    let khz = vm.vcpus_mut()[0].kvm_fd().get_tsc_khz().expect("KVM_GET_TSC_KHZ");
    let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry { index: 0x10, ..Default::default() }]).unwrap();
    vm.vcpus_mut()[0].kvm_fd().get_msrs(&mut msrs).expect("guest TSC read");
    let clock = vm.vm().fd.get_clock().expect("KVM_GET_CLOCK").clock;
    (msrs.as_slice()[0].data as i128 - clock as i128 * khz as i128 / 1_000_000, khz)
}

#[test]
fn a_restored_guest_finds_its_tsc_and_kvmclock_as_far_apart_as_they_were() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 1);
    let offset = original.vcpus()[0].tsc_offset();
    if original.vcpus()[0].set_tsc_offset(offset.unwrap_or(0).wrapping_add(1 << 40)).is_err()
        || original.vcpus()[0].tsc_offset() != offset.map(|o| o.wrapping_add(1 << 40))
    {
        // PVM, as on the machines ember is developed on: guests read the host's TSC as it is.
        eprintln!("skipped: this host's KVM cannot offset a guest's TSC");
        return;
    }
    run_steps(&mut original.vcpus_mut()[0], 2);
    let (before, khz) = tsc_minus_kvmclock(&mut original);
    let vcpus = original.save_vcpus().expect("vCPU states read");
    // As in a real snapshot, where the disks are flushed between the vCPUs' reads and the
    // clock's: the TSC as read goes stale while kvmclock runs on.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let snap = g.dir.as_path().join("snap");
    original.snapshot(&SnapshotFiles::in_dir(&snap), vcpus).expect("snapshot written");
    drop(original);
    std::thread::sleep(std::time::Duration::from_millis(50));

    let mut restored = snapshot::restore(&SnapshotFiles::in_dir(&snap), &own_devices(&g, "r"), &Default::default(), Box::new(Console::default())).unwrap();
    let (after, _) = tsc_minus_kvmclock(&mut restored);
    // Linux's watchdog marks the TSC unstable past about 0.5 ms; allow 0.2 ms for the reads.
    let drift_us = (after - before).abs() * 1000 / khz as i128;
    assert!(drift_us < 200, "TSC and kvmclock drifted {drift_us} µs apart across the snapshot");
}

#[test]
fn a_snapshot_of_a_restored_vm_carries_its_own_writes() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 1);
    run_steps(&mut original.vcpus_mut()[0], 2);
    let first = g.dir.as_path().join("first");
    take_snapshot(&original, &first);
    drop(original);

    let mut restored = snapshot::restore(&SnapshotFiles::in_dir(&first), &own_devices(&g, "r1"), &Default::default(), Box::new(Console::default())).unwrap();
    let (_, mem_at) = *run_steps(&mut restored.vcpus_mut()[0], 3).last().unwrap();
    let second = g.dir.as_path().join("second");
    take_snapshot(&restored, &second);
    drop(restored);

    let mut again = snapshot::restore(&SnapshotFiles::in_dir(&second), &own_devices(&g, "r2"), &Default::default(), Box::new(Console::default())).unwrap();
    assert_eq!(run_steps(&mut again.vcpus_mut()[0], 1)[0].1, mem_at + 1);
}

#[test]
fn a_corrupt_state_file_is_refused_before_any_vm_exists() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 1);
    run_steps(&mut original.vcpus_mut()[0], 1);
    let snap = g.dir.as_path().join("snap");
    take_snapshot(&original, &snap);
    drop(original);
    let state_path = snap.join(snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state_path, &bytes).unwrap();
    let err = snapshot::restore(&SnapshotFiles::in_dir(&snap), &own_devices(&g, "c"), &Default::default(), Box::new(Console::default())).err().unwrap();
    assert_eq!(err.to_string(), format!("state file {} is corrupt: checksum mismatch", state_path.display()));
    assert!(!g.dir.as_path().join("c.sock").exists(), "nothing was opened");
}

/// Closes the pause gate from inside the guest's port read, so the vCPU thread meets the
/// closed gate with the read still pending in KVM (the value reaches the guest's register only
/// on the next KVM_RUN): the case where parking must first let KVM complete it.
struct GateCloser(std::sync::Arc<vmm::vstate::pause::PauseGate>);

impl vmm::devices::bus::BusDevice for GateCloser {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
        self.0.close();
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// ```text
///      xor eax, eax
///      in al, 0x81
///      jmp $
/// ```
const PORT_READING_GUEST: [u8; 6] = [0x31, 0xc0, 0xe4, 0x81, 0xeb, 0xfe];

#[test]
fn a_vcpu_saves_its_state_as_it_parks_with_its_last_port_read_completed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use vmm::devices::bus::Bus;
    use vmm::vstate::pause::PauseGate;
    use vmm::vstate::vcpu::{ExitSignal, ParkedStates, VcpuContext};

    let g = Guest::new();
    let kernel = g.file("vmlinux", &elf(&PORT_READING_GUEST, LOAD_ADDR, 0));
    let mut vm = build(&config(&kernel, 1, 32), Box::new(Console::default())).expect("VM builds");
    let gate = Arc::new(PauseGate::default());
    let mut pio = Bus::default();
    pio.insert("gate-closer", 0x81, 1, Arc::new(Mutex::new(GateCloser(gate.clone())))).unwrap();
    let ctx = Arc::new(VcpuContext {
        pio: Arc::new(pio),
        mmio: vm.devices().mmio().clone(),
        stop: Arc::new(AtomicBool::new(false)),
        exit: Arc::new(ExitSignal::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap())),
        gate: gate.clone(),
        parked_states: ParkedStates::default(),
        exits: Default::default(),
        loaded_at: None,
    });
    let vcpu = vm.take_vcpus().remove(0);
    let thread_ctx = ctx.clone();
    let thread = std::thread::spawn(move || vcpu.run(&thread_ctx));
    assert!(gate.wait_parked(1, std::time::Duration::from_secs(10)), "the vCPU parks");
    let states = ctx.parked_states.all(1).expect("the parked vCPU saved its state");
    assert_eq!(states[0].regs.rip, LOAD_ADDR + 4, "the saved state is past the port read");
    assert_eq!(states[0].regs.rax, 0x5a, "the value read is in the saved register");
    assert!(ctx.parked_states.all(2).err().unwrap().to_string().contains("vCPU 1"));
    ctx.stop.store(true, Ordering::Release);
    gate.wake();
    thread.join().unwrap();
}
