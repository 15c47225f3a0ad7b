//! The VMM process's API, end to end on this host's /dev/kvm with a hand-assembled guest: a
//! Firecracker-style client configures and starts the VM over the Unix socket, pauses it (the
//! guest makes no progress), resumes it, and is refused what is not allowed in each state.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{elf, Console, Guest, LOAD_ADDR, RESET};
use api::client::{ApiClient, ApiClientError};
use api::models::*;
use vmm::vstate::vcpu::GuestExit;

/// Prints `count` 'x' to COM1, about a millisecond apart (on the PVM host), then resets.
fn ticking_guest(count: u16) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0xbb, count as u8, (count >> 8) as u8, 0, 0]); // mov ebx, count
    code.extend_from_slice(&[
        0xb0, b'x', // L: mov al, 'x'
        0xee, // out dx, al
        0xb9, 0xe8, 0x03, 0x00, 0x00, // mov ecx, 1000
        0xe2, 0xfe, // D: loop D
        0xff, 0xcb, // dec ebx
        0x75, 0xf2, // jnz L
    ]);
    code.extend_from_slice(&RESET);
    code
}

fn fault(r: Result<(), ApiClientError>) -> String {
    match r {
        Err(ApiClientError::Fault { status: 400, message, .. }) => message,
        other => panic!("expected a 400 fault, got {other:?}"),
    }
}

fn state(api: &ApiClient) -> InstanceState {
    api.get::<InstanceInfo>("/").unwrap().state
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn configure_start_pause_resume_through_the_api_socket() {
    let g = Guest::new();
    const TICKS: u16 = 3000;
    let kernel = g.file("vmlinux", &elf(&ticking_guest(TICKS), LOAD_ADDR, 0));
    let socket = g.dir.as_path().join("api.sock");
    let (sender, channel) = api::channel().unwrap();
    api::server::start(&socket, sender).unwrap();
    assert!(api::server::start(&socket, api::channel().unwrap().0)
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    let console = Console::default();
    let sink = console.clone();
    let vmm = std::thread::spawn(move || vmm::controller::serve(channel, "test-vm".into(), Instant::now(), Default::default(), Box::new(sink)));
    let api = ApiClient::new(&socket);
    let len = || console.0.lock().unwrap().len();

    let info: InstanceInfo = api.get("/").unwrap();
    assert_eq!((info.id.as_str(), info.state, info.app_name.as_str()), ("test-vm", InstanceState::NotStarted, "ember"));
    let missing = BootSource { kernel_image_path: "/nonexistent/vmlinux".into(), boot_args: None, initrd_path: None };
    assert!(fault(api.put("/boot-source", &missing)).contains("/nonexistent/vmlinux"));
    let start = InstanceActionInfo { action_type: ActionType::InstanceStart };
    assert!(fault(api.put("/actions", &start)).contains("without kernel configuration"));
    assert!(fault(api.patch("/vm", &Vm { state: VmState::Paused })).contains("not running"));
    let boot = BootSource { kernel_image_path: kernel.display().to_string(), boot_args: None, initrd_path: None };
    api.put("/boot-source", &boot).unwrap();
    api.put("/machine-config", &MachineConfig { vcpu_count: 1, mem_size_mib: 32, ..Default::default() }).unwrap();
    assert_eq!(api.get::<MachineConfig>("/machine-config").unwrap().mem_size_mib, 32);
    // Metrics only in the VMM's own directory, the one holding its API socket.
    let elsewhere = Guest::new();
    let outside = MetricsConfig { metrics_path: elsewhere.dir.as_path().join("metrics.json").display().to_string() };
    let message = fault(api.put("/metrics", &outside));
    assert!(message.contains("VMM's own directory") && message.contains(&g.dir.as_path().display().to_string()), "{message}");
    assert!(!elsewhere.dir.as_path().join("metrics.json").exists());
    let metrics = g.dir.as_path().join("metrics.json");
    api.put("/metrics", &MetricsConfig { metrics_path: metrics.display().to_string() }).unwrap();

    api.put("/actions", &start).unwrap();
    api.put("/actions", &InstanceActionInfo { action_type: ActionType::FlushMetrics }).unwrap();
    assert!(std::fs::read_to_string(&metrics).unwrap().contains("\"exits\""));
    assert_eq!(state(&api), InstanceState::Running);
    assert!(fault(api.put("/boot-source", &boot)).contains("not supported after starting"));
    assert!(fault(api.put("/actions", &start)).contains("already running"));
    wait_for("the guest's first output", || len() >= 10);

    api.patch("/vm", &Vm { state: VmState::Paused }).unwrap();
    assert_eq!(state(&api), InstanceState::Paused);
    let at_pause = len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(len(), at_pause, "a paused guest makes no progress");
    assert!(at_pause < TICKS as usize, "paused before the guest finished");
    api.patch("/vm", &Vm { state: VmState::Paused }).unwrap();

    api.patch("/vm", &Vm { state: VmState::Resumed }).unwrap();
    assert_eq!(state(&api), InstanceState::Running);
    wait_for("progress after resume", || len() > at_pause);

    let outcome = vmm.join().unwrap().unwrap();
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(len(), TICKS as usize, "every tick printed exactly once across the pause");
    assert!(api.get::<InstanceInfo>("/").is_err(), "the API goes with the VM");
}

#[test]
fn malformed_http_gets_a_400_and_the_api_keeps_serving() {
    let g = Guest::new();
    let socket = g.dir.as_path().join("api.sock");
    let (sender, channel) = api::channel().unwrap();
    api::server::start(&socket, sender).unwrap();
    std::thread::spawn(move || vmm::controller::serve(channel, "x".into(), Instant::now(), Default::default(), Box::new(std::io::sink())));

    let raw = |bytes: &[u8]| {
        let mut s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let reply = raw(b"this is not http\r\n\r\n");
    assert!(reply.starts_with("HTTP/1.1 400") || reply.is_empty(), "{reply}");
    let reply = raw(b"PUT /vsock HTTP/1.1\r\nContent-Length: 7\r\nConnection: close\r\n\r\n{\"guest");
    assert!(reply.starts_with("HTTP/1.1 400") && reply.contains("fault_message"), "{reply}");
    let reply = raw(b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(reply.contains("Invalid request method and/or path"), "{reply}");
    let huge = format!("PUT /vsock HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", 1 << 20);
    let mut s = UnixStream::connect(&socket).unwrap();
    s.write_all(huge.as_bytes()).unwrap();
    let _ = s.write_all(&vec![b' '; 1 << 20]);
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert_eq!(state(&ApiClient::new(&socket)), InstanceState::NotStarted);
}

/// A VMM serving its API on `socket` in a thread of this process, its console in the returned
/// buffer; backing files are allowed in the socket's directory.
fn spawn_vmm(
    socket: &std::path::Path,
    id: &str,
) -> (ApiClient, Console, std::thread::JoinHandle<Result<vmm::runtime::RunOutcome, vmm::controller::ControllerError>>) {
    spawn_vmm_with(socket, id, disk::BackingPolicy::new([socket.parent().unwrap()]).unwrap())
}

/// [`spawn_vmm`] with backing files allowed where `backing` says.
fn spawn_vmm_with(
    socket: &std::path::Path,
    id: &str,
    backing: disk::BackingPolicy,
) -> (ApiClient, Console, std::thread::JoinHandle<Result<vmm::runtime::RunOutcome, vmm::controller::ControllerError>>) {
    let (sender, channel) = api::channel().unwrap();
    api::server::start(socket, sender).unwrap();
    let console = Console::default();
    let sink = console.clone();
    let id = id.to_string();
    let vmm = std::thread::spawn(move || vmm::controller::serve(channel, id, Instant::now(), backing, Box::new(sink)));
    (ApiClient::new(socket), console, vmm)
}

fn load_params(state: &std::path::Path, memory: &std::path::Path, resume_vm: bool) -> SnapshotLoadParams {
    SnapshotLoadParams {
        snapshot_path: state.display().to_string(),
        mem_backend: Some(MemBackend { backend_type: MemBackendType::File, backend_path: memory.display().to_string() }),
        mem_file_path: None,
        enable_diff_snapshots: false,
        track_dirty_pages: false,
        resume_vm,
        drive_overrides: Vec::new(),
        vsock_override: None,
        mem_fds: None,
    }
}

#[test]
fn a_snapshot_taken_through_the_api_continues_in_another_vmm() {
    let g = Guest::new();
    const TICKS: u16 = 3000;
    let kernel = g.file("vmlinux", &elf(&ticking_guest(TICKS), LOAD_ADDR, 0));
    let (api, console, vmm) = spawn_vmm(&g.dir.as_path().join("a.sock"), "a");
    let len = |c: &Console| c.0.lock().unwrap().len();
    let boot = BootSource { kernel_image_path: kernel.display().to_string(), boot_args: None, initrd_path: None };
    api.put("/boot-source", &boot).unwrap();
    api.put("/machine-config", &MachineConfig { vcpu_count: 2, mem_size_mib: 32, ..Default::default() }).unwrap();
    let (state_file, mem_file) = (g.dir.as_path().join("snap/vm.state"), g.dir.as_path().join("snap/vm.mem"));
    let create = SnapshotCreateParams {
        snapshot_type: SnapshotType::Full,
        snapshot_path: state_file.display().to_string(),
        mem_file_path: mem_file.display().to_string(),
        freeze_memory: false,
    };
    assert!(fault(api.put("/snapshot/create", &create)).contains("not running yet"));
    api.put("/actions", &InstanceActionInfo { action_type: ActionType::InstanceStart }).unwrap();
    wait_for("the guest's first output", || len(&console) >= 10);
    assert!(fault(api.put("/snapshot/create", &create)).contains("not paused"));
    let diff = SnapshotCreateParams { snapshot_type: SnapshotType::Diff, ..create.clone() };
    assert!(fault(api.put("/snapshot/create", &diff)).contains("full snapshots only"));

    api.patch("/vm", &Vm { state: VmState::Paused }).unwrap();
    let at_pause = len(&console);
    api.put("/snapshot/create", &create).unwrap();
    assert!(state_file.exists() && mem_file.exists());
    api.patch("/vm", &Vm { state: VmState::Resumed }).unwrap();
    assert_eq!(vmm.join().unwrap().unwrap().exit, GuestExit::Reset);
    assert_eq!(len(&console), TICKS as usize, "the original finishes, every tick once");
    assert!(at_pause < TICKS as usize);

    // A second VMM loads it and prints exactly the ticks left at the pause: the port write
    // that was in flight was completed before the state was saved, so it is not repeated.
    let (api, console, vmm) = spawn_vmm(&g.dir.as_path().join("b.sock"), "b");
    api.put("/snapshot/load", &load_params(&state_file, &mem_file, true)).unwrap();
    assert!(fault(api.put("/snapshot/load", &load_params(&state_file, &mem_file, true))).contains("not allowed"));
    assert_eq!(vmm.join().unwrap().unwrap().exit, GuestExit::Reset);
    assert_eq!(len(&console), TICKS as usize - at_pause, "the restored guest continues, it does not restart");

    // A state declaring 1 TiB of RAM (with a sparse memory file to match) is refused before
    // anything is mapped.
    let mut huge = vmm::snapshot::read_state(&state_file).unwrap();
    huge.mem_size = 1 << 40;
    let (huge_state, huge_mem) = (g.dir.as_path().join("snap/huge.state"), g.dir.as_path().join("snap/huge.mem"));
    std::fs::write(&huge_state, vmm::snapshot::format::encode(&huge).unwrap()).unwrap();
    std::fs::File::create(&huge_mem).unwrap().set_len(1 << 40).unwrap();
    let (api, _, _vmm) = spawn_vmm(&g.dir.as_path().join("h.sock"), "h");
    let message = fault(api.put("/snapshot/load", &load_params(&huge_state, &huge_mem, true)));
    assert!(message.contains("1048576 MiB of memory, more than this host's"), "{message}");
    // A memory file that does not match the state's size is refused too.
    let small_mem = g.file("snap/small.mem", &[0u8; 4096]);
    let message = fault(api.put("/snapshot/load", &load_params(&state_file, &small_mem, true)));
    assert!(message.contains("is 4096 bytes, the snapshot's guest has 33554432"), "{message}");
    assert_eq!(state(&api), InstanceState::NotStarted);

    // A corrupt state file is refused, naming the problem, and the VMM can still load.
    let corrupt = g.dir.as_path().join("snap/corrupt.state");
    let mut bytes = std::fs::read(&state_file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    let (api, console, vmm) = spawn_vmm(&g.dir.as_path().join("c.sock"), "c");
    let message = fault(api.put("/snapshot/load", &load_params(&corrupt, &mem_file, true)));
    assert!(message.contains("corrupt: checksum mismatch") && message.contains("corrupt.state"), "{message}");
    assert_eq!(state(&api), InstanceState::NotStarted);

    // Without resume_vm the restored VM waits, paused, and can be snapshotted again at once.
    api.put("/snapshot/load", &load_params(&state_file, &mem_file, false)).unwrap();
    assert_eq!(state(&api), InstanceState::Paused);
    assert_eq!(api.get::<MachineConfig>("/machine-config").unwrap().vcpu_count, 2);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(len(&console), 0, "a VM loaded without resume_vm does not run");
    let again = SnapshotCreateParams {
        snapshot_path: g.dir.as_path().join("snap/again.state").display().to_string(),
        mem_file_path: g.dir.as_path().join("snap/again.mem").display().to_string(),
        ..create
    };
    api.put("/snapshot/create", &again).unwrap();
    api.patch("/vm", &Vm { state: VmState::Resumed }).unwrap();
    assert_eq!(vmm.join().unwrap().unwrap().exit, GuestExit::Reset);
    assert_eq!(len(&console), TICKS as usize - at_pause);
}

#[test]
fn a_fork_through_the_api_freezes_memory_and_switches_the_disk() {
    let g = Guest::new();
    const TICKS: u16 = 3000;
    let kernel = g.file("vmlinux", &elf(&ticking_guest(TICKS), LOAD_ADDR, 0));
    let disk = g.file("disk.raw", &vec![0u8; 1 << 20]);
    let (api, console, parent) = spawn_vmm(&g.dir.as_path().join("p.sock"), "p");
    let len = |c: &Console| c.0.lock().unwrap().len();
    let boot = BootSource { kernel_image_path: kernel.display().to_string(), boot_args: None, initrd_path: None };
    api.put("/boot-source", &boot).unwrap();
    api.put("/machine-config", &MachineConfig { vcpu_count: 1, mem_size_mib: 32, ..Default::default() }).unwrap();
    let drive = Drive {
        drive_id: "rootfs".into(),
        path_on_host: disk.display().to_string(),
        is_root_device: true,
        is_read_only: false,
        format: None,
        partuuid: None,
        cache_type: None,
        io_engine: None,
        rate_limiter: None,
    };
    api.put("/drives/rootfs", &drive).unwrap();
    let patch = |path: &std::path::Path| PartialDrive {
        drive_id: "rootfs".into(),
        path_on_host: Some(path.display().to_string()),
        format: Some(DiskFormat::Qcow2),
        rate_limiter: None,
    };
    assert!(fault(api.patch("/drives/rootfs", &patch(&disk))).contains("not running yet"));
    api.put("/actions", &InstanceActionInfo { action_type: ActionType::InstanceStart }).unwrap();
    wait_for("the guest's first output", || len(&console) >= 10);

    api.patch("/vm", &Vm { state: VmState::Paused }).unwrap();
    let at_pause = len(&console);
    let state_file = g.dir.as_path().join("fork.state");
    let freeze = SnapshotCreateParams {
        snapshot_type: SnapshotType::Full,
        snapshot_path: state_file.display().to_string(),
        mem_file_path: String::new(),
        freeze_memory: true,
    };
    let (frozen, memory): (FrozenMemory, _) = api.put_for_with_fds("/snapshot/create", &freeze, &[]).unwrap();
    assert_eq!((frozen.mem_fds, memory.len()), (1, 1), "a cold-booted VM's memfd freezes in place, no layers");
    // The disk: the raw file becomes the base of a new overlay, which the VM switches to.
    let overlay = g.dir.as_path().join("top.qcow2");
    let backing = disk::BackingPolicy::new([g.dir.as_path()]).unwrap();
    let base = disk::overlay::Base { path: &disk, format: disk::Format::Raw, policy: &backing };
    disk::overlay::create_over_in_use(base, &overlay).unwrap();
    let small = g.file("small.raw", &[0u8; 4096]);
    let message = fault(api.patch("/drives/rootfs", &PartialDrive { format: None, ..patch(&small) }));
    assert!(message.contains("1048576 bytes") || message.contains("size"), "{message}");
    assert!(fault(api.patch("/drives/other", &PartialDrive { drive_id: "other".into(), ..patch(&overlay) }))
        .contains("no such drive"));
    // Without a format the new file is in the drive's, raw: the overlay's bytes, the wrong size.
    let message = fault(api.patch("/drives/rootfs", &PartialDrive { format: None, ..patch(&overlay) }));
    assert!(message.contains("1048576 bytes"), "{message}");
    api.patch("/drives/rootfs", &patch(&overlay)).unwrap();
    // The base is no longer held for writing: another overlay can lock it for reading.
    disk::overlay::create(base, &g.dir.as_path().join("child.qcow2")).unwrap();
    api.patch("/vm", &Vm { state: VmState::Resumed }).unwrap();

    // A child maps the frozen memory (while the parent runs on) and continues from the pause;
    // a VMM allowed no backing directory refuses the child's overlay, and loads nothing.
    let mut load = load_params(&state_file, std::path::Path::new("unused"), true);
    (load.mem_backend, load.mem_fds) = (None, Some(1));
    let fds: Vec<_> = memory.iter().map(AsFd::as_fd).collect();
    let (child_api, child_console, child) = spawn_vmm(&g.dir.as_path().join("c.sock"), "c");
    // A state file names no host files: a load without the drive's override is refused.
    let message = fault(child_api.put_with_fds("/snapshot/load", &load, &fds));
    assert!(message.contains("drive 0 (rootfs) has no drive override") && message.contains("no host paths"), "{message}");
    let message = fault(child_api.put_with_fds("/snapshot/load", &load, &[]));
    assert!(message.contains("mem_fds is 1, but 0 file descriptors came"), "{message}");
    let child_disk = g.dir.as_path().join("child.qcow2").display().to_string();
    load.drive_overrides =
        vec![DriveOverride { index: 0, path_on_host: child_disk, is_read_only: Some(false), format: Some(DiskFormat::Qcow2) }];
    let (refusing_api, _, _) = spawn_vmm_with(&g.dir.as_path().join("r.sock"), "r", disk::BackingPolicy::default());
    let message = fault(refusing_api.put_with_fds("/snapshot/load", &load, &fds));
    assert!(message.contains("disk.raw") && message.contains("--disk-dir"), "{message}");
    child_api.put_with_fds("/snapshot/load", &load, &fds).unwrap();
    drop(memory);
    assert_eq!(parent.join().unwrap().unwrap().exit, GuestExit::Reset);
    assert_eq!(len(&console), TICKS as usize, "the parent finishes, every tick once");
    assert_eq!(child.join().unwrap().unwrap().exit, GuestExit::Reset);
    assert_eq!(len(&child_console), TICKS as usize - at_pause, "the child goes on from the fork");
}
