//! Compressed clusters (`qemu-img convert -c`, `qemu-io write -c`), read-only: deflate, as
//! QEMU writes by default. zstd (compression type 1) is refused when a layer has such a cluster.
//!
//! A compressed descriptor holds, below bit 62, the byte offset of the compressed data (not
//! aligned) and the number of 512-byte sectors it spans beyond the first; the data is a raw
//! deflate stream that inflates to exactly one cluster.

use std::fs::File;
use std::io;
use std::path::Path;

use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

use super::read_full;
use crate::DiskError;

/// Where a compressed cluster's data lies: (host offset, most bytes it may take).
pub(crate) fn location(desc: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = desc & ((1 << shift) - 1);
    let sectors = ((desc >> shift) & ((1 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

/// Checks that the compressed cluster DESC starts inside the file (LEN bytes). Its last sector
/// may reach past the end: QEMU counts whole sectors but writes only the stream.
pub(crate) fn check(desc: u64, cluster_bits: u32, what: impl Fn() -> String, path: &Path, len: u64) -> Result<(), DiskError> {
    let (offset, _) = location(desc, cluster_bits);
    if offset >= len {
        return Err(DiskError::Truncated { path: path.into(), what: what(), end: offset + 1, len });
    }
    Ok(())
}

/// Reads the compressed cluster DESC from FILE and inflates it into OUT (one cluster).
pub(crate) fn inflate(file: &File, path: &Path, desc: u64, cluster_bits: u32, out: &mut [u8]) -> io::Result<()> {
    let (offset, max) = location(desc, cluster_bits);
    let mut input = vec![0u8; max as usize];
    let got = read_full(file, &mut input, offset, path).map_err(io::Error::other)?;
    let mut state = Box::<DecompressorOxide>::default();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, _, written) = decompress(&mut state, &input[..got], out, 0, flags);
    // The sector count rounds the stream up, so bytes may follow its end (Done) or the output
    // may fill before the stream says it ends (HasMoreOutput).
    if !matches!(status, TINFLStatus::Done | TINFLStatus::HasMoreOutput) || written != out.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: the compressed cluster at byte {offset} does not inflate to a cluster ({status:?}, {written} bytes)",
                path.display()
            ),
        ));
    }
    Ok(())
}
