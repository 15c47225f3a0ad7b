//! L2 entries, standard and extended, as one in-memory form, and the tables that hold them.
//!
//! A standard entry (8 bytes) maps a whole cluster: allocated, zero (bit 0), compressed, or
//! unallocated (read from the backing layer). An extended entry (16 bytes, incompatible feature
//! bit 4) is the same descriptor followed by a bitmap of 32 subclusters (bits 0–31: allocated
//! in the host cluster; bits 32–63: reads as zeros; neither: read from the backing layer). In
//! memory both are an [`Entry`] with such a bitmap: a standard entry is a cluster of one
//! subcluster, so one read and write path serves both layouts.

use super::{L1_OFFSET_MASK, L2_COMPRESSED};

/// L2 descriptor bit 63: the cluster's refcount is exactly one (written in place, no COW).
pub(crate) const COPIED: u64 = 1 << 63;
/// Standard L2 descriptor bit 0: the cluster reads as zeros.
const ZERO_FLAG: u64 = 1;
/// Descriptor bits that must be clear in an uncompressed entry: reserved bits 1–8 and 56–61;
/// bit 0 too in an extended entry (its zero flags are in the bitmap).
const RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// One L2 entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The cluster descriptor: host offset and COPIED, or a compressed cluster's descriptor.
    pub desc: u64,
    /// Allocation bits (low 32) and zero bits (high 32), one per subcluster.
    pub bitmap: u64,
}

impl Entry {
    pub fn host(self) -> u64 {
        self.desc & L1_OFFSET_MASK
    }
    pub fn compressed(self) -> bool {
        self.desc & L2_COMPRESSED != 0
    }
    pub fn alloc(self) -> u32 {
        self.bitmap as u32
    }
    pub fn zero(self) -> u32 {
        (self.bitmap >> 32) as u32
    }
}

/// Why an L2 entry is malformed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Malformed {
    #[error("reserved bits set")]
    Reserved,
    #[error("a compressed cluster with a subcluster bitmap")]
    CompressedBitmap,
    #[error("subclusters both allocated and zero")]
    AllocatedAndZero,
    #[error("allocated subclusters without a host cluster")]
    NoHostCluster,
}

/// Decodes the entry DESC (and, when EXTENDED, its BITMAP) as the file holds it.
pub(crate) fn decode(desc: u64, bitmap: u64, extended: bool) -> Result<Entry, Malformed> {
    if extended {
        let e = Entry { desc, bitmap };
        if e.compressed() {
            return match e.bitmap {
                0 => Ok(e),
                _ => Err(Malformed::CompressedBitmap),
            };
        }
        if desc & (RESERVED | ZERO_FLAG) != 0 {
            return Err(Malformed::Reserved);
        }
        if e.alloc() & e.zero() != 0 {
            return Err(Malformed::AllocatedAndZero);
        }
        if e.alloc() != 0 && e.host() == 0 {
            return Err(Malformed::NoHostCluster);
        }
        return Ok(e);
    }
    if desc & L2_COMPRESSED != 0 {
        return Ok(Entry { desc, bitmap: 0 });
    }
    if desc & RESERVED != 0 {
        return Err(Malformed::Reserved);
    }
    let host = desc & L1_OFFSET_MASK;
    let bitmap = match (desc & ZERO_FLAG != 0, host != 0) {
        (true, _) => 1 << 32,
        (false, true) => 1,
        (false, false) => 0,
    };
    Ok(Entry { desc: desc & !ZERO_FLAG, bitmap })
}

/// Appends E as the file holds it (8 or 16 bytes, as EXTENDED says).
pub(crate) fn encode(e: Entry, extended: bool, out: &mut Vec<u8>) {
    if extended {
        out.extend_from_slice(&e.desc.to_be_bytes());
        out.extend_from_slice(&e.bitmap.to_be_bytes());
        return;
    }
    // A standard cluster is allocated whenever it has a host offset, unless marked zero; the
    // write path only ever makes an entry allocated (whole) or leaves it as it was.
    debug_assert!(e.compressed() || e.host() == 0 || e.alloc() != 0 || e.zero() != 0);
    let flag = if e.alloc() == 0 && e.zero() != 0 { ZERO_FLAG } else { 0 };
    out.extend_from_slice(&(e.desc | flag).to_be_bytes());
}

pub(crate) struct L2Table {
    pub entries: L2Entries,
    /// Range of entries changed since the last flush.
    pub dirty: Option<(usize, usize)>,
}

/// An L2 table's entries: only the non-empty ones (by index), until they would take more
/// memory than all of them. A writable layer gets an entry per cluster the guest writes, and a
/// read-only layer (a template's or a fork's) is never written, so the tables of most layers
/// stay small; every full table would cost its VMM 64 KiB or more for the VM's whole life.
pub(crate) enum L2Entries {
    Dense(Box<[Entry]>),
    Sparse(Vec<(u32, Entry)>),
}

impl L2Entries {
    /// The table of PER_TABLE entries holding ENTRIES (by index, in order), in the smaller form.
    pub fn new(entries: Vec<(u32, Entry)>, per_table: usize) -> L2Entries {
        if entries.len() * size_of::<(u32, Entry)>() < per_table * size_of::<Entry>() {
            return L2Entries::Sparse(entries);
        }
        let mut dense = vec![Entry::default(); per_table].into_boxed_slice();
        for (at, e) in entries {
            dense[at as usize] = e;
        }
        L2Entries::Dense(dense)
    }

    pub fn get(&self, i: usize) -> Entry {
        match self {
            L2Entries::Dense(entries) => entries[i],
            L2Entries::Sparse(entries) => entries
                .binary_search_by_key(&(i as u32), |(at, _)| *at)
                .map(|k| entries[k].1)
                .unwrap_or_default(),
        }
    }

    /// Sets entry I of a table of PER_TABLE entries.
    pub fn set(&mut self, i: usize, e: Entry, per_table: usize) {
        let entries = match self {
            L2Entries::Dense(entries) => {
                entries[i] = e;
                return;
            }
            L2Entries::Sparse(entries) => entries,
        };
        match entries.binary_search_by_key(&(i as u32), |(at, _)| *at) {
            Ok(k) => entries[k].1 = e,
            Err(k) => {
                if entries.len() == entries.capacity() {
                    // Slow growth: the slack of doubling would outweigh what the sparse form saves.
                    entries.reserve_exact((entries.len() / 4).max(16));
                }
                entries.insert(k, (i as u32, e));
                if entries.len() * size_of::<(u32, Entry)>() >= per_table * size_of::<Entry>() {
                    *self = L2Entries::new(std::mem::take(entries), per_table);
                }
            }
        }
    }

    pub fn iter(&self) -> Box<dyn Iterator<Item = Entry> + '_> {
        match self {
            L2Entries::Dense(entries) => Box::new(entries.iter().copied()),
            L2Entries::Sparse(entries) => Box::new(entries.iter().map(|(_, e)| *e)),
        }
    }
}
