//! One virtio-blk request: the descriptor chain the guest handed over, checked before anything
//! is read or written, then executed against the disk. The guest is hostile: every address and
//! length comes from it, so a chain that is malformed in any way completes with an error status
//! (or, without a place for the status byte, with nothing written) and never panics, blocks, or
//! touches memory outside the guest.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use disk::DiskBackend;

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u64 = 16;

/// What the device advertised; requests beyond it are refused.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub seg_max: u32,
    pub size_max: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    addr: u64,
    len: u64,
}

/// Why a request was refused; logged, and reported to the guest as VIRTIO_BLK_S_IOERR.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("the request header needs 16 readable bytes, the chain has {0}")]
    ShortHeader(u64),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{count} lie beyond the disk's {capacity} sectors")]
    OutOfRange { sector: u64, count: u64, capacity: u64 },
    #[error("{0} data segments, more than the advertised maximum")]
    TooManySegments(usize),
    #[error("a data segment of {0} bytes is larger than the advertised maximum")]
    SegmentTooLarge(u64),
    #[error("request type {0} carries data in the wrong direction")]
    WrongDirection(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("disk I/O failed: {0}")]
    Io(String),
}

/// The result of a request, for the used ring and for tests.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// Bytes the device wrote into the chain's writable buffers (data + status).
    pub used_len: u32,
    /// The status byte written, if the chain had room for one.
    pub status: Option<u8>,
}

/// Splits `regions` after the first `skip` bytes and before the last `trim` bytes.
fn carve(regions: &[Region], mut skip: u64, trim: u64) -> Vec<Region> {
    let total: u64 = regions.iter().map(|r| r.len).sum();
    let mut keep = total.saturating_sub(skip).saturating_sub(trim);
    let mut out = Vec::new();
    for r in regions {
        if keep == 0 {
            break;
        }
        if skip >= r.len {
            skip -= r.len;
            continue;
        }
        let len = (r.len - skip).min(keep);
        out.push(Region { addr: r.addr + skip, len });
        keep -= len;
        skip = 0;
    }
    out
}

fn slices<'m>(mem: &'m GuestMemoryMmap, regions: &[Region]) -> Result<Vec<VolatileSlice<'m>>, RequestError> {
    regions
        .iter()
        .map(|r| {
            mem.get_slice(GuestAddress(r.addr), r.len as usize)
                .map_err(|_| RequestError::OutsideMemory { addr: r.addr, len: r.len })
        })
        .collect()
}

fn read_header(mem: &GuestMemoryMmap, readable: &[Region]) -> Result<(u32, u64), RequestError> {
    let total: u64 = readable.iter().map(|r| r.len).sum();
    if total < HEADER_LEN {
        return Err(RequestError::ShortHeader(total));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0usize;
    for r in carve(readable, 0, total - HEADER_LEN) {
        let dst = &mut header[at..at + r.len as usize];
        mem.read_slice(dst, GuestAddress(r.addr))
            .map_err(|_| RequestError::OutsideMemory { addr: r.addr, len: r.len })?;
        at += r.len as usize;
    }
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    Ok((kind, sector))
}

fn check_segments(data: &[Region], limits: Limits) -> Result<(), RequestError> {
    if data.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments(data.len()));
    }
    if let Some(big) = data.iter().find(|r| r.len > limits.size_max as u64) {
        return Err(RequestError::SegmentTooLarge(big.len));
    }
    Ok(())
}

fn check_range(sector: u64, len: u64, disk_size: u64) -> Result<u64, RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::Unaligned(len));
    }
    let capacity = disk_size / SECTOR_SIZE;
    let count = len / SECTOR_SIZE;
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(RequestError::OutOfRange { sector, count, capacity }),
    }
}

/// Executes one request whose descriptors are `descs` (in chain order), writing the status.
pub fn execute(
    mem: &GuestMemoryMmap,
    descs: impl Iterator<Item = Descriptor>,
    disk: &mut dyn DiskBackend,
    disk_id: &[u8],
    limits: Limits,
) -> Completion {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut order_error = None;
    for d in descs {
        let region = Region { addr: d.addr().0, len: d.len() as u64 };
        if d.is_write_only() {
            writable.push(region);
        } else {
            if !writable.is_empty() {
                order_error = Some(RequestError::ReadableAfterWritable);
            }
            readable.push(region);
        }
    }
    // The status byte is the chain's last writable byte; without one, nothing can be reported.
    let Some(last) = writable.iter().rev().find(|r| r.len > 0) else {
        tracing::warn!("virtio-blk: request without a status byte dropped");
        return Completion { used_len: 0, status: None };
    };
    // The guest chose both numbers: a buffer may claim to run past the end of the address space.
    let status_addr = last.addr.checked_add(last.len - 1);
    let Some(status_addr) = status_addr.filter(|&a| mem.check_address(GuestAddress(a)).is_some()) else {
        tracing::warn!("virtio-blk: status byte of a {}-byte buffer at {:#x} is outside guest memory; request dropped", last.len, last.addr);
        return Completion { used_len: 0, status: None };
    };
    let result = match order_error {
        Some(e) => Err(e),
        None => run(mem, &readable, &writable, disk, disk_id, limits),
    };
    let (status, data_len) = match result {
        Ok(Some(written)) => (VIRTIO_BLK_S_OK as u8, written),
        Ok(None) => (VIRTIO_BLK_S_UNSUPP as u8, 0),
        Err(e) => {
            tracing::debug!("virtio-blk: request refused: {e}");
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
        return Completion { used_len: 0, status: None };
    }
    Completion { used_len: data_len as u32 + 1, status: Some(status) }
}

/// Returns the bytes written into the guest's buffers, or None for an unsupported type.
fn run(
    mem: &GuestMemoryMmap,
    readable: &[Region],
    writable: &[Region],
    disk: &mut dyn DiskBackend,
    disk_id: &[u8],
    limits: Limits,
) -> Result<Option<u64>, RequestError> {
    let (kind, sector) = read_header(mem, readable)?;
    let data_out = carve(readable, HEADER_LEN, 0);
    let data_in = carve(writable, 0, 1);
    let out_len: u64 = data_out.iter().map(|r| r.len).sum();
    let in_len: u64 = data_in.iter().map(|r| r.len).sum();
    let io = |e: std::io::Error| RequestError::Io(e.to_string());
    match kind {
        VIRTIO_BLK_T_IN => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection(kind));
            }
            check_segments(&data_in, limits)?;
            let offset = check_range(sector, in_len, disk.size())?;
            let bufs = slices(mem, &data_in)?;
            disk.read_vectored(offset, &bufs).map_err(io)?;
            Ok(Some(in_len))
        }
        VIRTIO_BLK_T_OUT => {
            if in_len != 0 {
                return Err(RequestError::WrongDirection(kind));
            }
            if disk.read_only() {
                return Err(RequestError::ReadOnly);
            }
            check_segments(&data_out, limits)?;
            let offset = check_range(sector, out_len, disk.size())?;
            let bufs = slices(mem, &data_out)?;
            disk.write_vectored(offset, &bufs).map_err(io)?;
            Ok(Some(0))
        }
        VIRTIO_BLK_T_FLUSH => {
            if in_len != 0 || out_len != 0 {
                return Err(RequestError::WrongDirection(kind));
            }
            disk.flush().map_err(io)?;
            Ok(Some(0))
        }
        VIRTIO_BLK_T_GET_ID => {
            if out_len != 0 {
                return Err(RequestError::WrongDirection(kind));
            }
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            let n = disk_id.len().min(id.len());
            id[..n].copy_from_slice(&disk_id[..n]);
            let mut written = 0u64;
            for r in &data_in {
                if written as usize >= id.len() {
                    break;
                }
                let len = r.len.min(id.len() as u64 - written);
                mem.write_slice(&id[written as usize..(written + len) as usize], GuestAddress(r.addr))
                    .map_err(|_| RequestError::OutsideMemory { addr: r.addr, len })?;
                written += len;
            }
            Ok(Some(written))
        }
        _ => Ok(None),
    }
}
