//! The qcow2 header: the fields ember uses, the features it refuses, and the bounds that make
//! every later allocation and offset computation safe.
//!
//! An image file is untrusted input (a user's template, a copied overlay): nothing it records
//! is used to size an allocation or to compute an offset before it is checked here against
//! QEMU's own limits and against the length of the file, with checked arithmetic. What a
//! header can then make ember allocate is bounded by the file's size (the L1 and refcount
//! tables lie inside it) and by QEMU's limits on those tables.

use std::fs::File;
use std::path::Path;

use super::{be32, be64, read_full};
use crate::DiskError;

/// Header extension type of the backing file's format name.
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// QEMU's limits: a larger table is refused by QEMU too, so no real image has one.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub(crate) const MAX_BACKING_NAME: u64 = 1023;
/// Cluster sizes qcow2 allows: 512 bytes to 2 MiB.
const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;
/// Extended L2 entries need 16 KiB clusters at least (32 subclusters of 512 bytes or more).
pub(crate) const MIN_EXTENDED_CLUSTER_BITS: u32 = 14;

/// How compressed clusters are encoded (the header's compression type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    Deflate,
    Zstd,
}

/// The parts of a qcow2 header ember uses, checked.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub cluster_bits: u32,
    /// The virtual size of the disk.
    pub size: u64,
    pub l1_offset: u64,
    pub reftable_offset: u64,
    pub reftable_clusters: u64,
    pub snapshots: u32,
    pub incompatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub compression: Compression,
    /// The backing file name and the format recorded for it.
    pub backing: Option<String>,
    pub backing_format: Option<String>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are extended (each cluster in 32 subclusters).
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    /// Bytes of one L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        self.cluster_size() * (self.cluster_size() / self.l2_entry_bytes())
    }

    /// L1 entries the virtual size needs: ember reads only these (QEMU may leave more, unused,
    /// after shrinking an image).
    pub fn l1_entries(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage())
    }

    /// Reads and checks the header of the qcow2 file FILE (LEN bytes long).
    pub fn read(file: &File, path: &Path, len: u64) -> Result<Header, DiskError> {
        let bad = |reason: String| DiskError::Qcow2 { path: path.into(), reason };
        let truncated =
            |what: &str, end: u64| DiskError::Truncated { path: path.into(), what: what.into(), end, len };
        if len < 72 {
            return Err(truncated("header", 72));
        }
        let mut b = [0u8; 105];
        let n = read_full(file, &mut b[..len.min(105) as usize], 0, path)?;
        if b[..4] != super::super::QCOW2_MAGIC {
            return Err(bad("no qcow2 magic (QFI\\xfb) at the start of the file".into()));
        }
        let version = be32(&b, 4);
        if version != 2 && version != 3 {
            return Err(bad(format!("unsupported qcow2 version {version}")));
        }
        let header_len = match version {
            2 => 72,
            _ if n < 104 => return Err(truncated("header", 104)),
            _ => be32(&b, 100) as u64,
        };
        if header_len < 104 && version == 3 {
            return Err(bad(format!("its header length {header_len} is shorter than version 3 needs (104)")));
        }
        let cluster_bits = be32(&b, 20);
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(bad(format!("cluster size 2^{cluster_bits} is out of range (512 bytes to 2 MiB)")));
        }
        if be32(&b, 32) != 0 {
            return Err(bad("the image is encrypted, which ember does not support".into()));
        }
        let v3 = |at: usize, v2: u64| if version == 3 { be64(&b, at) } else { v2 };
        let incompatible = v3(72, 0);
        let compression = match (incompatible & INCOMPAT_COMPRESSION_TYPE != 0, header_len > 104 && n > 104) {
            (false, _) => Compression::Deflate,
            (true, false) => return Err(bad("the compression type bit is set, but the header has no such field".into())),
            (true, true) => match b[104] {
                0 => Compression::Deflate,
                1 => Compression::Zstd,
                t => return Err(bad(format!("unknown compression type {t}"))),
            },
        };
        let mut header = Header {
            cluster_bits,
            size: be64(&b, 24),
            l1_offset: be64(&b, 40),
            reftable_offset: be64(&b, 48),
            reftable_clusters: be32(&b, 56) as u64,
            snapshots: be32(&b, 60),
            incompatible,
            autoclear: v3(88, 0),
            refcount_order: if version == 3 { be32(&b, 96) } else { 4 },
            compression,
            backing: None,
            backing_format: None,
        };
        header.check_features(path)?;
        if header.refcount_order > 6 {
            return Err(bad(format!("refcounts of 2^{} bits are out of range", header.refcount_order)));
        }
        header.read_names(file, path, len, header_len, be64(&b, 8), be32(&b, 16) as u64)?;
        header.check_tables(be32(&b, 36) as u64, path, len)?;
        Ok(header)
    }

    /// Reads the backing file name (BACKING_LEN bytes at BACKING_OFFSET) and the header
    /// extensions (from HEADER_LEN on): both must lie in the first cluster.
    fn read_names(
        &mut self,
        file: &File,
        path: &Path,
        len: u64,
        header_len: u64,
        backing_offset: u64,
        backing_len: u64,
    ) -> Result<(), DiskError> {
        let bad = |reason: &str| DiskError::Qcow2 { path: path.into(), reason: reason.into() };
        if backing_len > MAX_BACKING_NAME {
            return Err(DiskError::Qcow2 {
                path: path.into(),
                reason: format!("its backing file name is {backing_len} bytes long; qcow2 allows {MAX_BACKING_NAME}"),
            });
        }
        let backing_end =
            backing_offset.checked_add(backing_len).ok_or_else(|| bad("its backing file name's offset overflows"))?;
        if backing_offset != 0 && backing_end > len {
            let what = "backing file name".into();
            return Err(DiskError::Truncated { path: path.into(), what, end: backing_end, len });
        }
        let first = self.cluster_size().min(len);
        if backing_end > first || header_len > first {
            return Err(bad("its header does not fit in its first cluster"));
        }
        let mut c = vec![0u8; first as usize];
        read_full(file, &mut c, 0, path)?;
        let mut at = header_len.next_multiple_of(8) as usize;
        while at + 8 <= c.len() {
            let (kind, ext_len) = (be32(&c, at), be32(&c, at + 4) as usize);
            if kind == 0 {
                break;
            }
            let data = c.get(at + 8..at + 8 + ext_len).ok_or_else(|| bad("a header extension overruns the first cluster"))?;
            if kind == EXT_BACKING_FORMAT {
                let name = std::str::from_utf8(data).map_err(|_| bad("the backing format name is not UTF-8"))?;
                self.backing_format = Some(name.to_owned());
            }
            at += 8 + ext_len.next_multiple_of(8);
        }
        if backing_offset != 0 && backing_len != 0 {
            let name = &c[backing_offset as usize..backing_end as usize];
            let name = std::str::from_utf8(name).map_err(|_| bad("the backing file name is not UTF-8"))?;
            self.backing = Some(name.to_owned());
        }
        Ok(())
    }

    /// Refuses images that use an incompatible feature ember does not implement, naming it.
    fn check_features(&self, path: &Path) -> Result<(), DiskError> {
        let refuse = |reason: String| Err(DiskError::Qcow2 { path: path.into(), reason });
        let inc = self.incompatible;
        if inc & INCOMPAT_DIRTY != 0 {
            return refuse("its refcounts may be stale (dirty bit set); `qemu-img check -r all` repairs it".into());
        }
        if inc & INCOMPAT_CORRUPT != 0 {
            return refuse("it is marked corrupt; `qemu-img check -r all` may repair it".into());
        }
        if inc & INCOMPAT_DATA_FILE != 0 {
            return refuse("it keeps its data in an external data file, which ember does not support".into());
        }
        if self.extended_l2() && self.cluster_bits < MIN_EXTENDED_CLUSTER_BITS {
            return refuse(format!(
                "clusters of 2^{} bytes are too small for extended L2 entries (16 KiB at least)",
                self.cluster_bits
            ));
        }
        let unknown = inc & !(INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2);
        if unknown != 0 {
            return refuse(format!("it uses incompatible features ember does not know (bits {unknown:#x})"));
        }
        Ok(())
    }

    /// Checks the L1 table (L1_ENTRIES recorded) and the refcount table: within QEMU's limits,
    /// cluster-aligned, inside the file, and an L1 table big enough for the virtual size.
    fn check_tables(&self, l1_entries: u64, path: &Path, len: u64) -> Result<(), DiskError> {
        let bad = |reason: String| DiskError::Qcow2 { path: path.into(), reason };
        let cs = self.cluster_size();
        if l1_entries > MAX_L1_BYTES / 8 {
            return Err(bad(format!("its L1 table has {l1_entries} entries; qcow2 allows {}", MAX_L1_BYTES / 8)));
        }
        let needed = self.l1_entries();
        if l1_entries < needed {
            return Err(bad(format!("its L1 table has {l1_entries} entries; the disk needs {needed}")));
        }
        table_in_file("L1 table", self.l1_offset, l1_entries * 8, cs, path, len)?;
        if self.reftable_clusters > MAX_REFTABLE_BYTES / cs {
            return Err(bad(format!(
                "its refcount table has {} clusters; qcow2 allows {} bytes",
                self.reftable_clusters, MAX_REFTABLE_BYTES
            )));
        }
        table_in_file("refcount table", self.reftable_offset, self.reftable_clusters * cs, cs, path, len)
    }
}

/// Checks that the table WHAT, BYTES long at OFFSET, is aligned to a cluster of CS bytes and lies
/// inside the file (LEN bytes).
fn table_in_file(what: &str, offset: u64, bytes: u64, cs: u64, path: &Path, len: u64) -> Result<(), DiskError> {
    if offset % cs != 0 {
        let reason = format!("its {what} at byte {offset} is not cluster-aligned");
        return Err(DiskError::Qcow2 { path: path.into(), reason });
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= len => Ok(()),
        end => Err(DiskError::Truncated { path: path.into(), what: what.into(), end: end.unwrap_or(u64::MAX), len }),
    }
}
