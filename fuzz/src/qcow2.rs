//! A hostile qcow2 file: its header, extensions, backing name and format, L1 and L2 tables
//! (standard and extended), refcount table and blocks, and compressed clusters, as `disk`
//! opens and checks them (with `info` on the chain first); then reads, writes and flushes
//! through the layer, the file reopened after the flush (what ember wrote must open again),
//! and a small disk flattened. A raw `base.raw` of 1 MiB lies beside the file, where the
//! backing policy allows it, so an image may have a backing chain.
//!
//! Input: flags (bit 0: read-only), the number of I/O operations, each 8 bytes (kind, first
//! sector u32 le, sectors u16 le, fill byte), then the image.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use disk::{overlay, BackingPolicy, Format};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes of buffer one operation moves at most.
const IO_MAX: u64 = 128 << 10;
pub const BASE_SIZE: u64 = 1 << 20;
/// Disks up to this size are flattened too.
const FLATTEN_MAX: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoOp {
    pub kind: u8,
    pub sector: u32,
    pub sectors: u16,
    pub fill: u8,
}

pub fn decode(data: &[u8]) -> Option<(bool, Vec<IoOp>, &[u8])> {
    let (&flags, rest) = data.split_first()?;
    let (&n, mut rest) = rest.split_first()?;
    let mut ops = Vec::new();
    for _ in 0..n {
        if rest.len() < 8 {
            break;
        }
        let b = &rest[..8];
        ops.push(IoOp {
            kind: b[0],
            sector: u32::from_le_bytes([b[1], b[2], b[3], b[4]]),
            sectors: u16::from_le_bytes([b[5], b[6]]),
            fill: b[7],
        });
        rest = &rest[8..];
    }
    Some((flags & 1 != 0, ops, rest))
}

pub fn encode(read_only: bool, ops: &[IoOp], image: &[u8]) -> Vec<u8> {
    let mut out = vec![read_only as u8, ops.len() as u8];
    for op in ops {
        out.push(op.kind);
        out.extend(op.sector.to_le_bytes());
        out.extend(op.sectors.to_le_bytes());
        out.push(op.fill);
    }
    out.extend_from_slice(image);
    out
}

/// This process's directory for the image, with the raw base beside it.
pub fn workdir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = root.join(format!("ember-fuzz-qcow2.{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("the work directory");
        let base: Vec<u8> = (0..BASE_SIZE).map(|i| (i / 512) as u8).collect();
        std::fs::write(dir.join("base.raw"), base).expect("the base image");
        dir.canonicalize().expect("a canonical work directory")
    })
}

fn io(disk: &mut dyn disk::DiskBackend, mem: &GuestMemoryMmap, op: IoOp) {
    let size = disk.size();
    let len = (u64::from(op.sectors) * 512).min(IO_MAX);
    let offset = (u64::from(op.sector) * 512) % size.max(1);
    let len = len.min(size - offset);
    // One, two or three buffers, as a guest's descriptors would give them.
    let pieces = u64::from(op.fill % 3) + 1;
    let step = len.div_ceil(pieces).div_ceil(512).max(1) * 512;
    let mut bufs = Vec::new();
    let mut at = 0;
    while at < len {
        let n = step.min(len - at);
        bufs.push(mem.get_slice(GuestAddress(at), n as usize).expect("inside the buffer memory"));
        at += n;
    }
    match op.kind % 3 {
        0 => drop(disk.read_vectored(offset, &bufs)),
        1 => {
            for b in &bufs {
                let data = vec![op.fill; b.len()];
                b.copy_from(&data);
            }
            drop(disk.write_vectored(offset, &bufs));
        }
        _ => drop(disk.flush()),
    }
}

pub fn run(data: &[u8]) {
    let Some((read_only, ops, image)) = decode(data) else { return };
    let dir = workdir();
    let path = dir.join("disk.qcow2");
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, image).expect("the image file");
    let policy = BackingPolicy::new([dir]).expect("a backing policy");
    let _ = overlay::info(&path, Format::Qcow2, &policy);
    let Ok(mut disk) = disk::open(&path, Format::Qcow2, read_only, &policy) else { return };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), IO_MAX as usize)]).expect("buffer memory");
    for op in ops {
        io(disk.as_mut(), &mem, op);
    }
    let _ = disk.flush();
    let size = disk.size();
    drop(disk);
    if !read_only {
        let _ = disk::open(&path, Format::Qcow2, true, &policy);
    }
    if size <= FLATTEN_MAX {
        let flat = dir.join("flat.raw");
        let _ = std::fs::remove_file(&flat);
        let _ = overlay::flatten(&path, Format::Qcow2, &policy, &flat);
        let _ = std::fs::remove_file(&flat);
    }
}
