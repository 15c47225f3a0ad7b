//! Refcounts of a writable qcow2 layer that ember writes itself (see `subclusters.rs`).
//!
//! Clusters are handed out from the end of the used part of the file and never freed (the
//! block device has no discard), so only the last refcount block is ever read, and a new block
//! goes in the first cluster it counts. Changes stay in memory until [`Refcounts::write_back`].

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{be64, read_full, Header, REFTABLE_OFFSET_MASK};
use crate::disk::DiskError;

/// How far beyond the last cluster handed out the file is made to reach.
const GROW_BYTES: u64 = 4 << 20;

struct Block {
    counts: Box<[u16]>,
    /// Range of entries changed since the last write-back.
    dirty: Option<(usize, usize)>,
}

pub(crate) struct Refcounts {
    cluster_bits: u32,
    table_offset: u64,
    /// Refcount block offsets.
    table: Vec<u64>,
    /// Refcount table entries changed since the last write-back.
    table_dirty: Vec<usize>,
    blocks: HashMap<usize, Block>,
    /// The next cluster to hand out.
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
        let rt_len = header.reftable_clusters * cs;
        let rt_end = header.reftable_offset.saturating_add(rt_len);
        if rt_end > len {
            return Err(DiskError::Truncated { path: path.into(), what: "refcount table".into(), end: rt_end, len });
        }
        let mut raw = vec![0u8; rt_len as usize];
        read_full(file, &mut raw, header.reftable_offset, path)?;
        let table: Vec<u64> = raw.chunks(8).map(|c| be64(c, 0) & REFTABLE_OFFSET_MASK).collect();
        for (i, &off) in table.iter().enumerate() {
            if off != 0 && (off % cs != 0 || off + cs > len) {
                return Err(DiskError::Truncated { path: path.into(), what: format!("refcount block {i}"), end: off + cs, len });
            }
        }
        let mut rc = Refcounts {
            cluster_bits: header.cluster_bits,
            table_offset: header.reftable_offset,
            table,
            table_dirty: Vec::new(),
            blocks: HashMap::new(),
            next: 0,
            file_len: len,
        };
        let io = |error| DiskError::Io { path: path.into(), op: "read refcounts", error };
        let used: Vec<usize> = (0..rc.table.len()).rev().filter(|b| rc.table[*b] != 0).collect();
        for bi in used {
            let per = rc.per_block();
            let block = rc.block(file, bi).map_err(io)?;
            if let Some(last) = block.counts.iter().rposition(|c| *c != 0) {
                rc.next = bi as u64 * per + last as u64 + 1;
                break;
            }
        }
        if rc.next == 0 {
            return Err(bad("its refcounts count no cluster at all".into()));
        }
        Ok(rc)
    }

    /// Clusters one refcount block counts.
    fn per_block(&self) -> u64 {
        (1 << self.cluster_bits) / 2
    }

    /// The first byte after every cluster in use: everything the image references lies below.
    pub fn used_end(&self) -> u64 {
        self.next << self.cluster_bits
    }

    fn block(&mut self, file: &File, bi: usize) -> io::Result<&mut Block> {
        if !self.blocks.contains_key(&bi) {
            let mut raw = vec![0u8; 1 << self.cluster_bits];
            file.read_exact_at(&mut raw, self.table[bi])?;
            let counts = raw.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            self.blocks.insert(bi, Block { counts, dirty: None });
        }
        Ok(self.blocks.get_mut(&bi).expect("just loaded"))
    }

    /// Takes a free cluster (refcount 1 from now on) and returns its offset; the file is long
    /// enough to hold it.
    pub fn allocate(&mut self, file: &File) -> io::Result<u64> {
        let per = self.per_block();
        loop {
            let c = self.next;
            let bi = (c / per) as usize;
            let i = (c % per) as usize;
            if bi >= self.table.len() {
                return Err(io::Error::other("the refcount table is full: the image cannot grow any further"));
            }
            self.next = c + 1;
            self.grow(file, c + 1)?;
            if self.table[bi] == 0 {
                // A new refcount block, in the cluster that it is the first to count.
                let mut counts = vec![0u16; per as usize].into_boxed_slice();
                counts[i] = 1;
                self.blocks.insert(bi, Block { counts, dirty: Some((0, per as usize)) });
                self.table[bi] = c << self.cluster_bits;
                self.table_dirty.push(bi);
                continue;
            }
            let block = self.block(file, bi)?;
            if block.counts[i] != 0 {
                continue;
            }
            block.counts[i] = 1;
            block.dirty = Some(match block.dirty {
                Some((a, b)) => (a.min(i), b.max(i + 1)),
                None => (i, i + 1),
            });
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

    /// Writes changed refcounts to the file; when the refcount table changed too, syncs the
    /// new blocks before writing the table entries that point to them.
    pub fn write_back(&mut self, file: &File) -> io::Result<()> {
        let mut raw = Vec::new();
        for (&bi, block) in self.blocks.iter_mut() {
            let Some((a, b)) = block.dirty else { continue };
            raw.clear();
            raw.extend(block.counts[a..b].iter().flat_map(|c| c.to_be_bytes()));
            file.write_all_at(&raw, self.table[bi] + a as u64 * 2)?;
            block.dirty = None;
        }
        if !self.table_dirty.is_empty() {
            file.sync_data()?;
            for &bi in &self.table_dirty {
                file.write_all_at(&self.table[bi].to_be_bytes(), self.table_offset + bi as u64 * 8)?;
            }
            self.table_dirty.clear();
        }
        Ok(())
    }
}
