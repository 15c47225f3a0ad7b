//! Malformed headers and tables: each is refused with a clear error, quickly, without
//! allocating what the header claims, and without an offset computation wrapping around.

use super::super::test_util::*;
use super::super::DiskError;
use super::*;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Overlays of a 4 MiB base with one cluster written, and their headers: one ember made (with
/// subclusters), and, with qemu-img installed, a standard one qemu-img made.
fn overlays(dir: &Path) -> Vec<(PathBuf, Header)> {
    let base = make_base(dir, "base.raw", 4 * MIB);
    let ember = dir.join("ember.qcow2");
    ov::create(&base, &ember).unwrap();
    let mut made = vec![ember];
    let standard = dir.join("standard.qcow2");
    let args = ["create", "-q", "-f", "qcow2", "-F", "raw", "-b", s(&base), s(&standard)];
    if qemu_img(&args).is_some_and(|out| out.status.success()) {
        made.push(standard);
    }
    made.into_iter()
        .map(|top| {
            let mut d = open(&top, false).unwrap();
            write_at(d.as_mut(), 0, &[7; 4096]);
            d.flush().unwrap();
            drop(d);
            let f = File::open(&top).unwrap();
            let h = Header::read(&f, &top, f.metadata().unwrap().len()).unwrap();
            (top, h)
        })
        .collect()
}

/// Writes BYTES at AT in the file at PATH.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new().write(true).open(path).unwrap().write_all_at(bytes, at).unwrap();
}

/// Opens PATH (writable or not) expecting an error that mentions WHAT; checks that the open
/// took little time and memory, whatever the header claims.
fn refused(path: &Path, writable: bool, what: &str) -> DiskError {
    let started = Instant::now();
    let (result, allocated) = allocated_by(|| open(path, !writable));
    let e = result.err().unwrap_or_else(|| panic!("{} opened despite: {what}", path.display()));
    let msg = e.to_string();
    assert!(msg.contains(s(path)) && msg.contains(what), "{msg}");
    assert!(allocated < 4 * MIB as usize, "refusing ({what}) allocated {allocated} bytes");
    assert!(started.elapsed() < Duration::from_secs(2), "refusing ({what}) took {:?}", started.elapsed());
    e
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_huge_l1_table_is_refused_without_allocating_it() {
    let dir = tmpdir();
    for (top, h) in overlays(dir.as_path()) {
        let good = std::fs::read(&top).unwrap();
        // The most entries a header can record (32 GiB of L1 table).
        patch(&top, 36, &u32::MAX.to_be_bytes());
        refused(&top, false, "its L1 table has 4294967295 entries; qcow2 allows 4194304");
        // As many as QEMU allows, for a virtual size that needs them: the table is not in the file.
        patch(&top, 24, &(h.l2_coverage() << 22).to_be_bytes());
        patch(&top, 36, &(1u32 << 22).to_be_bytes());
        let e = refused(&top, false, "L1 table ends at byte");
        assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
        // A virtual size that would need more.
        patch(&top, 24, &(!511u64).to_be_bytes());
        refused(&top, false, "the disk needs");
        // Fewer entries than the virtual size needs.
        std::fs::write(&top, &good).unwrap();
        patch(&top, 36, &0u32.to_be_bytes());
        refused(&top, true, "its L1 table has 0 entries; the disk needs 1");
    }
}

#[test]
fn a_refcount_block_offset_that_wraps_is_refused() {
    let dir = tmpdir();
    for (top, h) in overlays(dir.as_path()) {
        // Cluster-aligned, and off + cluster size is 2^64: wrapped, it would pass a bounds check.
        let wrapping = 0u64.wrapping_sub(h.cluster_size());
        patch(&top, h.reftable_offset + 8, &wrapping.to_be_bytes());
        let e = refused(&top, true, "refcount block 1 ends at byte 18446744073709551615");
        assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
        // A reader does not use the refcounts.
        assert!(open(&top, true).is_ok());
        patch(&top, h.reftable_offset + 8, &(wrapping + 512).to_be_bytes());
        refused(&top, true, "not cluster-aligned");
    }
}

#[test]
fn tables_and_fields_out_of_bounds_are_refused() {
    let dir = tmpdir();
    for (top, h) in overlays(dir.as_path()) {
        let good = std::fs::read(&top).unwrap();
        let mut cases: Vec<(u64, Vec<u8>, &str)> = vec![
            (20, 22u32.to_be_bytes().into(), "cluster size 2^22 is out of range"),
            (20, 8u32.to_be_bytes().into(), "cluster size 2^8 is out of range"),
            (56, u32::MAX.to_be_bytes().into(), "its refcount table has 4294967295 clusters"),
            (48, (!0xffffu64).to_be_bytes().into(), "refcount table ends at byte 18446744073709551615"),
            (40, (h.l1_offset + 8).to_be_bytes().into(), "L1 table at byte"),
            (h.l1_offset, 0x00ff_ffff_ffff_0000u64.to_be_bytes().into(), "L2 table 0 ends at byte"),
            (16, 1024u32.to_be_bytes().into(), "backing file name is 1024 bytes long"),
            (100, 96u32.to_be_bytes().into(), "header length 96 is shorter"),
        ];
        if h.extended_l2() {
            cases.push((20, 12u32.to_be_bytes().into(), "too small for extended L2 entries"));
        }
        for (at, bytes, what) in cases {
            std::fs::write(&top, &good).unwrap();
            patch(&top, at, &bytes);
            refused(&top, false, what);
        }
        // Incompatible feature bits: dirty, corrupt, external data file, one ember does not know.
        let features = h.incompatible;
        for (bits, what) in [(1u64, "dirty bit set"), (2, "marked corrupt"), (4, "external data file"), (1 << 9, "(bits 0x200)")] {
            std::fs::write(&top, &good).unwrap();
            patch(&top, 72, &(features | bits).to_be_bytes());
            refused(&top, false, what);
        }
        std::fs::write(&top, &good).unwrap();
        assert!(open(&top, false).is_ok());
    }
}
