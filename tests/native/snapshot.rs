//! Snapshot and restore on this host's /dev/kvm with a hand-assembled guest that counts: in a
//! register and in memory, reporting both through port I/O. A VM is run, stopped, snapshotted,
//! and restored into fresh VMs (new KVM, VM and vCPU fds): each must carry on counting from
//! where the snapshot was taken, with memory of its own.

mod common;

use std::path::Path;

use common::{config, elf, Console, Guest, LOAD_ADDR};
use vm_memory::{Bytes, GuestAddress};
use vmm::builder::{build, BuiltVm};
use vmm::config::{DriveConfig, VsockConfig};
use vmm::snapshot::{self, Overrides, SnapshotParts, MEMORY_FILE};
use vmm::vstate::vcpu::Vcpu;
use vmm::vstate::vm::VmState;

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

fn counting_vm(g: &Guest, vcpus: u8) -> BuiltVm {
    let kernel = g.file("vmlinux", &elf(&COUNTING_GUEST, LOAD_ADDR, 0));
    let mut cfg = config(&kernel, vcpus, 32);
    cfg.drives.push(DriveConfig { path: g.file("disk.raw", &vec![0u8; 1 << 20]), read_only: false, root: true });
    cfg.vsock = Some(VsockConfig { cid: 3, uds: g.dir.as_path().join("vsock.sock") });
    build(&cfg, Box::new(Console::default())).expect("VM builds")
}

fn take_snapshot(vm: &BuiltVm, dir: &Path) -> snapshot::SnapshotInfo {
    let parts = SnapshotParts {
        vm: &vm.vm,
        ram: &vm.ram,
        vcpus: snapshot::save_vcpus(&vm.vcpus).expect("vCPU states read"),
        serial: &vm.serial,
        virtio: &vm.virtio,
    };
    snapshot::create(dir, parts).expect("snapshot written")
}

fn mmio_read_u64(vm: &BuiltVm, addr: u64) -> u64 {
    let mut lo = [0u8; 4];
    let mut hi = [0u8; 4];
    vm.mmio.read(addr, &mut lo);
    vm.mmio.read(addr + 4, &mut hi);
    u32::from_le_bytes(lo) as u64 | (u32::from_le_bytes(hi) as u64) << 32
}

#[test]
fn a_restored_vm_continues_where_the_snapshot_was_taken_and_forks_do_not_share_memory() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 2);
    let before = run_steps(&mut original.vcpus[0], 5);
    let (reg0, mem0) = before[0];
    assert_eq!(before, (0..5).map(|i| (reg0 + i, mem0 + i)).collect::<Vec<_>>());
    let (reg_at, mem_at) = before[4];

    let snap = g.dir.as_path().join("snap");
    let info = take_snapshot(&original, &snap);
    assert!(info.memory_bytes > 0 && info.memory_bytes < 1 << 20, "sparse: {info:?}");
    // The original goes on; nothing it does reaches the snapshot.
    run_steps(&mut original.vcpus[0], 3);

    let disk_a = g.file("disk-a.raw", &vec![0u8; 1 << 20]);
    let overrides_a = Overrides {
        drives: [(0, disk_a)].into(),
        vsock_uds: Some(g.dir.as_path().join("a.sock")),
        vsock_cid: Some(7),
    };
    let mut a = snapshot::restore(&snap, &overrides_a, Box::new(Console::default())).expect("restore A");
    assert_eq!(a.vcpus.len(), 2);
    let after_a = run_steps(&mut a.vcpus[0], 4);
    assert_eq!(after_a, (1..=4).map(|i| (reg_at + i, mem_at + i)).collect::<Vec<_>>(), "A continues, not restarts");

    // B restores from the same files while A is alive: A's writes are A's own.
    // The original still holds its disk's write lock, so B gets its own disk too.
    let overrides_b = Overrides {
        drives: [(0, g.file("disk-b.raw", &vec![0u8; 1 << 20]))].into(),
        vsock_uds: Some(g.dir.as_path().join("b.sock")),
        vsock_cid: None,
    };
    let mut b = snapshot::restore(&snap, &overrides_b, Box::new(Console::default())).expect("restore B");
    let after_b = run_steps(&mut b.vcpus[0], 2);
    assert_eq!(after_b, vec![(reg_at + 1, mem_at + 1), (reg_at + 2, mem_at + 2)], "B starts where the snapshot did");
    assert_eq!(a.ram.memory.read_obj::<u64>(GuestAddress(COUNTER)).unwrap(), (mem_at + 4) as u64);
    assert_eq!(b.ram.memory.read_obj::<u64>(GuestAddress(COUNTER)).unwrap(), (mem_at + 2) as u64);
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
    run_steps(&mut original.vcpus[0], 3);
    let snap = g.dir.as_path().join("snap");
    take_snapshot(&original, &snap);
    let saved = snapshot::read_state(&snap).unwrap();

    let overrides = Overrides {
        drives: [(0, g.file("disk-r.raw", &vec![0u8; 1 << 20]))].into(),
        vsock_uds: Some(g.dir.as_path().join("r.sock")),
        vsock_cid: None,
    };
    let restored = snapshot::restore(&snap, &overrides, Box::new(Console::default())).unwrap();
    for (index, vcpu) in restored.vcpus.iter().enumerate() {
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
    let vm_state: VmState = restored.vm.save_state().unwrap();
    for (a, b) in [(&vm_state.pic_master, &saved.vm.pic_master), (&vm_state.ioapic, &saved.vm.ioapic)] {
        // SAFETY: reading the plain-data union as the bytes KVM filled in.
        let bytes = |c: &kvm_bindings::kvm_irqchip| unsafe { c.chip.dummy };
        assert_eq!(bytes(a), bytes(b));
    }
    // count_load_time is the host's clock at the write, so only the programmed values compare.
    let pit = |s: &VmState| s.pit.channels.map(|c| (c.count, c.mode, c.rw_mode, c.gate));
    assert_eq!(pit(&vm_state), pit(&saved.vm));
}

#[test]
fn a_snapshot_of_a_restored_vm_carries_its_own_writes() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 1);
    run_steps(&mut original.vcpus[0], 2);
    let first = g.dir.as_path().join("first");
    take_snapshot(&original, &first);
    drop(original);

    let mut restored = snapshot::restore(&first, &Overrides::default(), Box::new(Console::default())).unwrap();
    let (_, mem_at) = *run_steps(&mut restored.vcpus[0], 3).last().unwrap();
    let second = g.dir.as_path().join("second");
    take_snapshot(&restored, &second);
    drop(restored);

    let mut again = snapshot::restore(&second, &Overrides::default(), Box::new(Console::default())).unwrap();
    assert_eq!(run_steps(&mut again.vcpus[0], 1)[0].1, mem_at + 1);
}

#[test]
fn a_corrupt_state_file_is_refused_before_any_vm_exists() {
    let g = Guest::new();
    let mut original = counting_vm(&g, 1);
    run_steps(&mut original.vcpus[0], 1);
    let snap = g.dir.as_path().join("snap");
    take_snapshot(&original, &snap);
    drop(original);
    let state_path = snap.join(snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&state_path, &bytes).unwrap();
    let err = snapshot::restore(&snap, &Overrides::default(), Box::new(Console::default())).err().unwrap();
    assert_eq!(err.to_string(), format!("state file {} is corrupt: checksum mismatch", state_path.display()));
    assert!(!g.dir.as_path().join("vsock.sock").exists(), "nothing was opened");
}
