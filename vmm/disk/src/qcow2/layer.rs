//! One qcow2 layer, read and written by ember: standard L2 entries (qemu-img's default) and
//! extended ones (subclusters, the overlays ember creates) alike, a standard cluster being a
//! cluster of one subcluster (`l2.rs`).
//!
//! ember keeps a layer's L2 entries in memory (those in use, or a whole table once that is
//! smaller; all-zero tables not at all) and writes metadata back only on flush, in an order
//! that keeps the file consistent whatever point a crash (process or power) stops it at: data
//! and refcount blocks, fdatasync, new refcount-table entries, fdatasync, L2 entries, fdatasync.
//! Clusters are taken from the end of the file and never freed, so the worst a crash leaves is
//! leaked clusters. Every L2 table exists before the guest runs (the writable open adds
//! missing ones, in the same order), so L1 never changes at run time.
//!
//! With subclusters a first write into a cluster writes only the subclusters it covers; without
//! them it fills the rest of the cluster from what the layer showed there (copy-on-write).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

use super::header::{Compression, Header};
use super::l2::{decode, encode, Entry, L2Entries, L2Table, COPIED};
use super::refcounts::Refcounts;
use super::{be64, compressed, read_full, sub_slices, zero, Extent, Image, L1_OFFSET_MASK};
use crate::raw::{read_file_vectored, write_file_vectored};
use crate::{seek_data, DiskError};

/// log2 of the subclusters in a cluster with extended L2 entries.
const EXTENDED_SC_BITS: u32 = 5;
/// Offset of the autoclear feature bits in the header.
const AUTOCLEAR_AT: u64 = 88;

/// Where one subcluster reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Zero,
    Backing,
    /// The whole cluster, compressed.
    Compressed,
}

/// A qcow2 layer over an optional backing image.
pub(crate) struct Layer {
    file: File,
    path: PathBuf,
    cluster_bits: u32,
    /// log2 of the subclusters in a cluster: 5 with extended L2 entries, 0 without.
    sc_bits: u32,
    /// log2 of the bytes in a subcluster.
    subcluster_bits: u32,
    /// log2 of the entries in an L2 table (16 or 8 bytes each).
    table_bits: u32,
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
    /// The compressed cluster inflated last (its descriptor) and its data: a guest reads one
    /// in several requests.
    inflated: Option<(u64, Box<[u8]>)>,
}

fn truncated(path: &Path, what: String, end: u64, len: u64) -> DiskError {
    DiskError::Truncated { path: path.into(), what, end, len }
}

/// Whether BYTES at OFFSET lie inside a file of LEN bytes.
fn inside(offset: u64, bytes: u64, len: u64) -> bool {
    offset.checked_add(bytes).is_some_and(|end| end <= len)
}

impl Layer {
    /// Opens the layer in FILE (LEN bytes long, header already read and checked) over BACKING;
    /// checks that every L2 entry is well formed and that all it references lies inside the file.
    pub fn open(
        file: File,
        path: &Path,
        header: &Header,
        len: u64,
        writable: bool,
        backing: Option<Image>,
    ) -> Result<Layer, DiskError> {
        let bad = |reason: String| DiskError::Qcow2 { path: path.into(), reason };
        if writable && header.snapshots != 0 {
            return Err(bad("it has internal snapshots, which ember does not write".into()));
        }
        let cs = header.cluster_size();
        let extended = header.extended_l2();
        let entry_bytes = header.l2_entry_bytes() as usize;
        let per_table = cs as usize / entry_bytes;
        // Bounded by the header's checks: the L1 table lies inside the file, within QEMU's limit.
        let mut raw_l1 = vec![0u8; (header.l1_entries() * 8) as usize];
        read_full(&file, &mut raw_l1, header.l1_offset, path)?;
        let mut l1 = Vec::with_capacity(raw_l1.len() / 8);
        for (t, e) in raw_l1.chunks(8).enumerate() {
            let off = be64(e, 0) & L1_OFFSET_MASK;
            if off % cs != 0 {
                return Err(bad(format!("L1 entry {t} points to an L2 table at byte {off}, not cluster-aligned")));
            }
            if off != 0 && !inside(off, cs, len) {
                return Err(truncated(path, format!("L2 table {t}"), off.saturating_add(cs), len));
            }
            l1.push(off);
        }
        drop(raw_l1);

        let mut l2 = Vec::with_capacity(l1.len());
        let mut raw = vec![0u8; cs as usize];
        let sc_bits = if extended { EXTENDED_SC_BITS } else { 0 };
        let scs = cs >> sc_bits;
        for (t, &off) in l1.iter().enumerate() {
            if off == 0 {
                l2.push(None);
                continue;
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
            for (i, raw) in raw.chunks_exact(entry_bytes).enumerate() {
                let (desc, bitmap) = (be64(raw, 0), if extended { be64(raw, 8) } else { 0 });
                let guest = (t * per_table + i) as u64 * cs;
                if desc | bitmap == 0 || guest >= header.size {
                    continue;
                }
                let what = || match extended {
                    true => format!("L2 entry for guest offset {guest:#x} ({desc:#018x} {bitmap:#018x})"),
                    false => format!("L2 entry for guest offset {guest:#x} ({desc:#018x})"),
                };
                let e = decode(desc, bitmap, extended).map_err(|why| bad(format!("{}: {why}", what())))?;
                if e.compressed() {
                    if writable {
                        return Err(bad(format!(
                            "{}: it has compressed clusters, which ember reads but does not write; \
                             `qemu-img convert -O qcow2` makes an uncompressed copy",
                            what()
                        )));
                    }
                    if header.compression == Compression::Zstd {
                        return Err(bad(format!("{}: zstd-compressed clusters are not supported (deflate only)", what())));
                    }
                    let data = || format!("compressed data for guest offset {guest:#x}");
                    compressed::check(e.desc, header.cluster_bits, data, path, len)?;
                } else {
                    if e.host() % cs != 0 {
                        return Err(bad(format!("{}: misaligned host offset", what())));
                    }
                    if e.alloc() != 0 {
                        // The file may end inside the last cluster, after its last allocated subcluster.
                        let used = ((32 - e.alloc().leading_zeros()) as u64 * scs).min(header.size - guest);
                        if !inside(e.host(), used, len) {
                            let what = format!("data cluster for guest offset {guest:#x}");
                            return Err(truncated(path, what, e.host().saturating_add(used), len));
                        }
                    }
                }
                entries.push((i as u32, e));
            }
            entries.shrink_to_fit();
            l2.push((!entries.is_empty()).then(|| L2Table { entries: L2Entries::new(entries, per_table), dirty: None }));
        }

        let mut layer = Layer {
            file,
            path: path.into(),
            cluster_bits: header.cluster_bits,
            sc_bits,
            subcluster_bits: header.cluster_bits - sc_bits,
            table_bits: per_table.trailing_zeros(),
            size: header.size,
            l1,
            l2,
            refcounts: None,
            backing: backing.map(Box::new),
            updates: Vec::new(),
            inflated: None,
        };
        if writable {
            let used_end = layer
                .l2
                .iter()
                .flatten()
                .flat_map(|t| t.entries.iter().map(|e| e.host() + cs))
                .chain(layer.l1.iter().map(|off| off + cs))
                .max()
                .unwrap_or(0);
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

    fn extended(&self) -> bool {
        self.sc_bits != 0
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

    fn entry(&self, cluster: u64) -> Entry {
        let t = (cluster >> self.table_bits) as usize;
        match self.l2.get(t) {
            Some(Some(table)) => table.entries.get((cluster & ((1 << self.table_bits) - 1)) as usize),
            _ => Entry::default(),
        }
    }

    fn set_entry(&mut self, cluster: u64, e: Entry) {
        let per = 1usize << self.table_bits;
        let (t, i) = ((cluster >> self.table_bits) as usize, (cluster & (per as u64 - 1)) as usize);
        let table = self.l2[t].get_or_insert_with(|| L2Table { entries: L2Entries::Sparse(Vec::new()), dirty: None });
        table.entries.set(i, e, per);
        table.dirty = Some(match table.dirty {
            Some((a, b)) => (a.min(i), b.max(i + 1)),
            None => (i, i + 1),
        });
    }

    /// The run of bytes from guest offset AT (at most MAX) that reads from one place: where
    /// (the host offset, or a compressed cluster's descriptor), and how long. Runs of allocated
    /// subclusters continue across clusters that are contiguous in the file.
    fn run_at(&self, at: u64, max: u64) -> (State, u64, u64) {
        let (cs, sc_bits) = (self.cluster_size(), self.subcluster_bits);
        let subclusters = 1u32 << self.sc_bits;
        let mut cluster = at >> self.cluster_bits;
        let mut e = self.entry(cluster);
        let within = at & (cs - 1);
        if e.compressed() {
            return (State::Compressed, e.desc, (cs - within).min(max).min(self.size - at));
        }
        let mut first = (within >> sc_bits) as u32;
        let state = subcluster_state(e, first);
        let host = e.host() + within;
        let mut end = at >> sc_bits << sc_bits;
        loop {
            let same = match state {
                State::Data => e.alloc(),
                State::Zero => e.zero(),
                // (A compressed cluster returned above.)
                State::Backing | State::Compressed => !(e.alloc() | e.zero()),
            } >> first;
            let n = same.trailing_ones().min(subclusters - first);
            end += (n as u64) << sc_bits;
            if first + n < subclusters || end - at >= max || end >= self.size {
                break;
            }
            let next = self.entry(cluster + 1);
            if next.compressed() || (state == State::Data && next.host() != e.host() + cs) {
                break;
            }
            (cluster, e, first) = (cluster + 1, next, 0);
        }
        let len = (end - at).min(max).min(self.size - at);
        // A backing layer may be smaller than this one (a disk made larger than its image):
        // past its end the disk reads as zeros.
        match (state, self.backing.as_ref().map(|b| b.size())) {
            (State::Backing, Some(below)) if at >= below => (State::Zero, host, len),
            (State::Backing, Some(below)) => (state, host, len.min(below - at)),
            _ => (state, host, len),
        }
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
                (State::Compressed, _) => self.read_compressed(host, at, &part)?,
            }
            done += len as usize;
        }
        Ok(())
    }

    /// Reads PART (guest offset AT, inside one cluster) from the compressed cluster DESC.
    fn read_compressed(&mut self, desc: u64, at: u64, part: &[VolatileSlice<'_>]) -> io::Result<()> {
        if self.inflated.as_ref().is_none_or(|(d, _)| *d != desc) {
            let mut data = match self.inflated.take() {
                Some((_, data)) => data,
                None => vec![0u8; self.cluster_size() as usize].into_boxed_slice(),
            };
            compressed::inflate(&self.file, &self.path, desc, self.cluster_bits, &mut data)?;
            self.inflated = Some((desc, data));
        }
        let data = &self.inflated.as_ref().expect("just inflated").1;
        let mut pos = (at & (self.cluster_size() - 1)) as usize;
        for s in part {
            s.copy_from(&data[pos..pos + s.len()]);
            pos += s.len();
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
            (State::Compressed, _) => (Extent::Encoded, len),
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
        let (cs, scs) = (self.cluster_size(), 1u64 << self.subcluster_bits);
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
            let extended = self.extended();
            let entry_bytes = if extended { 16 } else { 8 };
            let mut raw = Vec::new();
            for (t, table) in self.l2.iter_mut().enumerate() {
                let Some(table) = table else { continue };
                let Some((a, b)) = table.dirty else { continue };
                raw.clear();
                for e in (a..b).map(|i| table.entries.get(i)) {
                    encode(e, extended, &mut raw);
                }
                self.file.write_all_at(&raw, self.l1[t] + a as u64 * entry_bytes)?;
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
