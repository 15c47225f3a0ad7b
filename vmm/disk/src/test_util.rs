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

/// The disk after OPS (offset, byte, length; applied in order) over a base patterned in its
/// first PATTERNED bytes: LEN bytes at OFF.
pub fn model(ops: &[(u64, u8, u64)], patterned: u64, off: u64, len: u64) -> Vec<u8> {
    let mut v: Vec<u8> = (off..off + len).map(|o| if o < patterned { base_byte(o) } else { 0 }).collect();
    for &(at, byte, n) in ops {
        for o in at.max(off)..(at + n).min(off + len) {
            v[(o - off) as usize] = byte;
        }
    }
    v
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

/// What qemu-img sees as the disk content of PATH (None without qemu-img).
pub fn qemu_content(path: &Path) -> Option<Vec<u8>> {
    let flat = path.with_extension("qemu-flat");
    let out = qemu_img(&["convert", "-O", "raw", path.to_str().unwrap(), flat.to_str().unwrap()])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data = std::fs::read(&flat).unwrap();
    std::fs::remove_file(&flat).unwrap();
    Some(data)
}

/// Runs the qemu-io commands CMDS on PATH; false (after printing a note) when qemu-io is not
/// installed.
pub fn qemu_io(path: &Path, cmds: &[&str]) -> bool {
    let qemu_io = Path::new("/usr/bin/qemu-io");
    if !qemu_io.exists() {
        eprintln!("note: qemu-io is not installed; skipping the QEMU-written part of this test");
        return false;
    }
    let mut cmd = Command::new(qemu_io);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(path).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmds:?}: {}", String::from_utf8_lossy(&out.stderr));
    true
}

/// Counts the bytes each thread allocates, so that a test can bound what an open allocates.
struct CountingAlloc;

thread_local! {
    static ALLOCATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the count is a
// thread-local Cell with no destructor, so it never allocates or panics.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: the caller's guarantees for `layout` are the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + layout.size()));
        // SAFETY: as in `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: PTR came from the system allocator with LAYOUT (every allocation goes there).
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|a| a.set(a.get() + new_size.saturating_sub(layout.size())));
        // SAFETY: as in `dealloc`; the caller's guarantees for NEW_SIZE are the system's.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING_ALLOC: CountingAlloc = CountingAlloc;

/// F's result, and the bytes the current thread allocated while it ran (frees not deducted).
pub fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCATED.with(|a| a.get());
    let r = f();
    (r, ALLOCATED.with(|a| a.get()) - before)
}

/// LEN bytes of DISK at OFFSET, read through its vectored path into guest memory.
pub fn read_at(disk: &mut dyn super::DiskBackend, offset: u64, len: usize) -> Vec<u8> {
    use vm_memory::Bytes;
    let mem = guest_memory(len.next_multiple_of(4096));
    disk.read_vectored(offset, &slices(&mem, &[(0, len)])).unwrap();
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

/// Backing files anywhere under /tmp, where every test makes its files ([`tmpdir`]).
pub fn tmp_policy() -> super::BackingPolicy {
    super::BackingPolicy::new(["/tmp"]).unwrap()
}

/// The format a test file's name says (every test names its files `.raw` or `.qcow2`).
pub fn format_of(path: &Path) -> super::Format {
    super::Format::from_extension(path).unwrap_or_else(|| panic!("{}: no format in the name", path.display()))
}

/// Opens PATH in the format its name says, its backing files under /tmp.
pub fn open(path: &Path, read_only: bool) -> Result<Box<dyn super::DiskBackend>, super::DiskError> {
    super::open(path, format_of(path), read_only, &tmp_policy())
}

/// The overlay operations with the format each file's name says and backing files under /tmp.
pub mod ov {
    use std::path::Path;

    use super::{format_of, tmp_policy};
    use crate::overlay::{self, Base, FlattenStats, LayerInfo};
    use crate::DiskError;

    fn with_base<R>(base: &Path, f: impl FnOnce(Base<'_>) -> R) -> R {
        f(Base { path: base, format: format_of(base), policy: &tmp_policy() })
    }

    pub fn create(base: &Path, top: &Path) -> Result<(), DiskError> {
        with_base(base, |b| overlay::create(b, top))
    }

    pub fn create_sized(base: &Path, top: &Path, size: u64) -> Result<(), DiskError> {
        with_base(base, |b| overlay::create_sized(b, top, size))
    }

    pub fn create_with_cluster_size(base: &Path, top: &Path, cluster_size: u64) -> Result<(), DiskError> {
        with_base(base, |b| overlay::create_with_cluster_size(b, top, cluster_size))
    }

    pub fn info(path: &Path) -> Result<Vec<LayerInfo>, DiskError> {
        overlay::info(path, format_of(path), &tmp_policy())
    }

    pub fn flatten(path: &Path, out: &Path) -> Result<FlattenStats, DiskError> {
        overlay::flatten(path, format_of(path), &tmp_policy(), out)
    }
}
