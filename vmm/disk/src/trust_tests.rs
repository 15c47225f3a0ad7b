//! What a file may make ember open: a raw disk stays raw whatever its first bytes say, a
//! backing file must be named with its format and lie in an allowed directory, and only
//! regular files are disks (a FIFO neither hangs an open nor is read).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use super::test_util::{open, *};
use super::{overlay, BackingPolicy, DiskError, Format};

const MIB: u64 = 1 << 20;

/// A qcow2 header (its whole first cluster) that names TARGET as a raw backing file.
fn planted_header(dir: &Path, target: &Path) -> Vec<u8> {
    let evil = dir.join("evil.qcow2");
    ov::create(target, &evil).unwrap();
    let mut bytes = std::fs::read(&evil).unwrap();
    bytes.truncate(64 << 10);
    std::fs::remove_file(&evil).unwrap();
    bytes
}

/// Whether this process has the file at PATH open.
fn holds_open(path: &Path) -> bool {
    let target = path.canonicalize().unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
}

fn mkfifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "{}", std::io::Error::last_os_error());
}

/// F run on another thread: its result, or a panic if it takes more than 10 s (a hang).
fn within_deadline<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} hung"))
}

#[test]
fn a_raw_disk_with_a_planted_qcow2_header_stays_raw() {
    let dir = tmpdir();
    let secret = make_base(dir.as_path(), "secret.raw", 4 * MIB);
    let header = planted_header(dir.as_path(), &secret);
    // The guest's disk: its first bytes are what the guest wrote there, a qcow2 header.
    let disk = make_base(dir.as_path(), "disk.raw", 8 * MIB);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &header, 0))
        .unwrap();

    let mut d = super::open(&disk, Format::Raw, false, &tmp_policy()).unwrap();
    assert_eq!(d.size(), 8 * MIB, "the disk is the raw file, not the planted header's virtual size");
    assert_eq!(read_at(d.as_mut(), 0, header.len()), header);
    assert!(!holds_open(&secret), "the file the planted header names was opened");
    drop(d);
    let layers = ov::info(&disk).unwrap();
    assert_eq!(layers.len(), 1);
    assert_eq!(layers[0].format, Format::Raw);
    assert!(layers[0].backing.is_none());
}

#[test]
fn a_flattened_image_with_a_planted_header_stays_raw() {
    let dir = tmpdir();
    let secret = make_base(dir.as_path(), "secret.raw", 4 * MIB);
    let header = planted_header(dir.as_path(), &secret);
    let base = make_base(dir.as_path(), "base.raw", 8 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    {
        let mut d = open(&top, false).unwrap();
        write_at(d.as_mut(), 0, &header);
        d.flush().unwrap();
    }
    let flat = dir.as_path().join("flat.raw");
    ov::flatten(&top, &flat).unwrap();

    // Every way ember reopens it: as a disk, in `disk info`, as the base of a new overlay.
    let mut d = open(&flat, false).unwrap();
    assert_eq!(d.size(), 8 * MIB);
    assert_eq!(read_at(d.as_mut(), 0, header.len()), header);
    assert!(!holds_open(&secret));
    drop(d);
    let layers = ov::info(&flat).unwrap();
    assert_eq!((layers.len(), layers[0].format), (1, Format::Raw));
    let over = dir.as_path().join("over.qcow2");
    ov::create(&flat, &over).unwrap();
    let layers = ov::info(&over).unwrap();
    assert_eq!(layers.iter().map(|l| l.format).collect::<Vec<_>>(), [Format::Qcow2, Format::Raw]);
    assert_eq!(layers[1].path, flat.canonicalize().unwrap());
    let mut d = open(&over, true).unwrap();
    assert_eq!(read_at(d.as_mut(), 0, header.len()), header);
}

/// DIR/NAME as a new directory.
fn subdir(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir(&d).unwrap();
    d
}

#[test]
fn a_backing_file_outside_the_allowed_directories_is_refused() {
    let dir = tmpdir();
    let allowed = subdir(dir.as_path(), "allowed");
    // A sibling whose name starts with the allowed one's: not under it.
    let outside = subdir(dir.as_path(), "allowed-not");
    let base = make_base(&outside, "base.raw", 4 * MIB);
    let top = allowed.join("top.qcow2");
    ov::create(&base, &top).unwrap();
    let policy = BackingPolicy::new([&allowed]).unwrap();
    let refused = |top: &Path, policy: &BackingPolicy| {
        let e = super::open(top, Format::Qcow2, false, policy).err().expect("opened");
        let msg = e.to_string();
        (e, msg)
    };
    let (e, msg) = refused(&top, &policy);
    assert!(matches!(e, DiskError::BackingNotAllowed { .. }), "{e}");
    assert!(msg.contains(base.to_str().unwrap()) && msg.contains(allowed.canonicalize().unwrap().to_str().unwrap()), "{msg}");
    assert!(!holds_open(&base));
    // The same refusals for `disk info`, and for an overlay made on it.
    let e = overlay::info(&top, Format::Qcow2, &policy).unwrap_err();
    assert!(matches!(e, DiskError::BackingNotAllowed { .. }), "{e}");
    let base_of = overlay::Base { path: &top, format: Format::Qcow2, policy: &policy };
    let e = overlay::create(base_of, &allowed.join("over.qcow2")).unwrap_err();
    assert!(matches!(e, DiskError::BackingNotAllowed { .. }), "{e}");

    // No allowed directory at all: the error says how to allow one.
    let (e, msg) = refused(&top, &BackingPolicy::default());
    assert!(matches!(e, DiskError::NoBackingDirs { .. }) && msg.contains("--disk-dir"), "{msg}");

    // A symlink inside the allowed directory does not lead out of it.
    let link = allowed.join("link.raw");
    std::os::unix::fs::symlink(&base, &link).unwrap();
    let via_link = allowed.join("via-link.qcow2");
    ov::create(&link, &via_link).unwrap();
    let (e, _) = refused(&via_link, &policy);
    assert!(matches!(e, DiskError::BackingNotAllowed { .. }), "{e}");

    // Allowed, it opens.
    let both = BackingPolicy::new([&allowed, &outside]).unwrap();
    assert!(super::open(&top, Format::Qcow2, false, &both).is_ok());
    assert!(BackingPolicy::new([dir.as_path().join("missing")]).unwrap_err().to_string().contains("missing"));
}

#[test]
fn a_backing_file_without_a_recorded_format_is_refused() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 4 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    // ember's header ends at 104, where its backing-format extension starts: make that the
    // end of the extensions, as in an image made with `qemu-img create -b` and no -F.
    let f = std::fs::OpenOptions::new().write(true).open(&top).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0; 4], 104).unwrap();
    let e = open(&top, false).err().expect("opened");
    let msg = e.to_string();
    assert!(matches!(e, DiskError::NoBackingFormat { .. }), "{e}");
    assert!(msg.contains("top.qcow2") && msg.contains("base.raw") && msg.contains("qemu-img rebase -u -F"), "{msg}");
    assert!(!holds_open(&base));

    // qemu-img's own image without -F, when qemu-img is here.
    let plain = dir.as_path().join("plain.qcow2");
    let args = ["create", "-q", "-f", "qcow2", "-b", base.to_str().unwrap(), plain.to_str().unwrap()];
    if qemu_img(&args).is_some_and(|o| o.status.success()) {
        assert!(matches!(open(&plain, false), Err(DiskError::NoBackingFormat { .. })));
    }
}

#[test]
fn a_fifo_is_refused_as_a_drive_or_a_backing_file_without_hanging() {
    let dir = tmpdir();
    let fifo = dir.as_path().join("fifo.raw");
    mkfifo(&fifo);
    for read_only in [true, false] {
        let path = fifo.clone();
        let e = within_deadline("opening a FIFO", move || open(&path, read_only).err().map(|e| e.to_string()));
        let msg = e.expect("a FIFO opened as a disk");
        assert!(msg.contains("fifo.raw") && msg.contains("a FIFO, not a regular file"), "{msg}");
    }

    let base = make_base(dir.as_path(), "base.raw", 4 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    std::fs::remove_file(&base).unwrap();
    mkfifo(&base);
    let e = within_deadline("opening an overlay over a FIFO", move || open(&top, false).err().map(|e| e.to_string()));
    let msg = e.expect("an overlay over a FIFO opened");
    assert!(msg.contains("base.raw") && msg.contains("not a regular file"), "{msg}");

    let d = dir.as_path().join("dir.raw");
    std::fs::create_dir(&d).unwrap();
    assert!(matches!(open(&d, true), Err(DiskError::NotRegular { .. })));
}

#[test]
fn a_huge_l1_table_fails_disk_info_at_once() {
    let dir = tmpdir();
    let base = make_base(dir.as_path(), "base.raw", 4 * MIB);
    let top = dir.as_path().join("top.qcow2");
    ov::create(&base, &top).unwrap();
    // The review's file: a small overlay whose header claims 2^32-1 L1 entries (32 GiB).
    let f = std::fs::OpenOptions::new().write(true).open(&top).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &u32::MAX.to_be_bytes(), 36).unwrap();
    drop(f);
    assert!(std::fs::metadata(&top).unwrap().len() < 1 << 20);
    let started = std::time::Instant::now();
    let (result, allocated) = allocated_by(|| ov::info(&top));
    let msg = result.unwrap_err().to_string();
    assert!(msg.contains("its L1 table has 4294967295 entries; qcow2 allows"), "{msg}");
    assert!(allocated < 1 << 20, "refusing it allocated {allocated} bytes");
    assert!(started.elapsed() < Duration::from_secs(2), "refusing it took {:?}", started.elapsed());
}
