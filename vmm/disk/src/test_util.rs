//! Helpers shared by the disk tests: temporary directories, patterned base images, guest
//! memory, checksums, and the qemu-img binary.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::tempdir::TempDir;

pub fn tmpdir() -> TempDir {
    TempDir::new_with_prefix("/tmp/ember-disk-test-").unwrap()
}

/// The byte at OFFSET of a patterned base image: every third 4 KiB block is a hole (zeros),
/// the others carry their own offset.
pub fn base_byte(offset: u64) -> u8 {
    let block = offset / 4096;
    if block % 3 == 2 {
        0
    } else {
        (offset.wrapping_mul(131) ^ (offset >> 9).wrapping_mul(7) ^ 0x5a) as u8
    }
}

pub fn base_bytes(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| base_byte(offset + i)).collect()
}

/// A sparse raw image of SIZE bytes whose first PATTERNED bytes follow [`base_byte`] (holes
/// left as holes), and whose rest is a hole.
pub fn make_base_with(dir: &Path, name: &str, size: u64, patterned: u64) -> PathBuf {
    let path = dir.join(name);
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let chunk = 1u64 << 20;
    let mut off = 0;
    while off < patterned.min(size) {
        let len = chunk.min(patterned.min(size) - off) as usize;
        let data = base_bytes(off, len);
        for (i, block) in data.chunks(4096).enumerate() {
            if block.iter().any(|b| *b != 0) {
                f.write_all_at(block, off + (i * 4096) as u64).unwrap();
            }
        }
        off += len as u64;
    }
    f.sync_all().unwrap();
    path
}

/// A fully patterned base image.
pub fn make_base(dir: &Path, name: &str, size: u64) -> PathBuf {
    make_base_with(dir, name, size, size)
}

pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// Guest memory segments (address, length) as the slices a device would get.
pub fn slices<'a>(mem: &'a GuestMemoryMmap, segs: &[(u64, usize)]) -> Vec<VolatileSlice<'a>> {
    segs.iter().map(|(a, l)| mem.get_slice(GuestAddress(*a), *l).unwrap()).collect()
}

/// FNV-1a of a whole file.
pub fn checksum(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Bytes the file occupies on the host.
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Modification time, in nanoseconds.
pub fn mtime(path: &Path) -> i128 {
    let m = std::fs::metadata(path).unwrap();
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

pub const QEMU_IMG: &str = "/usr/bin/qemu-img";

/// Runs qemu-img with ARGS; None (after printing a note) when it is not installed.
pub fn qemu_img(args: &[&str]) -> Option<std::process::Output> {
    if !Path::new(QEMU_IMG).exists() {
        eprintln!("note: {QEMU_IMG} is not installed; skipping the qemu-img part of this test");
        return None;
    }
    Some(Command::new(QEMU_IMG).args(args).output().unwrap())
}

/// `qemu-img check`: panics on anything worse than leaked clusters.
pub fn qemu_check(path: &Path) {
    let Some(out) = qemu_img(&["check", path.to_str().unwrap()]) else { return };
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Exit status 0: clean; 3: only leaked clusters. 2 is corruption, 1 an incomplete check.
    let code = out.status.code();
    assert!(code == Some(0) || code == Some(3), "qemu-img check {}: {code:?}\n{text}", path.display());
    assert!(!text.contains("ERROR"), "qemu-img check {}:\n{text}", path.display());
}

/// Writes DATA at OFFSET through the disk's vectored path, from guest memory.
pub fn write_at(disk: &mut dyn super::DiskBackend, offset: u64, data: &[u8]) {
    use vm_memory::Bytes;
    let mem = guest_memory(data.len().next_multiple_of(4096));
    mem.write_slice(data, GuestAddress(0)).unwrap();
    disk.write_vectored(offset, &slices(&mem, &[(0, data.len())])).unwrap();
}
