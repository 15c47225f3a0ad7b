//! qcow2 layers with extended L2 entries (incompatible feature bit 4), read and written by
//! ember itself: imago 0.2 refuses them.
//!
//! An extended L2 entry is 16 bytes: the usual cluster descriptor, then a bitmap of 32
//! subclusters (bits 0–31: allocated in the host cluster; bits 32–63: reads as zeros; neither:
//! read from the backing layer). A first write into a cluster therefore writes only the
//! subclusters it covers: no copy of the rest of the cluster from the backing layer.
//!
//! ember keeps a layer's L2 entries in memory (those in use, or a whole table once that is
//! smaller; all-zero tables not at all) and writes metadata back only on flush, in an order that keeps the file
//! consistent whatever point a crash (process or power) stops it at:
//! data and refcount blocks, fdatasync, new refcount-table entries, fdatasync, L2 entries,
//! fdatasync. Clusters are taken from the end of the file and never freed, so the worst a crash
//! leaves is leaked clusters. Every L2 table exists before the guest runs (the writable open
//! adds missing ones, in the same order), so L1 never changes at run time.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::VolatileSlice;

use super::refcounts::Refcounts;
use super::{be64, read_full, sub_slices, zero, Extent, Header, Image, L1_OFFSET_MASK, L2_COMPRESSED};
use crate::raw::{read_file_vectored, write_file_vectored};
use crate::{seek_data, DiskError};

/// Subclusters per cluster.
const SUBCLUSTERS: u64 = 32;
/// L2 descriptor bit 63: the cluster's refcount is exactly one (written in place, no COW).
const COPIED: u64 = 1 << 63;
/// Descriptor bits that must be clear in an extended L2 entry: bit 0 (the zero flag lives in
/// the bitmap) and the reserved bits 1–8 and 56–61.
const RESERVED: u64 = 0x3f00_0000_0000_01ff;

/// Incompatible feature bits: dirty (refcounts may be stale), corrupt.
const INCOMPAT_DIRTY: u64 = 1;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bits ember handles: extended L2 entries, and the compression type
/// field (only compressed clusters depend on it, and layers with subclusters have none here).
const INCOMPAT_KNOWN: u64 = super::create::INCOMPAT_EXTENDED_L2 | 1 << 3;
/// Offset of the autoclear feature bits in the header.
const AUTOCLEAR_AT: u64 = 88;

/// One extended L2 entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Entry {
    /// The cluster descriptor (host offset and COPIED).
    desc: u64,
    /// Allocation bits (low 32) and zero bits (high 32).
    bitmap: u64,
}

impl Entry {
    fn host(self) -> u64 {
        self.desc & L1_OFFSET_MASK
    }
    fn alloc(self) -> u32 {
        self.bitmap as u32
    }
    fn zero(self) -> u32 {
        (self.bitmap >> 32) as u32
    }
}

/// Where one subcluster reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Zero,
    Backing,
}

struct L2Table {
    entries: L2Entries,
    /// Range of entries changed since the last flush.
    dirty: Option<(usize, usize)>,
}

/// An L2 table's entries: only the non-empty ones (by index), until they would take more
/// memory than all of them. A writable layer gets an entry per cluster the guest writes, and a
/// read-only layer (a template's or a fork's) is never written, so the tables of most layers
/// stay small; every full table would cost its VMM 64 KiB for the VM's whole life.
enum L2Entries {
    Dense(Box<[Entry]>),
    Sparse(Vec<(u32, Entry)>),
}

impl L2Entries {
    /// The table of PER_TABLE entries holding ENTRIES (by index, in order), in the smaller form.
    fn new(entries: Vec<(u32, Entry)>, per_table: usize) -> L2Entries {
        if entries.len() * size_of::<(u32, Entry)>() < per_table * size_of::<Entry>() {
            return L2Entries::Sparse(entries);
        }
        let mut dense = vec![Entry::default(); per_table].into_boxed_slice();
        for (at, e) in entries {
            dense[at as usize] = e;
        }
        L2Entries::Dense(dense)
    }

    fn get(&self, i: usize) -> Entry {
        match self {
            L2Entries::Dense(entries) => entries[i],
            L2Entries::Sparse(entries) => entries
                .binary_search_by_key(&(i as u32), |(at, _)| *at)
                .map(|k| entries[k].1)
                .unwrap_or_default(),
        }
    }

    /// Sets entry I of a table of PER_TABLE entries.
    fn set(&mut self, i: usize, e: Entry, per_table: usize) {
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

    fn iter(&self) -> Box<dyn Iterator<Item = Entry> + '_> {
        match self {
            L2Entries::Dense(entries) => Box::new(entries.iter().copied()),
            L2Entries::Sparse(entries) => Box::new(entries.iter().map(|(_, e)| *e)),
        }
    }
}

/// A qcow2 layer with subclusters, over an optional backing image.
pub(crate) struct SubclusterLayer {
    file: File,
    cluster_bits: u32,
    size: u64,
    /// Host offsets of the L2 tables (L1 entries without flags).
    l1: Vec<u64>,
    /// The L2 tables; None for a table that is all zeros (nothing allocated in its range).
    l2: Vec<Option<L2Table>>,
    /// Present when the layer is writable.
    refcounts: Option<Refcounts>,
    backing: Option<Box<Image>>,
    /// The entry changes of the write in progress (kept to reuse its allocation).
    updates: Vec<(u64, Entry)>,
}

fn truncated(path: &Path, what: String, end: u64, len: u64) -> DiskError {
    DiskError::Truncated { path: path.into(), what, end, len }
}

impl SubclusterLayer {
    /// Opens the layer in FILE (LEN bytes long, header already read) over BACKING; checks that
    /// every L2 entry is well formed and that all it references lies inside the file.
    pub fn open(
        file: File,
        path: &Path,
        header: &Header,
        len: u64,
        writable: bool,
        backing: Option<Image>,
    ) -> Result<SubclusterLayer, DiskError> {
        let bad = |reason: String| DiskError::Qcow2 { path: path.into(), reason };
        if header.cluster_bits < 14 {
            return Err(bad(format!(
                "clusters of 2^{} bytes are too small for subclusters (16 KiB at least)",
                header.cluster_bits
            )));
        }
        if header.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(bad("its refcounts may be stale (dirty bit set); `qemu-img check -r all` repairs it".into()));
        }
        if header.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(bad("it is marked corrupt; `qemu-img check -r all` may repair it".into()));
        }
        let unknown = header.incompatible & !INCOMPAT_KNOWN & !INCOMPAT_DIRTY & !INCOMPAT_CORRUPT;
        if unknown != 0 {
            return Err(bad(format!("it uses incompatible features ember does not know (bits {unknown:#x})")));
        }
        if writable && header.snapshots != 0 {
            return Err(bad("it has internal snapshots, which ember does not write".into()));
        }
        let cs = header.cluster_size();
        let per_table = (cs / 16) as usize;
        let needed = header.size.div_ceil(cs * per_table as u64);
        if header.l1_entries < needed {
            return Err(bad(format!("its L1 table has {} entries; the disk needs {needed}", header.l1_entries)));
        }
        let l1_end = header.l1_offset.saturating_add(header.l1_entries * 8);
        if l1_end > len {
            return Err(truncated(path, "L1 table".into(), l1_end, len));
        }
        let mut raw_l1 = vec![0u8; (needed * 8) as usize];
        read_full(&file, &mut raw_l1, header.l1_offset, path)?;
        let l1: Vec<u64> = raw_l1.chunks(8).map(|c| be64(c, 0) & L1_OFFSET_MASK).collect();

        let mut l2 = Vec::with_capacity(l1.len());
        let mut raw = vec![0u8; cs as usize];
        let scs = cs / SUBCLUSTERS;
        for (t, &off) in l1.iter().enumerate() {
            if off == 0 {
                l2.push(None);
                continue;
            }
            if off % cs != 0 || off + cs > len {
                return Err(truncated(path, format!("L2 table {t}"), off + cs, len));
            }
            // A table the file has no data for (preallocated, never written) is all zeros.
            let hole = match seek_data(&file, off) {
                Ok(Some(data)) => data >= off + cs,
                Ok(None) => true,
                Err(_) => false,
            };
            if hole {
                l2.push(None);
                continue;
            }
            read_full(&file, &mut raw, off, path)?;
            let mut entries = Vec::new();
            for i in 0..per_table {
                let e = Entry { desc: be64(&raw, i * 16), bitmap: be64(&raw, i * 16 + 8) };
                let guest = (t * per_table + i) as u64 * cs;
                if e == Entry::default() || guest >= header.size {
                    continue;
                }
                let what = || format!("L2 entry for guest offset {guest:#x} ({:#018x} {:#018x})", e.desc, e.bitmap);
                if e.desc & L2_COMPRESSED != 0 {
                    return Err(bad(format!("{}: compressed clusters are not supported with subclusters", what())));
                }
                if e.desc & RESERVED != 0 || e.host() % cs != 0 {
                    return Err(bad(format!("{}: reserved bits set or misaligned host offset", what())));
                }
                if e.alloc() & e.zero() != 0 {
                    return Err(bad(format!("{}: subclusters both allocated and zero", what())));
                }
                if e.alloc() != 0 && e.host() == 0 {
                    return Err(bad(format!("{}: allocated subclusters without a host cluster", what())));
                }
                if e.alloc() != 0 {
                    let end = e.host() + (32 - e.alloc().leading_zeros() as u64) * scs;
                    if end > len {
                        return Err(truncated(path, format!("data cluster for guest offset {guest:#x}"), end, len));
                    }
                }
                entries.push((i as u32, e));
            }
            entries.shrink_to_fit();
            l2.push((!entries.is_empty()).then(|| L2Table { entries: L2Entries::new(entries, per_table), dirty: None }));
        }
        let used_end = l2
            .iter()
            .flatten()
            .flat_map(|t| t.entries.iter().map(|e| e.host() + cs))
            .chain(l1.iter().map(|off| off + cs))
            .max()
            .unwrap_or(0);

        let mut layer = SubclusterLayer {
            file,
            cluster_bits: header.cluster_bits,
            size: header.size,
            l1,
            l2,
            refcounts: None,
            backing: backing.map(Box::new),
            updates: Vec::new(),
        };
        if writable {
            let rc = Refcounts::load(&layer.file, path, header, len)?;
            if used_end > rc.used_end() {
                return Err(bad(format!(
                    "its refcounts end at byte {} but it uses clusters up to byte {used_end}; \
                     `qemu-img check -r all` repairs it",
                    rc.used_end()
                )));
            }
            layer.refcounts = Some(rc);
            if header.autoclear != 0 {
                // Features this writer does not keep up to date (bitmaps) must be marked stale.
                let io = |error| DiskError::Io { path: path.into(), op: "write header", error };
                layer.file.write_all_at(&[0; 8], AUTOCLEAR_AT).map_err(io)?;
                layer.file.sync_data().map_err(io)?;
            }
            layer.add_missing_l2_tables(header).map_err(|e| bad(format!("cannot add L2 tables: {e}")))?;
        }
        Ok(layer)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn subcluster_size(&self) -> u64 {
        self.cluster_size() / SUBCLUSTERS
    }

    fn per_table(&self) -> usize {
        (self.cluster_size() / 16) as usize
    }

    /// Gives every L2 range without a table a zeroed one: tables and their refcounts first,
    /// synced, then the L1 entries, synced.
    fn add_missing_l2_tables(&mut self, header: &Header) -> io::Result<()> {
        let missing: Vec<usize> = (0..self.l1.len()).filter(|t| self.l1[*t] == 0).collect();
        if missing.is_empty() {
            return Ok(());
        }
        let zeros = vec![0u8; self.cluster_size() as usize];
        let rc = self.refcounts.as_mut().expect("writable");
        for &t in &missing {
            let off = rc.allocate(&self.file)?;
            self.file.write_all_at(&zeros, off)?;
            self.l1[t] = off;
        }
        rc.write_back(&self.file)?;
        self.file.sync_data()?;
        for &t in &missing {
            self.file.write_all_at(&(self.l1[t] | COPIED).to_be_bytes(), header.l1_offset + t as u64 * 8)?;
        }
        self.file.sync_data()
    }

    /// log2 of the entries in one L2 table (16 bytes each).
    fn table_bits(&self) -> u32 {
        self.cluster_bits - 4
    }

    fn entry(&self, cluster: u64) -> Entry {
        let t = (cluster >> self.table_bits()) as usize;
        match self.l2.get(t) {
            Some(Some(table)) => table.entries.get((cluster & ((1 << self.table_bits()) - 1)) as usize),
            _ => Entry::default(),
        }
    }

    fn set_entry(&mut self, cluster: u64, e: Entry) {
        let per = self.per_table();
        let (t, i) = ((cluster >> self.table_bits()) as usize, (cluster & (per as u64 - 1)) as usize);
        let table = self.l2[t].get_or_insert_with(|| L2Table { entries: L2Entries::Sparse(Vec::new()), dirty: None });
        table.entries.set(i, e, per);
        table.dirty = Some(match table.dirty {
            Some((a, b)) => (a.min(i), b.max(i + 1)),
            None => (i, i + 1),
        });
    }

    /// The run of bytes from guest offset AT (at most MAX) that reads from one place: where,
    /// and how long. Runs of allocated subclusters continue across clusters that are
    /// contiguous in the file.
    fn run_at(&self, at: u64, max: u64) -> (State, u64, u64) {
        let (cs, scs) = (self.cluster_size(), self.subcluster_size());
        let mut cluster = at >> self.cluster_bits;
        let mut e = self.entry(cluster);
        let mut first = ((at & (cs - 1)) / scs) as u32;
        let state = subcluster_state(e, first);
        let host = e.host() + (at & (cs - 1));
        let mut end = at - at % scs;
        loop {
            let same = match state {
                State::Data => e.alloc(),
                State::Zero => e.zero(),
                State::Backing => !(e.alloc() | e.zero()),
            } >> first;
            let n = same.trailing_ones().min(32 - first) as u64;
            end += n * scs;
            if first as u64 + n < SUBCLUSTERS || end - at >= max || end >= self.size {
                break;
            }
            let next = self.entry(cluster + 1);
            if state == State::Data && next.host() != e.host() + cs {
                break;
            }
            (cluster, e, first) = (cluster + 1, next, 0);
        }
        (state, host, (end - at).min(max).min(self.size - at))
    }

    pub fn read_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        while done < total {
            let at = offset + done as u64;
            let (state, host, len) = self.run_at(at, (total - done) as u64);
            if len == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read at {at} beyond the disk")));
            }
            let part = sub_slices(bufs, done, len as usize);
            match (state, &mut self.backing) {
                (State::Data, _) => read_file_vectored(&self.file, host, &part)?,
                (State::Backing, Some(b)) => b.read_vectored(at, &part)?,
                (State::Zero, _) | (State::Backing, None) => part.iter().for_each(zero),
            }
            done += len as usize;
        }
        Ok(())
    }

    /// Where the run at AT (at most MAX bytes) lives, looking through the backing chain.
    pub fn extent(&mut self, at: u64, max: u64) -> io::Result<(Extent<'_>, u64)> {
        let (state, host, len) = self.run_at(at, max);
        Ok(match (state, &mut self.backing) {
            (State::Data, _) => (Extent::Data { file: &self.file, offset: host }, len),
            (State::Backing, Some(b)) => b.extent(at, len)?,
            (State::Zero, _) | (State::Backing, None) => (Extent::Zero, len),
        })
    }

    /// Reads LEN bytes at AT as this layer shows them, into a new buffer.
    fn read_to_vec(&mut self, at: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.read_vectored(at, &[VolatileSlice::from(&mut buf[..])])?;
        Ok(buf)
    }

    pub fn write_vectored(&mut self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if self.refcounts.is_none() {
            return Err(crate::read_only_error());
        }
        let (cs, scs) = (self.cluster_size(), self.subcluster_size());
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Guest data goes out in as few pwritev calls as the host layout allows; the entries
        // change in memory only once all of it is written.
        let mut updates = std::mem::take(&mut self.updates);
        updates.clear();
        let mut pending: Option<(u64, usize, usize)> = None; // host offset, from, len (in bufs)
        let mut done = 0;
        while done < total {
            let at = offset + done as u64;
            let cluster = at >> self.cluster_bits;
            let within = at & (cs - 1);
            let len = (cs - within).min((total - done) as u64);
            let mut e = self.entry(cluster);
            if e.host() == 0 {
                let host = self.refcounts.as_mut().expect("writable").allocate(&self.file)?;
                e.desc = host | COPIED;
            }
            let (first, last) = (within / scs, (within + len - 1) / scs);
            // A write that covers a subcluster in part fills the rest of it with what it held.
            let head = within % scs;
            if head != 0 && e.alloc() & (1 << first) == 0 {
                let fill = self.read_to_vec(at - head, head)?;
                self.file.write_all_at(&fill, e.host() + within - head)?;
            }
            let end = within + len;
            // (The last subcluster of a disk whose size is not a multiple of it ends early.)
            let tail = (scs - end % scs).min(self.size - (at + len));
            if end % scs != 0 && tail != 0 && e.alloc() & (1 << last) == 0 {
                let fill = self.read_to_vec(at + len, tail)?;
                self.file.write_all_at(&fill, e.host() + end)?;
            }
            let host = e.host() + within;
            pending = match pending {
                Some((h, from, l)) if h + l as u64 == host => Some((h, from, l + len as usize)),
                Some((h, from, l)) => {
                    write_file_vectored(&self.file, h, &sub_slices(bufs, from, l))?;
                    Some((host, done, len as usize))
                }
                None => Some((host, done, len as usize)),
            };
            let mask = (((1u64 << (last - first + 1)) - 1) << first) as u32;
            let new = Entry { desc: e.desc, bitmap: ((e.zero() & !mask) as u64) << 32 | (e.alloc() | mask) as u64 };
            if new != self.entry(cluster) {
                updates.push((cluster, new));
            }
            done += len as usize;
        }
        if let Some((h, from, l)) = pending {
            write_file_vectored(&self.file, h, &sub_slices(bufs, from, l))?;
        }
        for &(cluster, e) in &updates {
            self.set_entry(cluster, e);
        }
        self.updates = updates;
        Ok(())
    }

    /// Makes every completed write durable, metadata in the crash-safe order of the module
    /// comment.
    pub fn flush(&mut self) -> io::Result<()> {
        let Some(rc) = self.refcounts.as_mut() else { return Ok(()) };
        let l2_dirty = self.l2.iter().flatten().any(|t| t.dirty.is_some());
        rc.write_back(&self.file)?;
        if l2_dirty {
            self.file.sync_data()?;
            let mut raw = Vec::new();
            for (t, table) in self.l2.iter_mut().enumerate() {
                let Some(table) = table else { continue };
                let Some((a, b)) = table.dirty else { continue };
                raw.clear();
                for e in (a..b).map(|i| table.entries.get(i)) {
                    raw.extend_from_slice(&e.desc.to_be_bytes());
                    raw.extend_from_slice(&e.bitmap.to_be_bytes());
                }
                self.file.write_all_at(&raw, self.l1[t] + a as u64 * 16)?;
                table.dirty = None;
            }
        }
        self.file.sync_data()
    }
}

fn subcluster_state(e: Entry, sc: u32) -> State {
    if e.alloc() & (1 << sc) != 0 {
        State::Data
    } else if e.zero() & (1 << sc) != 0 {
        State::Zero
    } else {
        State::Backing
    }
}
