//! A new, empty overlay in ember's layout: qcow2 v3 with extended L2 entries (subclusters),
//! 16-bit refcounts, the backing file's name and format, and every L2 table already in place
//! (as a hole: an all-zero table maps nothing), so that L1 never changes while a guest runs.
//!
//! ```text
//! cluster 0              header, backing format extension, backing file name
//! 1 ..                   refcount table (room for the image to grow to twice the disk)
//! then                   refcount blocks counting the metadata clusters
//! then                   L1 table
//! then                   L2 tables (holes)
//! ```

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::header::{EXT_BACKING_FORMAT, INCOMPAT_EXTENDED_L2, MAX_BACKING_NAME, MIN_EXTENDED_CLUSTER_BITS};

/// Length of the version 3 header ember writes (without the compression type field).
const HEADER_LEN: usize = 104;

/// Writes into FILE (empty, opened for writing) an overlay of a SIZE-byte disk with clusters of
/// 2^CLUSTER_BITS bytes (14 to 21) over BACKING, whose format is BACKING_FORMAT.
pub(crate) fn write_overlay(
    file: &File,
    size: u64,
    cluster_bits: u32,
    backing: &str,
    backing_format: &str,
) -> io::Result<()> {
    if !(MIN_EXTENDED_CLUSTER_BITS..=21).contains(&cluster_bits) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("clusters of 2^{cluster_bits} bytes: subclusters need 16 KiB to 2 MiB"),
        ));
    }
    if backing.len() as u64 > MAX_BACKING_NAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the backing file name is {} bytes long; qcow2 allows {MAX_BACKING_NAME}", backing.len()),
        ));
    }
    let cs = 1u64 << cluster_bits;
    let per_table = cs / 16;
    let l2_tables = size.div_ceil(cs * per_table).max(1);
    let l1_clusters = (l2_tables * 8).div_ceil(cs);
    let per_block = cs / 2;
    let (mut rt, mut rb) = (1u64, 1u64);
    let total = loop {
        let total = 1 + rt + rb + l1_clusters + l2_tables;
        // Every data cluster, once more for clusters leaked by crashes, and the metadata.
        let most = total + 2 * size.div_ceil(cs);
        let need_rb = total.div_ceil(per_block);
        let need_rt = (most.div_ceil(per_block) * 8).div_ceil(cs);
        if need_rb <= rb && need_rt <= rt {
            break total;
        }
        (rt, rb) = (rt.max(need_rt), rb.max(need_rb));
    };
    let reftable = cs;
    let blocks = (1 + rt) * cs;
    let l1 = blocks + rb * cs;
    let l2 = l1 + l1_clusters * cs;

    let fmt_len = backing_format.len() as u64;
    let name_at = HEADER_LEN as u64 + 8 + fmt_len.next_multiple_of(8) + 8;
    let mut h = vec![0u8; name_at as usize + backing.len()];
    let mut put = |at: usize, bytes: &[u8]| h[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &super::super::QCOW2_MAGIC);
    put(4, &3u32.to_be_bytes());
    put(8, &name_at.to_be_bytes());
    put(16, &(backing.len() as u32).to_be_bytes());
    put(20, &cluster_bits.to_be_bytes());
    put(24, &size.to_be_bytes());
    put(36, &(l2_tables as u32).to_be_bytes());
    put(40, &l1.to_be_bytes());
    put(48, &reftable.to_be_bytes());
    put(56, &(rt as u32).to_be_bytes());
    put(72, &INCOMPAT_EXTENDED_L2.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &(HEADER_LEN as u32).to_be_bytes());
    put(HEADER_LEN, &EXT_BACKING_FORMAT.to_be_bytes());
    put(HEADER_LEN + 4, &(fmt_len as u32).to_be_bytes());
    put(HEADER_LEN + 8, backing_format.as_bytes());
    // The end-of-extensions marker is the 8 zero bytes before the name.
    put(name_at as usize, backing.as_bytes());
    file.write_all_at(&h, 0)?;

    let table: Vec<u8> = (0..rb).flat_map(|i| (blocks + i * cs).to_be_bytes()).collect();
    file.write_all_at(&table, reftable)?;
    let counts: Vec<u8> = (0..total).flat_map(|_| 1u16.to_be_bytes()).collect();
    file.write_all_at(&counts, blocks)?;
    let entries: Vec<u8> = (0..l2_tables).flat_map(|t| ((l2 + t * cs) | 1 << 63).to_be_bytes()).collect();
    file.write_all_at(&entries, l1)?;
    file.set_len(total * cs)
}
