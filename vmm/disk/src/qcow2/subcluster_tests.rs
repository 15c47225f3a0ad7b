//! Overlays with subclusters (ember's layout) against a model of the disk and against QEMU:
//! partial writes, chains mixing both layouts, images made and written by QEMU, refcount
//! growth, structure checks.

use super::super::overlay;
use super::super::test_util::*;
use super::*;
use std::os::unix::fs::FileExt;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn read(disk: &mut dyn DiskBackend, offset: u64, len: usize) -> Vec<u8> {
    let mem = guest_memory(len.next_multiple_of(4096));
    disk.read_vectored(offset, &slices(&mem, &[(0, len)])).unwrap();
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn new_overlays_have_subclusters_and_qemu_img_agrees() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 8 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let layers = ov::info(&top).unwrap();
    assert!(layers[0].subclusters && layers[0].cluster_size == Some(CLUSTER_SIZE), "{layers:?}");
    assert!(!layers[1].subclusters && layers[1].cluster_size.is_none());
    let text = overlay::render_info(&layers, false);
    assert!(text.contains("clusters of 64.0 KiB, each in 32 subclusters of 2.0 KiB"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&overlay::render_info(&layers, true)).unwrap();
    assert_eq!((&json["layers"][0]["cluster_size"], &json["layers"][0]["subclusters"]), (&65536.into(), &true.into()));
    assert!(json["layers"][1]["cluster_size"].is_null() && json["layers"][1]["subclusters"] == false);
    qemu_check(&top);
    if let Some(out) = qemu_img(&["info", top.to_str().unwrap()]) {
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(info.contains("extended l2: true"), "{info}");
    }
    assert_eq!(qemu_content(&top).unwrap_or_else(|| base_bytes(0, 8 << 20)), base_bytes(0, 8 << 20));
}

#[test]
fn a_first_small_write_stores_only_its_subclusters() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 64 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let before = allocated(&top);
    let mut expect = base_bytes(0, 64 << 20);
    let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
    // 256 4 KiB writes, each in a cluster of its own.
    for i in 0..256u64 {
        let off = i * 4 * CLUSTER_SIZE + (i % 16) * 4096;
        let data = vec![i as u8 ^ 0x3c; 4096];
        write_at(&mut d, off, &data);
        expect[off as usize..][..4096].copy_from_slice(&data);
    }
    d.flush().unwrap();
    assert_eq!(read(&mut d, 0, 64 << 20), expect);
    drop(d);
    let grown = allocated(&top) - before;
    // With whole-cluster copy-on-write this would be 16 MiB.
    assert!(grown <= 2 * MIB, "256 writes of 4 KiB grew the overlay by {grown} bytes");
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert_eq!(read(&mut d, 0, 64 << 20), expect);
    qemu_check(&top);
    if let Some(q) = qemu_content(&top) {
        assert!(q == expect, "qemu-img sees other content");
    }
}

/// Random writes of every alignment (whole and partial subclusters, across clusters), checked
/// against a model before and after reopening, and against qemu-img.
#[test]
fn random_writes_of_any_alignment_match_a_model_and_qemu() {
    let dir = tmpdir();
    let size = 16 * MIB;
    let base = make_base(dir.as_path(), "base.raw", size);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let mut model = base_bytes(0, size as usize);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
    for n in 0..600u64 {
        let sectors = 1 + rng.next() % match n % 3 {
            0 => 4,
            1 => 40,
            _ => 400,
        };
        let len = sectors * 512;
        let off = (rng.next() % ((size - len) / 512)) * 512;
        let data: Vec<u8> = (0..len).map(|i| (n as u8).wrapping_mul(31) ^ (i as u8)).collect();
        write_at(&mut d, off, &data);
        model[off as usize..][..len as usize].copy_from_slice(&data);
        if n % 50 == 0 {
            let at = (rng.next() % (size / 512 - 300)) * 512;
            assert_eq!(read(&mut d, at, 150 * 1024), model[at as usize..][..150 * 1024], "after write {n}");
        }
        if n % 200 == 199 {
            d.flush().unwrap();
        }
    }
    d.flush().unwrap();
    assert!(read(&mut d, 0, size as usize) == model);
    drop(d);
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert!(read(&mut d, 0, size as usize) == model, "after reopening");
    qemu_check(&top);
    if let Some(q) = qemu_content(&top) {
        assert!(q == model, "qemu-img sees other content");
    }
    // Flattening gives the same disk.
    let flat = dir.as_path().join("flat.raw");
    ov::flatten(&top, &flat).unwrap();
    assert!(std::fs::read(&flat).unwrap() == model);
}

#[test]
fn the_last_sector_of_a_disk_that_ends_inside_a_subcluster() {
    let dir = tmpdir();
    let size = MIB + 512;
    let base = make_base(dir.as_path(), "base.raw", size);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let mut expect = base_bytes(0, size as usize);
    {
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        write_at(&mut d, size - 512, &[0xab; 512]);
        write_at(&mut d, size - 1536, &[0xcd; 512]);
        d.flush().unwrap();
    }
    expect[(size - 512) as usize..].fill(0xab);
    expect[(size - 1536) as usize..][..512].fill(0xcd);
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert!(read(&mut d, 0, size as usize) == expect);
    qemu_check(&top);
    if let Some(q) = qemu_content(&top) {
        assert!(q == expect, "qemu-img sees other content");
    }
}

#[test]
fn chains_mix_layouts_with_subclusters_on_top() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 8 * MIB);
    let old = dir.as_path().join("old.qcow2");
    let mid = dir.as_path().join("mid.qcow2");
    let top = dir.as_path().join("top.qcow2");
    // An overlay without subclusters (made by qemu-img, as ember's older ones were).
    let Some(out) = qemu_img(&["create", "-q", "-f", "qcow2", "-F", "raw", "-b", base.to_str().unwrap(), old.to_str().unwrap()])
    else {
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut expect = base_bytes(0, 8 << 20);
    {
        let mut d = Qcow2Disk::open(&old, false, &tmp_policy()).unwrap();
        write_at(&mut d, MIB + 512, &[0x11; 8192]);
        d.flush().unwrap();
    }
    expect[(MIB + 512) as usize..][..8192].fill(0x11);
    ov::create(&old, &mid).unwrap();
    {
        let mut d = Qcow2Disk::open(&mid, false, &tmp_policy()).unwrap();
        write_at(&mut d, MIB + 4096, &[0x22; 1024]);
        write_at(&mut d, 5 * MIB, &[0x33; 70_000 & !511]);
        d.flush().unwrap();
    }
    expect[(MIB + 4096) as usize..][..1024].fill(0x22);
    expect[(5 * MIB) as usize..][..70_000 & !511].fill(0x33);
    ov::create(&mid, &top).unwrap();
    let (old_sum, mid_sum) = (checksum(&old), checksum(&mid));
    {
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        assert!(read(&mut d, 0, 8 << 20) == expect);
        write_at(&mut d, MIB, &[0x44; 2048]);
        write_at(&mut d, 5 * MIB + 1536, &[0x55; 512]);
        d.flush().unwrap();
    }
    expect[MIB as usize..][..2048].fill(0x44);
    expect[(5 * MIB + 1536) as usize..][..512].fill(0x55);
    assert_eq!((checksum(&old), checksum(&mid)), (old_sum, mid_sum), "a backing layer changed");
    let layers = ov::info(&top).unwrap();
    assert_eq!(layers.iter().map(|l| l.subclusters).collect::<Vec<_>>(), [true, true, false, false]);
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert!(read(&mut d, 0, 8 << 20) == expect);
    drop(d);
    for layer in [&top, &mid, &old] {
        qemu_check(layer);
    }
    assert!(qemu_content(&top).unwrap() == expect, "qemu-img sees other content");
    let flat = dir.as_path().join("flat.raw");
    ov::flatten(&top, &flat).unwrap();
    assert!(std::fs::read(&flat).unwrap() == expect);

    // A standard layer on top of layers with subclusters.
    let std_top = dir.as_path().join("std-top.qcow2");
    let out = qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top.to_str().unwrap(), std_top.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success());
    {
        let mut d = Qcow2Disk::open(&std_top, false, &tmp_policy()).unwrap();
        assert!(read(&mut d, 0, 8 << 20) == expect);
        write_at(&mut d, MIB + 1024, &[0x66; 512]);
        d.flush().unwrap();
    }
    expect[(MIB + 1024) as usize..][..512].fill(0x66);
    let layers = ov::info(&std_top).unwrap();
    assert_eq!(layers.iter().map(|l| l.subclusters).collect::<Vec<_>>(), [false, true, true, false, false]);
    let mut d = Qcow2Disk::open(&std_top, true, &tmp_policy()).unwrap();
    assert!(read(&mut d, 0, 8 << 20) == expect);
    qemu_check(&std_top);
    assert!(qemu_content(&std_top).unwrap() == expect, "qemu-img sees other content");
}

#[test]
fn overlays_made_and_written_by_qemu_with_subclusters() {
    let dir = tmpdir();
    let patterned = 8 * MIB;
    let base = make_base_with(dir.as_path(), "base.raw", 600 * MIB, patterned);
    let top = dir.as_path().join("top.qcow2");
    let Some(out) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "extended_l2=on,cluster_size=65536",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]) else {
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // QEMU's own writes: one in the second L2 range, one a zero write (zero bits in the bitmap).
    let mut ops = vec![(300 * MIB + 1024, 0x66, 3072), (5 * MIB, 0, 65536)];
    if !qemu_io(&top, &[&format!("write -P 0x66 {} 3072", 300 * MIB + 1024)]) {
        return;
    }
    qemu_io(&top, &[&format!("write -z {} 65536", 5 * MIB)]);
    let regions = [(5 * MIB - 4096, 80 << 10), (300 * MIB - 4096, 16384), (550 * MIB - 4096, 16384)];
    {
        // qemu-img made one L2 table; the writable open adds the two others.
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        for (off, len) in regions {
            assert!(read(&mut d, off, len as usize) == model(&ops, patterned, off, len), "at {off:#x}");
        }
        // Over QEMU's zero subclusters, into its partly written cluster, and a new L2 range.
        for (off, byte, len) in [(5 * MIB + 3584, 0x77, 1024), (300 * MIB + 512, 0x88, 1024), (550 * MIB, 0x99, 4096)] {
            write_at(&mut d, off, &vec![byte; len as usize]);
            ops.push((off, byte, len));
        }
        d.flush().unwrap();
    }
    qemu_check(&top);
    let q = qemu_content(&top).unwrap();
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    for (off, len) in regions {
        let want = model(&ops, patterned, off, len);
        assert!(read(&mut d, off, len as usize) == want, "ember at {off:#x}");
        assert!(q[off as usize..][..len as usize] == want[..], "qemu at {off:#x}");
    }
    assert!(q == model(&ops, patterned, 0, 600 * MIB), "qemu-img sees other content elsewhere");
}

#[test]
fn the_refcount_table_grows_new_blocks_as_the_file_does() {
    // With 16 KiB clusters a refcount block counts 8192 clusters (128 MiB of file): one 4 KiB
    // write in each of 16384 clusters needs a second and a third block.
    let dir = tmpdir();
    let size = 256 * MIB;
    let base = make_base_with(dir.as_path(), "base.raw", size, MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create_with_cluster_size(&base, &top, 16 << 10).unwrap();
    let cs = 16u64 << 10;
    let block = |i: u64| vec![(i % 251) as u8 + 1; 4096];
    {
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        let mem = guest_memory(4096);
        for i in 0..size / cs {
            mem.write_slice(&block(i), GuestAddress(0)).unwrap();
            d.write_vectored(i * cs + 8192, &slices(&mem, &[(0, 4096)])).unwrap();
            if i % 5000 == 0 {
                d.flush().unwrap();
            }
        }
        d.flush().unwrap();
    }
    qemu_check(&top);
    let f = File::open(&top).unwrap();
    let h = Header::read(&f, &top, f.metadata().unwrap().len()).unwrap();
    let mut rt = vec![0u8; 32];
    f.read_exact_at(&mut rt, h.reftable_offset).unwrap();
    assert!(rt.chunks(8).take(3).all(|e| be64(e, 0) != 0), "{rt:x?}");
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    for i in (0..size / cs).step_by(97) {
        assert!(read(&mut d, i * cs + 8192, 4096) == block(i), "cluster {i}");
        assert!(read(&mut d, i * cs, 8192) == model(&[], MIB, i * cs, 8192), "cluster {i}");
    }
}

#[test]
fn malformed_entries_are_clear_errors() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 4 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    {
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        write_at(&mut d, 0, &[1; 4096]);
        d.flush().unwrap();
    }
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&top).unwrap();
    let h = Header::read(&f, &top, f.metadata().unwrap().len()).unwrap();
    let mut l1 = [0u8; 8];
    f.read_exact_at(&mut l1, h.l1_offset).unwrap();
    let l2 = be64(&l1, 0) & L1_OFFSET_MASK;
    let mut entry = [0u8; 16];
    f.read_exact_at(&mut entry, l2).unwrap();
    assert_eq!(be64(&entry, 8), 0b11, "the write allocated subclusters 0 and 1");

    // Subcluster 0 both allocated and zero.
    f.write_all_at(&(0b11u64 | 1 << 32).to_be_bytes(), l2 + 8).unwrap();
    let msg = Qcow2Disk::open(&top, true, &tmp_policy()).err().unwrap().to_string();
    assert!(msg.contains("top.qcow2") && msg.contains("both allocated and zero"), "{msg}");
    // Allocated subclusters beyond the end of the file.
    f.write_all_at(&(1u64 << 31).to_be_bytes(), l2 + 8).unwrap();
    f.write_all_at(&((1u64 << 40) | 1 << 63).to_be_bytes(), l2).unwrap();
    let e = Qcow2Disk::open(&top, true, &tmp_policy()).err().unwrap();
    assert!(matches!(e, DiskError::Truncated { .. }), "{e}");
    // A compressed cluster with a bitmap.
    f.write_all_at(&(1u64 << 62).to_be_bytes(), l2).unwrap();
    let msg = Qcow2Disk::open(&top, true, &tmp_policy()).err().unwrap().to_string();
    assert!(msg.contains("compressed cluster with a subcluster bitmap"), "{msg}");
    // A compressed cluster: read, but not written.
    f.write_all_at(&[0; 8], l2 + 8).unwrap();
    assert!(Qcow2Disk::open(&top, true, &tmp_policy()).is_ok());
    let msg = Qcow2Disk::open(&top, false, &tmp_policy()).err().unwrap().to_string();
    assert!(msg.contains("compressed clusters") && msg.contains("does not write"), "{msg}");
}
