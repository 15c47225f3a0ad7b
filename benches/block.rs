//! Block benchmark, host-side: the virtio-blk device model (request checking and execution,
//! as the device runs it for each chain the guest hands over) against a raw file and against a
//! qcow2 overlay on a raw base. Prints MiB/s, IOPS and the overlay/raw ratio; checks nothing.
//!
//!     cargo bench -p ember-benches --bench block
//!
//! EMBER_DISK_BENCH_DIR picks the directory (default /tmp), EMBER_DISK_BENCH_MIB the disk size
//! (default 1024), EMBER_DISK_BENCH_CLUSTER the overlays' cluster size. Files are in the page
//! cache (hot): what is measured is ember's overhead on top of the kernel's, which is the case
//! for a shared base image.

use std::path::Path;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm::devices::virtio::block::request::{execute, Limits};
use disk::{overlay, BackingPolicy, DiskBackend, DiskError, Format};
use vmm_sys_util::tempdir::TempDir;

/// Cluster size of the overlays under test (EMBER_DISK_BENCH_CLUSTER, default ember's).
fn cluster_size() -> u64 {
    std::env::var("EMBER_DISK_BENCH_CLUSTER")
        .map(|s| s.parse().unwrap())
        .unwrap_or(disk::qcow2::CLUSTER_SIZE)
}

const HEADER: u64 = 0x1000;
const STATUS: u64 = 0x2000;
const DATA: u64 = 0x10_0000;
const LIMITS: Limits = Limits { seg_max: 254, size_max: 1 << 20 };

/// One request through the device model: header, one data buffer, status byte.
fn request(mem: &GuestMemoryMmap, disk: &mut dyn DiskBackend, write: bool, offset: u64, len: u64) {
    let kind = if write { VIRTIO_BLK_T_OUT } else { VIRTIO_BLK_T_IN };
    mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    mem.write_obj(offset / 512, GuestAddress(HEADER + 8)).unwrap();
    let data_flags = if write { 0 } else { VRING_DESC_F_WRITE as u16 };
    let chain = [
        Descriptor::new(HEADER, 16, 0, 0),
        Descriptor::new(DATA, len as u32, data_flags, 0),
        Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0),
    ];
    let done = execute(mem, chain.iter().copied(), disk, b"bench", LIMITS);
    assert_eq!(done.status, Some(VIRTIO_BLK_S_OK as u8));
}

/// Backing files beside the image: every bench keeps a base and its overlays in one directory.
fn beside(path: &Path) -> BackingPolicy {
    BackingPolicy::new([path.parent().unwrap()]).unwrap()
}

/// The format the bench's file names say.
fn format_of(path: &Path) -> Format {
    Format::from_extension(path).unwrap()
}

fn create(base: &Path, top: &Path) {
    let policy = beside(base);
    overlay::create_with_cluster_size(overlay::Base { path: base, format: format_of(base), policy: &policy }, top, cluster_size())
        .unwrap();
}

fn open(path: &Path, read_only: bool) -> Result<Box<dyn DiskBackend>, DiskError> {
    disk::open(path, format_of(path), read_only, &beside(path))
}

const MIB: u64 = 1 << 20;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[derive(Clone, Copy)]
enum Op {
    SeqRead,
    RandRead,
    SeqWrite,
    RandWrite,
}

/// Runs OP over DISK (SIZE bytes) for at most BUDGET; returns MiB/s. Writes are timed into the
/// page cache; the flush after them (device-bound) is not, but its time after the first-touch
/// writes is printed, since an overlay writes its metadata back then.
fn run(disk: &mut dyn DiskBackend, size: u64, op: Op, budget: Duration) -> f64 {
    run_n(disk, size, op, budget, u64::MAX).0
}

/// [`run`], for at most MAX_OPS requests; also returns how long the flush after writes took
/// (an overlay writes its metadata back then).
fn run_n(disk: &mut dyn DiskBackend, size: u64, op: Op, budget: Duration, max_ops: u64) -> (f64, Duration) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * MIB as usize)]).unwrap();
    mem.write_slice(&vec![0xabu8; MIB as usize], GuestAddress(DATA)).unwrap();
    let (len, random) = match op {
        Op::SeqRead | Op::SeqWrite => (MIB, false),
        Op::RandRead | Op::RandWrite => (4096, true),
    };
    let write = matches!(op, Op::SeqWrite | Op::RandWrite);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let blocks = size / len;
    let start = Instant::now();
    let mut done = 0u64;
    let mut i = 0;
    while i < blocks.min(max_ops) && (i % 64 != 0 || start.elapsed() < budget) {
        let off = if random { rng.next() % blocks * len } else { i * len };
        request(&mem, disk, write, off, len);
        done += len;
        i += 1;
    }
    let rate = done as f64 / MIB as f64 / start.elapsed().as_secs_f64();
    let flushed = Instant::now();
    if write {
        disk.flush().unwrap();
    }
    (rate, flushed.elapsed())
}

/// "MiB/s (IOPS)" for a rate measured with OP's request size.
fn show(mib_s: f64, op: Op) -> String {
    let len = match op {
        Op::SeqRead | Op::SeqWrite => MIB,
        Op::RandRead | Op::RandWrite => 4096,
    };
    format!("{mib_s:6.0} MiB/s {:>7.0} IOPS", mib_s * MIB as f64 / len as f64)
}

fn make_data_file(path: &Path, size: u64) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let mut rng = Rng(7);
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        for w in chunk.chunks_mut(8) {
            w.copy_from_slice(&rng.next().to_le_bytes());
        }
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// Best of ROUNDS alternating runs of A and B.
fn best_of(rounds: usize, mut a: impl FnMut() -> f64, mut b: impl FnMut() -> f64) -> (f64, f64) {
    let (mut ba, mut bb) = (0f64, 0f64);
    for _ in 0..rounds {
        ba = ba.max(a());
        bb = bb.max(b());
    }
    (ba, bb)
}

fn raw_vs_overlay() {
    let root = std::env::var("EMBER_DISK_BENCH_DIR").unwrap_or("/tmp".into());
    let size = std::env::var("EMBER_DISK_BENCH_MIB").map(|s| s.parse().unwrap()).unwrap_or(1024) * MIB;
    let dir = TempDir::new_with_prefix(format!("{root}/ember-disk-bench-")).unwrap();
    let d = dir.as_path();
    let base = d.join("base.raw");
    make_data_file(&base, size);
    let budget = Duration::from_secs(1);
    let rounds = 3;
    println!(
        "disk {} MiB in {root}, overlay clusters {} KiB; MiB/s, best of {rounds}, hot page cache",
        size / MIB,
        cluster_size() >> 10
    );

    // Reads: the base itself, an overlay with nothing in it (reads pass through to the base),
    // and an overlay holding all the data itself.
    let empty = d.join("empty.qcow2");
    create(&base, &empty);
    let full = d.join("full.qcow2");
    create(&base, &full);
    run(open(&full, false).unwrap().as_mut(), size, Op::SeqWrite, Duration::from_secs(600));
    for (name, op) in [("1 MiB seq read", Op::SeqRead), ("4 KiB rand read", Op::RandRead)] {
        let mut raw = open(&base, true).unwrap();
        let mut ov = open(&empty, true).unwrap();
        let mut own = open(&full, true).unwrap();
        let (r, o) =
            best_of(rounds, || run(raw.as_mut(), size, op, budget), || run(ov.as_mut(), size, op, budget));
        let (r2, w) =
            best_of(rounds, || run(raw.as_mut(), size, op, budget), || run(own.as_mut(), size, op, budget));
        let r = r.max(r2);
        println!(
            "{name:17} raw {} | overlay, data in base {} = {:.2}x | overlay, data in overlay {} = {:.2}x",
            show(r, op),
            show(o, op),
            o / r,
            show(w, op),
            w / r
        );
    }

    for (name, op) in [("1 MiB seq write", Op::SeqWrite), ("4 KiB rand write", Op::RandWrite)] {
        // First touch: a fresh sparse raw file against a fresh overlay (random writes: one per
        // 4 overlay clusters of 64 KiB, so nearly 90% land in new clusters). Rewrite: the
        // same once every block has been written (by one sequential pass).
        let first_ops = match op {
            Op::RandWrite => size / disk::qcow2::CLUSTER_SIZE / 4,
            _ => u64::MAX,
        };
        let mut n = 0;
        let mut fresh = |overlay_kind: bool| -> (f64, f64, Duration) {
            n += 1;
            let path = d.join(format!("w{n}.{}", if overlay_kind { "qcow2" } else { "raw" }));
            if overlay_kind {
                create(&base, &path);
            } else {
                sparse_file(&path, size);
            }
            let mut disk = open(&path, false).unwrap();
            let (first, flush) = run_n(disk.as_mut(), size, op, budget, first_ops);
            run(disk.as_mut(), size, Op::SeqWrite, Duration::from_secs(600));
            let again = run(disk.as_mut(), size, op, budget);
            drop(disk);
            std::fs::remove_file(&path).unwrap();
            (first, again, flush)
        };
        let mut best = [0f64; 4];
        let mut flushes = [Duration::MAX; 2];
        for _ in 0..rounds {
            let (rf, ra, rflush) = fresh(false);
            let (of, oa, oflush) = fresh(true);
            for (b, v) in best.iter_mut().zip([rf, ra, of, oa]) {
                *b = b.max(v);
            }
            for (f, v) in flushes.iter_mut().zip([rflush, oflush]) {
                *f = (*f).min(v);
            }
        }
        let [rf, ra, of, oa] = best;
        println!(
            "{name:17} first touch: raw {} overlay {} = {:.2}x | rewrite: raw {} overlay {} = {:.2}x \
             | flush after first touch (untimed above): raw {:.1?} overlay {:.1?}",
            show(rf, op),
            show(of, op),
            of / rf,
            show(ra, op),
            show(oa, op),
            oa / ra,
            flushes[0],
            flushes[1]
        );
    }
}

/// Opening an overlay holding 1 GiB of writes (scattered 64 KiB writes) on a 4 GiB base.
fn open_time() {
    let root = std::env::var("EMBER_DISK_BENCH_DIR").unwrap_or("/tmp".into());
    let dir = TempDir::new_with_prefix(format!("{root}/ember-disk-bench-")).unwrap();
    let d = dir.as_path();
    let base = d.join("base.raw");
    // 4 GiB base: 256 MiB of data, the rest a hole (an ext4 image is mostly free space).
    make_data_file(&base, 256 * MIB);
    std::fs::OpenOptions::new().write(true).open(&base).unwrap().set_len(4096 * MIB).unwrap();
    let top = d.join("top.qcow2");
    create(&base, &top);
    {
        let mut disk = open(&top, false).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 65536)]).unwrap();
        let bufs = [mem.get_slice(GuestAddress(0), 65536).unwrap()];
        let mut rng = Rng(99);
        let mut written = std::collections::HashSet::new();
        while written.len() < 16384 {
            let cluster = rng.next() % (4096 * 16);
            if written.insert(cluster) {
                disk.write_vectored(cluster * 65536, &bufs).unwrap();
            }
        }
        disk.flush().unwrap();
    }
    let meta = std::fs::metadata(&top).unwrap();
    println!(
        "overlay: {} MiB file, {} MiB allocated",
        meta.len() / MIB,
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 / MIB
    );
    for (label, ro) in [("read-write", false), ("read-only", true)] {
        let n = 50;
        let mut times: Vec<Duration> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let disk = open(&top, ro).unwrap();
                let e = t.elapsed();
                drop(disk);
                e
            })
            .collect();
        times.sort();
        println!("open {label:10} (hot cache): median {:?}, max {:?}", times[n / 2], times[n - 1]);
    }
    // Cold: only where we may drop the page cache (root).
    let drop_caches = || std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    if drop_caches() {
        let t = Instant::now();
        let disk = open(&top, false).unwrap();
        println!("open read-write (cold cache): {:?}", t.elapsed());
        drop(disk);
    } else {
        println!("(cannot drop the page cache here; no cold-cache figure)");
    }
}

fn main() {
    raw_vs_overlay();
    open_time();
}
