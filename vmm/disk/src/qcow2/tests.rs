//! The qcow2 layer against real files: chains, structure checks, qemu-img agreement.

use super::super::test_util::*;
use super::*;
use std::os::unix::fs::FileExt;
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;

fn read(disk: &mut dyn DiskBackend, offset: u64, len: usize) -> Vec<u8> {
    let mem = guest_memory(len.next_multiple_of(4096) + 4096);
    // Split in two segments to exercise the vector path.
    let half = (len / 2) & !511;
    disk.read_vectored(offset, &slices(&mem, &[(0, half), (half as u64 + 4096, len - half)])).unwrap();
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out[..half], GuestAddress(0)).unwrap();
    mem.read_slice(&mut out[half..], GuestAddress(half as u64 + 4096)).unwrap();
    out
}

/// The L1 entries the virtual size of the image at PATH needs.
pub(super) fn l1_table(path: &Path) -> Vec<u64> {
    let f = File::open(path).unwrap();
    let h = Header::read(&f, path, f.metadata().unwrap().len()).unwrap();
    let mut raw = vec![0u8; h.l1_entries() as usize * 8];
    f.read_exact_at(&mut raw, h.l1_offset).unwrap();
    raw.chunks(8).map(|c| be64(c, 0)).collect()
}

#[test]
fn overlay_on_raw_reads_the_base_and_writes_only_to_itself() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 16 * MIB);
    let (sum, mt) = (checksum(&base), mtime(&base));
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();

    let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
    assert_eq!(d.size(), 16 * MIB);
    assert!(!d.read_only());
    assert_eq!(read(&mut d, 0, 256 << 10), base_bytes(0, 256 << 10));
    assert_eq!(read(&mut d, 5 * MIB + 512, 70_000 & !511), base_bytes(5 * MIB + 512, 70_000 & !511));

    // A partial-cluster write in the middle of the base's data, and one spanning clusters.
    let a: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8 ^ 0xa5).collect();
    write_at(&mut d, 3 * MIB + 8192, &a);
    let b = vec![0x77u8; 200 << 10];
    write_at(&mut d, 9 * MIB - 4096, &b);
    d.flush().unwrap();

    let mut expect = base_bytes(0, 16 * MIB as usize);
    expect[(3 * MIB + 8192) as usize..][..4096].copy_from_slice(&a);
    expect[(9 * MIB - 4096) as usize..][..b.len()].copy_from_slice(&b);
    assert_eq!(read(&mut d, 0, 16 * MIB as usize), expect);
    drop(d);

    // Reopened: the same; the base untouched; the overlay small.
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert_eq!(read(&mut d, 0, 16 * MIB as usize), expect);
    assert_eq!(checksum(&base), sum);
    assert_eq!(mtime(&base), mt);
    let alloc = allocated(&top);
    assert!(alloc < 1024 << 10, "overlay occupies {alloc} bytes for ~330 KiB of writes");
    qemu_check(&top);
    if let Some(out) = qemu_img(&["info", "--output=json", top.to_str().unwrap()]) {
        let info = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{info}");
        assert!(info.contains("\"format\": \"qcow2\""), "{info}");
        assert!(info.contains(&format!("\"backing-filename\": \"{}\"", base.display())), "{info}");
        assert!(info.contains("\"backing-filename-format\": \"raw\""), "{info}");
        assert!(info.contains(&format!("\"virtual-size\": {}", 16 * MIB)), "{info}");
    }
    // qemu-img sees the same disk content as ember.
    let flat = dir.as_path().join("flat-by-qemu.raw");
    if qemu_img(&["convert", "-O", "raw", top.to_str().unwrap(), flat.to_str().unwrap()]).is_some() {
        assert_eq!(std::fs::read(&flat).unwrap(), expect);
    }
}

#[test]
fn chains_see_through_frozen_layers_and_never_write_them() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 8 * MIB);
    let frozen = dir.as_path().join("frozen.qcow2");
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &frozen).unwrap();
    {
        let mut d = Qcow2Disk::open(&frozen, false, &tmp_policy()).unwrap();
        write_at(&mut d, MIB, &[0x11; 8192]);
        write_at(&mut d, 6 * MIB, &[0x22; 512]);
        d.flush().unwrap();
    }
    let (base_sum, frozen_sum) = (checksum(&base), checksum(&frozen));
    let frozen_mtime = mtime(&frozen);
    ov::create(&frozen, &top).unwrap();
    let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
    assert_eq!(read(&mut d, MIB, 8192), vec![0x11; 8192]);
    assert_eq!(read(&mut d, 6 * MIB, 512), vec![0x22; 512]);
    assert_eq!(read(&mut d, 2 * MIB, 65536), base_bytes(2 * MIB, 65536));
    write_at(&mut d, MIB + 4096, &[0x33; 512]);
    write_at(&mut d, 7 * MIB, &[0x44; 4096]);
    d.flush().unwrap();
    let mut want = vec![0x11u8; 8192];
    want[4096..4608].fill(0x33);
    assert_eq!(read(&mut d, MIB, 8192), want);
    assert_eq!(read(&mut d, 7 * MIB, 4096), vec![0x44; 4096]);
    drop(d);

    assert_eq!(checksum(&base), base_sum);
    assert_eq!(checksum(&frozen), frozen_sum);
    assert_eq!(mtime(&frozen), frozen_mtime);
    let mut f = Qcow2Disk::open(&frozen, true, &tmp_policy()).unwrap();
    assert_eq!(read(&mut f, MIB, 8192), vec![0x11; 8192]);
    assert_eq!(read(&mut f, 7 * MIB, 4096), base_bytes(7 * MIB, 4096));
    qemu_check(&top);
    qemu_check(&frozen);
}

#[test]
fn backing_layers_are_opened_read_only() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let _d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
    // Our process holds the base: every fd for it must be O_RDONLY.
    let mut seen = 0;
    for fd in std::fs::read_dir("/proc/self/fd").unwrap() {
        let fd = fd.unwrap();
        if std::fs::read_link(fd.path()).ok().as_deref() != Some(base.as_path()) {
            continue;
        }
        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.file_name().to_str().unwrap()));
        let Ok(fdinfo) = fdinfo else { continue };
        let flags = fdinfo.lines().find_map(|l| l.strip_prefix("flags:")).unwrap().trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_eq!(flags & libc::O_ACCMODE as u32, libc::O_RDONLY as u32);
        seen += 1;
    }
    assert!(seen >= 1);
}

#[test]
fn read_only_overlay_refuses_writes() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let sum = checksum(&top);
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert!(d.read_only());
    let mem = guest_memory(4096);
    let e = d.write_vectored(0, &slices(&mem, &[(0, 512)])).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
    d.flush().unwrap();
    drop(d);
    assert_eq!(checksum(&top), sum);
}

#[test]
fn missing_backing_file_is_a_clear_error() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    std::fs::remove_file(&base).unwrap();
    let e = Qcow2Disk::open(&top, false, &tmp_policy()).err().unwrap();
    assert!(matches!(e, DiskError::MissingBacking { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("top.qcow2") && msg.contains("base.raw") && msg.contains("No such file"),
        "{msg}"
    );
}

#[test]
fn resized_backing_file_is_a_clear_error() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 2 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    std::fs::OpenOptions::new().write(true).open(&base).unwrap().set_len(3 * MIB).unwrap();
    let msg = Qcow2Disk::open(&top, false, &tmp_policy()).err().unwrap().to_string();
    assert!(
        msg.contains("virtual size of 2097152") && msg.contains("3145728") && msg.contains("base.raw"),
        "{msg}"
    );
}

#[test]
fn a_disk_larger_than_its_image_reads_zeros_past_the_image_and_keeps_what_is_written_there() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 2 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create_sized(&base, &top, 6 * MIB).unwrap();
    let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
    assert_eq!(d.size(), 6 * MIB);
    // One read across the image's end: the image, then zeros.
    let mut expect = base_bytes(0, 2 * MIB as usize);
    expect.resize(4 * MIB as usize, 0);
    assert_eq!(read(&mut d, 0, 4 * MIB as usize), expect);
    // A partial-cluster write across the end copies the image's part of the cluster and
    // zeros for the rest.
    let a = vec![0x5au8; 8192];
    write_at(&mut d, 2 * MIB - 4096, &a);
    write_at(&mut d, 6 * MIB - 4096, &a[..4096]);
    d.flush().unwrap();
    drop(d);

    // A layer on top (what a snapshot or fork adds) has the larger size and sees the same.
    let child = dir.as_path().join("child.qcow2");
    ov::create(&top, &child).unwrap();
    let mut d = Qcow2Disk::open(&child, true, &tmp_policy()).unwrap();
    assert_eq!(d.size(), 6 * MIB);
    expect.resize(6 * MIB as usize, 0);
    expect[(2 * MIB - 4096) as usize..][..8192].copy_from_slice(&a);
    expect[(6 * MIB - 4096) as usize..].copy_from_slice(&a[..4096]);
    assert_eq!(read(&mut d, 0, 6 * MIB as usize), expect);
    qemu_check(&top);

    let small = dir.as_path().join("small.qcow2");
    let msg = ov::create_sized(&base, &small, MIB).unwrap_err().to_string();
    assert!(msg.contains("never smaller than its image") && msg.contains("2097152"), "{msg}");
    assert!(!small.exists());
    let odd = ov::create_sized(&base, &small, 4 * MIB + 100).unwrap_err().to_string();
    assert!(odd.contains("not a multiple of 512"), "{odd}");
}

#[test]
fn a_backing_file_is_opened_in_its_recorded_format_whatever_its_content() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", MIB);
    let mid = dir.as_path().join("mid.qcow2");
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &mid).unwrap();
    ov::create(&mid, &top).unwrap();
    // Replace the qcow2 middle layer by a raw file of the same size.
    std::fs::remove_file(&mid).unwrap();
    std::fs::copy(&base, &mid).unwrap();
    let msg = Qcow2Disk::open(&top, true, &tmp_policy()).err().unwrap().to_string();
    assert!(msg.contains("mid.qcow2") && msg.contains("no qcow2 magic"), "{msg}");

    // A layer recorded as raw is read as raw, even when its content is a qcow2 image.
    let other = dir.as_path().join("other.qcow2");
    ov::create(&base, &other).unwrap();
    let raw_len = std::fs::metadata(&other).unwrap().len().next_multiple_of(MIB);
    std::fs::OpenOptions::new().write(true).open(&other).unwrap().set_len(raw_len).unwrap();
    let as_raw = dir.as_path().join("as-raw.raw");
    std::fs::hard_link(&other, &as_raw).unwrap();
    let over = dir.as_path().join("over.qcow2");
    ov::create(&as_raw, &over).unwrap();
    let mut d = Qcow2Disk::open(&over, true, &tmp_policy()).unwrap();
    assert_eq!(d.size(), raw_len);
    assert_eq!(read(&mut d, 0, 4), crate::QCOW2_MAGIC);
}

#[test]
fn truncated_overlay_is_a_clear_error() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 4 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    // The first clusters handed out follow the metadata, which is all a new overlay holds.
    let data = std::fs::metadata(&top).unwrap().len();
    {
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        write_at(&mut d, 0, &vec![0x5a; 1 << 20]);
        d.flush().unwrap();
    }
    for cut in [data + MIB - 4096, data + 4096, data / 2, 60] {
        std::fs::OpenOptions::new().write(true).open(&top).unwrap().set_len(cut).unwrap();
        let e = Qcow2Disk::open(&top, true, &tmp_policy()).err().unwrap();
        assert!(matches!(e, DiskError::Truncated { .. }), "cut at {cut}: {e}");
        let msg = e.to_string();
        assert!(msg.contains("top.qcow2") && msg.contains("truncated"), "{msg}");
    }
}

#[test]
fn not_a_qcow2_file() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", MIB);
    let msg = Qcow2Disk::open(&base, true, &tmp_policy()).err().unwrap().to_string();
    assert!(msg.contains("base.raw") && msg.contains("magic"), "{msg}");
}

#[test]
fn overlays_made_by_qemu_img_get_their_l2_tables_on_a_writable_open() {
    let dir = tmpdir();
    let base = make_base_with(dir.as_path(), "base.raw", 1200 * MIB, MIB);
    let top = dir.as_path().join("top.qcow2");
    let Some(out) = qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "-b",
        base.to_str().unwrap(),
        top.to_str().unwrap(),
    ]) else {
        return;
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(l1_table(&top).iter().all(|e| *e == 0));
    {
        let mut d = Qcow2Disk::open(&top, false, &tmp_policy()).unwrap();
        write_at(&mut d, 700 * MIB, &[9; 4096]);
        d.flush().unwrap();
    }
    let l1 = l1_table(&top);
    assert_eq!(l1.len(), 3);
    assert!(l1.iter().all(|e| e & L1_OFFSET_MASK != 0), "{l1:x?}");
    qemu_check(&top);
    let mut d = Qcow2Disk::open(&top, true, &tmp_policy()).unwrap();
    assert_eq!(read(&mut d, 700 * MIB, 4096), vec![9; 4096]);
    assert_eq!(read(&mut d, 700 * MIB + 4096, 4096), vec![0; 4096]);
    assert_eq!(read(&mut d, 4096, 4096), base_bytes(4096, 4096));
    let mut buf = [0u8; 8];
    File::open(&top).unwrap().read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4], b"QFI\xfb");
}
