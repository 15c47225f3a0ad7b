//! Helpers shared by the native tests: hand-assembled guests packed as ELF kernels, and a
//! console that keeps what the guest printed.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm::config::VmConfig;

pub const LOAD_ADDR: u64 = 0x10_0000;

/// A 64-bit ELF with one loadable segment holding `code` at `paddr`, entered at its start.
pub fn elf(code: &[u8], paddr: u64, memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&memsz.max(code.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

/// `mov dx, 0x3f8` then `mov al, b; out dx, al` for each byte of `text`.
pub fn print(text: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c
}

/// `mov al, 0xfe; out 0x64, al`: the i8042 reset a `reboot=k` kernel does; then spin.
pub const RESET: [u8; 6] = [0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe];

#[derive(Clone, Default)]
pub struct Console(pub Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct Guest {
    pub dir: vmm_sys_util::tempdir::TempDir,
}

impl Guest {
    pub fn new() -> Self {
        Self { dir: vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-native-").unwrap() }
    }

    pub fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.as_path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

pub fn config(kernel: &Path, vcpus: u8, mem_mib: u64) -> VmConfig {
    VmConfig { kernel: kernel.to_owned(), initrd: None, cmdline: None, mem_mib, vcpus, drives: vec![], vsock: None, backing: Default::default() }
}

