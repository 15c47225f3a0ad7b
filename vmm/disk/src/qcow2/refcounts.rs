//! Refcounts of a writable qcow2 layer (see `layer.rs`).
//!
//! Clusters are handed out from the end of the used part of the file and never freed (the
//! block device has no discard), so every cluster from the first free one on has refcount 0
//! and every cluster handed out gets refcount 1: nothing of the refcount blocks needs to be
//! kept in memory, only where the free part starts (the blocks would cost a writable layer
//! 64 KiB of its VMM's memory each, for the VM's whole life). A new block goes in the first
//! cluster it counts. Changes reach the file only in [`Refcounts::write_back`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::header::Header;
use super::{be64, read_full, REFTABLE_OFFSET_MASK};
use crate::DiskError;

/// How far beyond the last cluster handed out the file is made to reach.
const GROW_BYTES: u64 = 4 << 20;

/// What refcount blocks are written from: zeros, and 16-bit big-endian ones.
const CHUNK: usize = 4096;
static ZEROS: [u8; CHUNK] = [0; CHUNK];
static ONES: [u8; CHUNK] = {
    let mut ones = [0u8; CHUNK];
    let mut i = 1;
    while i < CHUNK {
        ones[i] = 1;
        i += 2;
    }
    ones
};

pub(crate) struct Refcounts {
    cluster_bits: u32,
    table_offset: u64,
    /// Refcount block offsets, up to the last block in use (the rest of the table is zeros).
    table: Vec<u64>,
    /// Entries the refcount table has room for.
    table_room: usize,
    /// Refcount table entries of blocks made since the last write-back.
    new_blocks: Vec<usize>,
    /// The first cluster handed out since the last write-back.
    written: u64,
    /// The next cluster to hand out; it and all after it have refcount 0.
    next: u64,
    /// Length of the file.
    file_len: u64,
}

impl Refcounts {
    /// Reads the refcount table of the layer in FILE (LEN bytes) and finds the end of its used
    /// clusters.
    pub fn load(file: &File, path: &Path, header: &Header, len: u64) -> Result<Refcounts, DiskError> {
        let bad = |reason: String| DiskError::Qcow2 { path: path.into(), reason };
        if header.refcount_order != 4 {
            return Err(bad(format!(
                "refcounts of {} bits cannot be written by ember (16 bits only)",
                1u32 << header.refcount_order
            )));
        }
        let cs = header.cluster_size();
        // The header's checks put the table inside the file and within QEMU's limit.
        let mut raw = vec![0u8; (header.reftable_clusters * cs) as usize];
        read_full(file, &mut raw, header.reftable_offset, path)?;
        let mut table: Vec<u64> = raw.chunks(8).map(|c| be64(c, 0) & REFTABLE_OFFSET_MASK).collect();
        drop(raw);
        for (i, &off) in table.iter().enumerate() {
            if off % cs != 0 {
                return Err(bad(format!("refcount block {i} at byte {off} is not cluster-aligned")));
            }
            match off.checked_add(cs) {
                _ if off == 0 => {}
                Some(end) if end <= len => {}
                end => {
                    let (what, end) = (format!("refcount block {i}"), end.unwrap_or(u64::MAX));
                    return Err(DiskError::Truncated { path: path.into(), what, end, len });
                }
            }
        }
        let table_room = table.len();
        table.truncate(table.iter().rposition(|&off| off != 0).map_or(0, |last| last + 1));
        table.shrink_to_fit();
        let mut rc = Refcounts {
            cluster_bits: header.cluster_bits,
            table_offset: header.reftable_offset,
            table,
            table_room,
            new_blocks: Vec::new(),
            written: 0,
            next: 0,
            file_len: len,
        };
        let io = |error| DiskError::Io { path: path.into(), op: "read refcounts", error };
        for bi in (0..rc.table.len()).rev().filter(|b| rc.table[*b] != 0) {
            if let Some(last) = rc.last_in_use(file, bi).map_err(io)? {
                rc.next = bi as u64 * rc.per_block() + last + 1;
                break;
            }
        }
        if rc.next == 0 {
            return Err(bad("its refcounts count no cluster at all".into()));
        }
        rc.written = rc.next;
        Ok(rc)
    }

    /// The index of the last cluster block BI counts with a refcount other than 0.
    fn last_in_use(&self, file: &File, bi: usize) -> io::Result<Option<u64>> {
        let mut raw = vec![0u8; 1 << self.cluster_bits];
        file.read_exact_at(&mut raw, self.table[bi])?;
        Ok(raw.chunks(2).rposition(|c| c != [0, 0]).map(|i| i as u64))
    }

    /// Clusters one refcount block counts.
    fn per_block(&self) -> u64 {
        (1 << self.cluster_bits) / 2
    }

    /// The first byte after every cluster in use: everything the image references lies below.
    pub fn used_end(&self) -> u64 {
        self.next << self.cluster_bits
    }

    /// Takes a free cluster (refcount 1 from now on) and returns its offset; the file is long
    /// enough to hold it.
    pub fn allocate(&mut self, file: &File) -> io::Result<u64> {
        loop {
            let c = self.next;
            let bi = (c / self.per_block()) as usize;
            if bi >= self.table_room {
                return Err(io::Error::other("the refcount table is full: the image cannot grow any further"));
            }
            self.grow(file, c + 1)?;
            self.next = c + 1;
            if self.table.get(bi).is_none_or(|&off| off == 0) {
                // A new refcount block, in the cluster that it is the first to count.
                self.table.resize(self.table.len().max(bi + 1), 0);
                self.table[bi] = c << self.cluster_bits;
                self.new_blocks.push(bi);
                continue;
            }
            return Ok(c << self.cluster_bits);
        }
    }

    /// Makes the file at least CLUSTERS clusters long. It grows GROW_BYTES beyond that at a
    /// time: a write past the end of a file costs ext4 about 12% more than one into a hole (the
    /// inode's size changes), and the tail stays a hole until clusters are handed out there.
    fn grow(&mut self, file: &File, clusters: u64) -> io::Result<()> {
        if clusters << self.cluster_bits > self.file_len {
            let len = (clusters << self.cluster_bits) + GROW_BYTES.max(1 << self.cluster_bits);
            file.set_len(len)?;
            self.file_len = len;
        }
        Ok(())
    }

    /// Writes changed refcounts to the file: new blocks whole (whatever an earlier crash left
    /// in their clusters must read as zeros), then refcount 1 for every cluster handed out since
    /// the last write-back. When the refcount table changed too, syncs the blocks before
    /// writing the table entries that point to them.
    pub fn write_back(&mut self, file: &File) -> io::Result<()> {
        let cs = 1u64 << self.cluster_bits;
        for &bi in &self.new_blocks {
            write_pattern(file, &ZEROS, self.table[bi], cs)?;
        }
        let per = self.per_block();
        while self.written < self.next {
            let (bi, i) = ((self.written / per) as usize, self.written % per);
            let n = (per - i).min(self.next - self.written);
            write_pattern(file, &ONES, self.table[bi] + i * 2, n * 2)?;
            self.written += n;
        }
        if !self.new_blocks.is_empty() {
            file.sync_data()?;
            for &bi in &self.new_blocks {
                file.write_all_at(&self.table[bi].to_be_bytes(), self.table_offset + bi as u64 * 8)?;
            }
            self.new_blocks.clear();
        }
        Ok(())
    }
}

/// Writes LEN bytes at AT, PATTERN over and over.
fn write_pattern(file: &File, pattern: &[u8], mut at: u64, len: u64) -> io::Result<()> {
    let end = at + len;
    while at < end {
        let n = (end - at).min(pattern.len() as u64) as usize;
        file.write_all_at(&pattern[..n], at)?;
        at += n as u64;
    }
    Ok(())
}
