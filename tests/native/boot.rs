//! The whole boot path — ELF load, zero page, page tables, GDT, MP table, CPUID, MSRs, LAPIC,
//! vCPU threads, the port-I/O bus, serial console, i8042 reset, the stop protocol — driven
//! with tiny hand-assembled 64-bit guests on this host's /dev/kvm. These need no Linux guest, so
//! they run even on a KVM that cannot boot one (the PVM nested hypervisor emulates them).

mod common;

use std::time::Instant;

use common::{config, elf, print, Console, Guest, LOAD_ADDR, RESET};
use vmm::builder::build;
use vmm::config::VmConfig;
use vmm::runtime::{run, RunOutcome};
use vmm::vstate::vcpu::GuestExit;

fn boot(cfg: &VmConfig) -> (RunOutcome, String) {
    let console = Console::default();
    let vm = build(cfg, Box::new(console.clone())).expect("VM builds");
    let outcome = run(vm, Instant::now(), false).expect("VM runs");
    let text = String::from_utf8_lossy(&console.0.lock().unwrap()).into_owned();
    (outcome, text)
}

#[test]
fn guest_output_reaches_the_console_and_reset_ends_the_vm() {
    let g = Guest::new();
    let code = [print(b"hello from the guest\n"), RESET.to_vec()].concat();
    let kernel = g.file("vmlinux", &elf(&code, LOAD_ADDR, 0));
    let (outcome, text) = boot(&config(&kernel, 1, 32));
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(text, "hello from the guest\n");
    assert_eq!(outcome.stats.exits.get("pio-write", "serial"), 21);
    assert_eq!(outcome.stats.exits.get("pio-write", "i8042"), 1);
    assert!(outcome.stats.first_serial_byte.is_some());
    assert!(outcome.stats.first_serial_byte.unwrap() <= outcome.stats.total);
}

#[test]
fn the_guest_starts_in_long_mode_with_the_zero_page_in_rsi() {
    // Reads the boot_params magic "HdrS" at RSI+0x202 through the identity mapping and prints
    // 'Y' if it is there: proves paging, the GDT's data segment and the zero page at once.
    let mut code = vec![
        0x8b, 0x86, 0x02, 0x02, 0x00, 0x00, // mov eax, [rsi+0x202]
        0x3d, 0x48, 0x64, 0x72, 0x53, // cmp eax, "HdrS"
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'N', // mov al, 'N'
        0x75, 0x02, // jne +2
        0xb0, b'Y', // mov al, 'Y'
        0xee, // out dx, al
    ];
    code.extend_from_slice(&RESET);
    let g = Guest::new();
    let kernel = g.file("vmlinux", &elf(&code, LOAD_ADDR, 0));
    let (outcome, text) = boot(&config(&kernel, 1, 32));
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(text, "Y");
}

#[test]
fn a_panic_line_on_the_console_makes_the_reset_a_panic() {
    let g = Guest::new();
    let code = [print(b"Kernel panic - not syncing: Attempted to kill init!\n"), RESET.to_vec()].concat();
    let kernel = g.file("vmlinux", &elf(&code, LOAD_ADDR, 0));
    let (outcome, _) = boot(&config(&kernel, 1, 32));
    assert_eq!(
        outcome.exit,
        GuestExit::Panic("Kernel panic - not syncing: Attempted to kill init!".into())
    );
}

#[test]
fn a_triple_fault_ends_the_vm() {
    // A read beyond the identity-mapped first GiB page-faults, and the IDT's only gate is not
    // present: #PF, then #DF, then shutdown.
    let code = [
        0x48, 0xb8, 0, 0, 0, 0x80, 0, 0, 0, 0, // mov rax, 0x80000000
        0x8a, 0x00, // mov al, [rax]
        0xeb, 0xfe, // jmp $
    ];
    let g = Guest::new();
    let kernel = g.file("vmlinux", &elf(&code, LOAD_ADDR, 0));
    let (outcome, _) = boot(&config(&kernel, 1, 32));
    assert_eq!(outcome.exit, GuestExit::TripleFault);
    assert_eq!(outcome.stats.exits.get("shutdown", ""), 1);
}

#[test]
fn secondary_vcpus_waiting_for_sipi_are_stopped_when_the_guest_resets() {
    let g = Guest::new();
    let code = [print(b"bsp\n"), RESET.to_vec()].concat();
    let kernel = g.file("vmlinux", &elf(&code, LOAD_ADDR, 0));
    let (outcome, text) = boot(&config(&kernel, 4, 32));
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(text, "bsp\n");
}

fn build_error(cfg: &VmConfig) -> String {
    match build(cfg, Box::new(std::io::sink())) {
        Ok(_) => panic!("building {cfg:?} should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_kernels_and_sizes_get_errors_naming_the_problem() {
    let g = Guest::new();
    let missing = g.dir.as_path().join("no-such-vmlinux");
    let err = build_error(&config(&missing, 1, 32));
    assert!(err.contains("cannot open kernel") && err.contains("no-such-vmlinux"), "{err}");

    let bzimage = g.file("bzImage", &[0x4d, 0x5a, 0, 0, 0, 0, 0, 0]);
    let err = build_error(&config(&bzimage, 1, 32));
    assert!(err.contains("is not an ELF vmlinux"), "{err}");

    let big = g.file("big", &elf(&RESET, LOAD_ADDR, 64 << 20));
    let err = build_error(&config(&big, 1, 32));
    assert!(err.contains("too small") && err.contains("needs 65 MiB"), "{err}");

    let ok = g.file("ok", &elf(&RESET, LOAD_ADDR, 0));
    let mut cfg = config(&ok, 1, 32);
    cfg.initrd = Some(g.file("initrd", &vec![0u8; 40 << 20]));
    let err = build_error(&cfg);
    assert!(err.contains("initramfs") && err.contains("does not fit"), "{err}");

    let err = build_error(&config(&ok, 255, 32));
    assert!(err.contains("255 vCPUs"), "{err}");

    let err = build_error(&config(&ok, 1, 3));
    assert!(err.contains("multiple of 2 MiB"), "{err}");
}

#[test]
fn an_initrd_is_loaded_where_the_zero_page_says() {
    // Prints the first byte of the initrd, found through boot_params.hdr.ramdisk_image.
    let mut code = vec![
        0x8b, 0x86, 0x18, 0x02, 0x00, 0x00, // mov eax, [rsi+0x218] (ramdisk_image)
        0x8a, 0x00, // mov al, [rax]
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xee, // out dx, al
    ];
    code.extend_from_slice(&RESET);
    let g = Guest::new();
    let kernel = g.file("vmlinux", &elf(&code, LOAD_ADDR, 0));
    let mut cfg = config(&kernel, 1, 32);
    cfg.initrd = Some(g.file("initrd", b"Zinitrd contents"));
    let (outcome, text) = boot(&cfg);
    assert_eq!(outcome.exit, GuestExit::Reset);
    assert_eq!(text, "Z");
}
