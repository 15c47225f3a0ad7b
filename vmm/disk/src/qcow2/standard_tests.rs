//! Standard qcow2 layers (no subclusters: qemu-img's default, and ember's overlays from before
//! subclusters) made and written by QEMU, then read and written by ember: every kind of
//! cluster QEMU leaves (allocated, zero with and without a host cluster, compressed), cluster
//! sizes from 4 KiB to 2 MiB, version 2 images, and the features ember refuses by name.

use super::super::test_util::*;
use super::super::DiskError;
use std::os::unix::fs::FileExt;
use std::path::Path;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Runs qemu-img with ARGS and checks that it succeeded; false when it is not installed.
fn qemu_img_ok(args: &[&str]) -> bool {
    let Some(out) = qemu_img(args) else { return false };
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    true
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// An overlay of BASE made by `qemu-img create -f qcow2 -b BASE -F raw` with OPTIONS.
fn qemu_overlay(base: &Path, top: &Path, options: &str) -> bool {
    qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", options, "-F", "raw", "-b", s(base), s(top)])
}

#[test]
fn standard_overlays_written_by_qemu_are_read_and_written_by_ember() {
    for (cluster, compat) in [(512, "1.1"), (4 * KIB, "1.1"), (64 * KIB, "1.1"), (64 * KIB, "0.10"), (2048 * KIB, "1.1")] {
        let dir = tmpdir();
        let (size, patterned) = (48 * MIB, 8 * MIB);
        let base = make_base_with(dir.as_path(), "base.raw", size, patterned);
        let top = dir.as_path().join("top.qcow2");
        if !qemu_overlay(&base, &top, &format!("cluster_size={cluster},compat={compat}")) {
            return;
        }
        let case = format!("{cluster}-byte clusters, compat {compat}");
        // Partial clusters (QEMU copies the rest from the base), a run of clusters, zero writes
        // over nothing (zero clusters) and over data (zero clusters keeping their host cluster),
        // a discard to zeros, the last sector, and a far L2 range.
        let mut ops = vec![(1024, 0x61, 3072), (3 * MIB - 4096, 0x62, 200 * KIB), (5 * MIB, 0, 128 * KIB)];
        ops.extend([(6 * MIB, 0x63, 64 * KIB), (6 * MIB, 0, 64 * KIB), (size - 512, 0x65, 512)]);
        ops.push((40 * MIB + 512, 0x66, 1024));
        let mut cmds: Vec<String> = ops
            .iter()
            .map(|&(at, byte, len)| match byte {
                0 => format!("write -z {at} {len}"),
                _ => format!("write -P {byte:#x} {at} {len}"),
            })
            .collect();
        if compat != "0.10" {
            ops.extend([(7 * MIB, 0x64, 64 * KIB), (7 * MIB, 0, 64 * KIB)]);
            cmds.extend([format!("write -P 0x64 {} 65536", 7 * MIB), format!("write -z -u {} 65536", 7 * MIB)]);
        }
        if !qemu_io(&top, &cmds.iter().map(String::as_str).collect::<Vec<_>>()) {
            return;
        }
        let expect = model(&ops, patterned, 0, size);
        assert!(qemu_content(&top).unwrap() == expect, "{case}: qemu-img sees other content than the model");
        let mut d = open(&top, true).unwrap();
        assert!(read_at(d.as_mut(), 0, size as usize) == expect, "{case}: ember reads other content");
        drop(d);

        // ember writes into every kind of cluster QEMU left, and into new ones.
        let mut d = open(&top, false).unwrap();
        let mine = [
            (1536, 0x71, 512),
            (5 * MIB + 4096, 0x72, 4096),
            (6 * MIB + 512, 0x73, 1024),
            (7 * MIB + 1024, 0x74, 2048),
            (2 * MIB + 512, 0x75, 4096),
            (20 * MIB + 51200, 0x76, 70_000 & !511),
            (size - 4096, 0x77, 1024),
        ];
        for (at, byte, len) in mine {
            write_at(d.as_mut(), at, &vec![byte; len as usize]);
            ops.push((at, byte, len));
        }
        d.flush().unwrap();
        drop(d);
        let expect = model(&ops, patterned, 0, size);
        qemu_check(&top);
        assert!(qemu_content(&top).unwrap() == expect, "{case}: qemu-img sees other content after ember's writes");
        let mut d = open(&top, true).unwrap();
        assert!(read_at(d.as_mut(), 0, size as usize) == expect, "{case}: ember reads other content after its writes");
        let layers = ov::info(&top).unwrap();
        assert!(!layers[0].subclusters && layers[0].cluster_size == Some(cluster), "{case}: {layers:?}");
    }
}

#[test]
fn compressed_clusters_are_read_but_not_written() {
    let dir = tmpdir();
    let size = 16 * MIB;
    // Text-like data, which deflate shrinks (the patterned bases barely shrink).
    let want: Vec<u8> = (0..size / 64).flat_map(|i| format!("{:>63}\n", i * 7 % 1000).into_bytes()).collect();
    let base = dir.as_path().join("base.raw");
    std::fs::write(&base, &want).unwrap();
    for cluster in [4 * KIB, 64 * KIB, 2048 * KIB] {
        let comp = dir.as_path().join(format!("comp-{cluster}.qcow2"));
        let o = format!("cluster_size={cluster}");
        if !qemu_img_ok(&["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", &o, s(&base), s(&comp)]) {
            return;
        }
        let check = String::from_utf8(qemu_img(&["check", s(&comp)]).unwrap().stdout).unwrap();
        assert!(check.contains("100.00% compressed clusters"), "{check}");
        let mut d = open(&comp, true).unwrap();
        assert!(read_at(d.as_mut(), 0, size as usize) == want, "{cluster}-byte clusters");
        // Pieces of clusters, and runs across them.
        for (at, len) in [(cluster - 1024, 8192), (3 * cluster + 512, 512), (5 * MIB + 4096, 300 * KIB as usize)] {
            assert!(read_at(d.as_mut(), at, len) == want[at as usize..][..len], "{cluster}: {len} at {at}");
        }
        drop(d);
        let flat = dir.as_path().join(format!("flat-{cluster}.raw"));
        ov::flatten(&comp, &flat).unwrap();
        assert!(std::fs::read(&flat).unwrap() == want);
        let msg = open(&comp, false).err().unwrap().to_string();
        assert!(msg.contains(s(&comp)) && msg.contains("compressed clusters"), "{msg}");
    }

    // A compressed write into an overlay: over the base, and the backing shows around it.
    let top = dir.as_path().join("top.qcow2");
    if !qemu_overlay(&base, &top, "cluster_size=65536") || !qemu_io(&top, &[&format!("write -c -P 0x5c {MIB} 65536")]) {
        return;
    }
    let mut d = open(&top, true).unwrap();
    let mut expect = want.clone();
    expect[MIB as usize..][..65536].fill(0x5c);
    assert!(read_at(d.as_mut(), 0, size as usize) == expect);
}

#[test]
fn features_ember_does_not_implement_are_refused_by_name() {
    let dir = tmpdir();
    let d = dir.as_path();
    let base = make_base(d, "base.raw", 4 * MIB);
    let refused = |path: &Path, writable: bool, what: &str| {
        let e = open(path, !writable).err().unwrap_or_else(|| panic!("{} opened", path.display()));
        let msg = e.to_string();
        assert!(matches!(e, DiskError::Qcow2 { .. }) && msg.contains(s(path)) && msg.contains(what), "{msg}");
    };

    // zstd-compressed clusters; a zstd image without any is fine.
    let zstd = d.join("zstd.qcow2");
    let o = "compression_type=zstd";
    if !qemu_img_ok(&["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", "-o", o, s(&base), s(&zstd)]) {
        return;
    }
    refused(&zstd, false, "zstd-compressed clusters are not supported");
    let zstd_empty = d.join("zstd-empty.qcow2");
    assert!(qemu_overlay(&base, &zstd_empty, o));
    let mut disk = open(&zstd_empty, false).unwrap();
    write_at(disk.as_mut(), 0, &[1; 512]);
    disk.flush().unwrap();

    // An external data file.
    let ext = d.join("ext.qcow2");
    let o = format!("data_file={}", s(&d.join("ext.data")));
    assert!(qemu_img_ok(&["create", "-q", "-f", "qcow2", "-o", &o, s(&ext), "4M"]));
    refused(&ext, false, "external data file");

    // Encryption (LUKS, as the header's method field says: qemu-img's own LUKS setup times
    // its key derivation, which fails on a busy machine).
    let enc = d.join("enc.qcow2");
    assert!(qemu_overlay(&base, &enc, "cluster_size=65536"));
    std::fs::OpenOptions::new().write(true).open(&enc).unwrap().write_all_at(&2u32.to_be_bytes(), 32).unwrap();
    refused(&enc, false, "encrypted");

    // Refcounts of 64 bits, internal snapshots: read, but not written.
    let wide = d.join("wide.qcow2");
    assert!(qemu_overlay(&base, &wide, "refcount_bits=64"));
    assert!(open(&wide, true).is_ok());
    refused(&wide, true, "refcounts of 64 bits");
    let snap = d.join("snap.qcow2");
    assert!(qemu_overlay(&base, &snap, "cluster_size=65536"));
    assert!(qemu_io(&snap, &["write -P 0x11 0 4096"]));
    assert!(qemu_img_ok(&["snapshot", "-c", "one", s(&snap)]));
    assert!(qemu_io(&snap, &["write -P 0x22 0 4096"]));
    let mut disk = open(&snap, true).unwrap();
    assert_eq!(read_at(disk.as_mut(), 0, 4096), vec![0x22; 4096]);
    drop(disk);
    refused(&snap, true, "internal snapshots");
}
