//! The VMM process's API, end to end on this host's /dev/kvm with a hand-assembled guest: a
//! Firecracker-style client configures and starts the VM over the Unix socket, pauses it (the
//! guest makes no progress), resumes it, and is refused what is not allowed in each state.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{elf, Console, Guest, LOAD_ADDR, RESET};
use vmm::api::client::{ApiClient, ApiClientError};
use vmm::api::models::*;
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
    let (sender, channel) = vmm::api::channel().unwrap();
    vmm::api::server::start(&socket, sender).unwrap();
    assert!(vmm::api::server::start(&socket, vmm::api::channel().unwrap().0)
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    let console = Console::default();
    let sink = console.clone();
    let vmm = std::thread::spawn(move || vmm::controller::serve(channel, "test-vm".into(), Instant::now(), Box::new(sink)));
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

    api.put("/actions", &start).unwrap();
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
    let (sender, channel) = vmm::api::channel().unwrap();
    vmm::api::server::start(&socket, sender).unwrap();
    std::thread::spawn(move || vmm::controller::serve(channel, "x".into(), Instant::now(), Box::new(std::io::sink())));

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
