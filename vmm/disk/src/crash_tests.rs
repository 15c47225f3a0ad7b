//! Killing the process in the middle of heavy writes must leave an overlay that opens again,
//! holds every write completed before the last completed flush, and that `qemu-img check`
//! finds free of corruption (leaked clusters are fine).
//!
//! The parent test re-runs this test binary as a child (`crash_child`, selected by an
//! environment variable) that writes through [`super::open`] and guest memory, flushing every
//! few writes and printing `flushed N` after each flush; the parent SIGKILLs it mid-stream and
//! checks the overlay against the deterministic write sequence.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::test_util::*;

const MIB: u64 = 1 << 20;
/// 2 GiB of virtual disk: eight L2 tables of subclusters.
const DISK: u64 = 2048 * MIB;
/// Base data only in the first 8 MiB (keeps the test quick); the rest is a hole.
const PATTERNED: u64 = 8 * MIB;
const SLOT: u64 = 16 << 10;
const WRITES_PER_FLUSH: u64 = 32;
const ENV: &str = "EMBER_DISK_CRASH_CHILD";

/// Write number SEQ of the sequence with SEED: (first slot, number of slots).
fn nth_write(seed: u64, seq: u64) -> (u64, u64) {
    let mut x = seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 29;
    let slots = DISK / SLOT;
    // Half the writes land in the patterned start (copy-on-write of base data), half anywhere.
    let span = if x & 1 == 0 { PATTERNED / SLOT } else { slots };
    let count = 1 + (x >> 8) % 8;
    let first = ((x >> 16) % span).min(slots - count);
    (first, count)
}

/// The 512-byte sector SECTOR of SLOT as write SEQ writes it.
fn sector_of_write(slot: u64, seq: u64, sector: u64) -> [u8; 512] {
    let mut s = [(seq as u8) ^ (sector as u8); 512];
    s[..8].copy_from_slice(b"EMBERCRS");
    s[8..16].copy_from_slice(&slot.to_le_bytes());
    s[16..24].copy_from_slice(&seq.to_le_bytes());
    s[24..32].copy_from_slice(&sector.to_le_bytes());
    s
}

fn write_data(first: u64, count: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((count * SLOT) as usize);
    for slot in first..first + count {
        for sector in 0..SLOT / 512 {
            v.extend_from_slice(&sector_of_write(slot, seq, sector));
        }
    }
    v
}

/// The child: writes forever (until killed), flushing every WRITES_PER_FLUSH writes.
#[test]
#[ignore = "run by crash_during_heavy_writes_leaves_a_consistent_overlay"]
fn crash_child() {
    let Ok(path) = std::env::var(ENV) else { return };
    let seed: u64 = std::env::var("EMBER_DISK_CRASH_SEED").unwrap().parse().unwrap();
    let mut disk = open(Path::new(&path), false).unwrap();
    let mem = guest_memory((8 * SLOT) as usize);
    let mut seq = 0u64;
    loop {
        let (first, count) = nth_write(seed, seq);
        let data = write_data(first, count, seq);
        mem.write_slice(&data, GuestAddress(0)).unwrap();
        // Two segments, as a virtio chain would have.
        let half = data.len() as u64 / 2;
        let bufs = slices(&mem, &[(0, half as usize), (half, data.len() - half as usize)]);
        disk.write_vectored(first * SLOT, &bufs).unwrap();
        seq += 1;
        if seq % WRITES_PER_FLUSH == 0 {
            disk.flush().unwrap();
            println!("flushed {seq}");
        }
    }
}

fn base_bytes_on_disk(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut v = vec![0u8; (PATTERNED + MIB) as usize];
    std::fs::File::open(p).unwrap().read_exact_at(&mut v, 0).unwrap();
    v
}

fn run_round(dir: &Path, base: &Path, round: u64) {
    let top = dir.join(format!("top{round}.qcow2"));
    ov::create(base, &top).unwrap();
    let seed = 0x1234_5678 + round;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["crash_tests::crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ENV, &top)
        .env("EMBER_DISK_CRASH_SEED", seed.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last_flushed = 0u64;
    let wanted = 40 + round * 17;
    let started = Instant::now();
    while let Some(Ok(line)) = lines.next() {
        if let Some(n) = line.strip_prefix("flushed ") {
            last_flushed = n.trim().parse().unwrap();
            if last_flushed / WRITES_PER_FLUSH >= wanted {
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "the child is too slow");
    }
    assert!(last_flushed > 0, "the child never flushed");
    // Kill it mid-stream, at a moment that differs from round to round.
    std::thread::sleep(Duration::from_micros(round * 1700));
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    // Flushes the child completed before it died, including ones we had not read yet.
    for line in lines.map_while(Result::ok) {
        if let Some(n) = line.strip_prefix("flushed ") {
            last_flushed = n.trim().parse().unwrap();
        }
    }

    // Writes numbered below LAST_FLUSHED are durable; later ones may or may not have landed,
    // each sector independently. The child cannot have got past two more flush intervals.
    let horizon = last_flushed + 2 * WRITES_PER_FLUSH;
    let mut durable: std::collections::HashMap<u64, u64> = Default::default();
    let mut later: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    for seq in 0..horizon {
        let (first, count) = nth_write(seed, seq);
        for slot in first..first + count {
            if seq < last_flushed {
                durable.insert(slot, seq);
            } else {
                later.entry(slot).or_default().push(seq);
            }
        }
    }

    let mut disk = open(&top, true).expect("the overlay opens again after SIGKILL");
    let mem = guest_memory(SLOT as usize);
    let mut slots: Vec<u64> = durable.keys().chain(later.keys()).copied().collect();
    slots.sort_unstable();
    slots.dedup();
    // Also the untouched slots sharing a cluster with a touched one (copy-on-write leftovers).
    let per_cluster = super::qcow2::CLUSTER_SIZE / SLOT;
    let mut check: Vec<u64> = slots
        .iter()
        .flat_map(|s| (s / per_cluster * per_cluster)..(s / per_cluster + 1) * per_cluster)
        .collect();
    check.sort_unstable();
    check.dedup();
    let mut buf = vec![0u8; SLOT as usize];
    for slot in check {
        disk.read_vectored(slot * SLOT, &slices(&mem, &[(0, SLOT as usize)])).unwrap();
        mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
        for sector in 0..SLOT / 512 {
            let got = &buf[(sector * 512) as usize..][..512];
            let off = slot * SLOT + sector * 512;
            let old_ok = match durable.get(&slot) {
                Some(seq) => got == sector_of_write(slot, *seq, sector),
                None if off < PATTERNED => got == base_bytes(off, 512).as_slice(),
                None => got.iter().all(|b| *b == 0),
            };
            let new_ok = || {
                later.get(&slot).into_iter().flatten().any(|seq| got == sector_of_write(slot, *seq, sector))
            };
            assert!(
                old_ok || new_ok(),
                "round {round}: sector at {off:#x} (slot {slot}) holds neither its last flushed content (write {:?}) \
                 nor a later write; first bytes {:02x?}",
                durable.get(&slot),
                &got[..32]
            );
        }
    }
    drop(disk);
    qemu_check(&top);
    // And it takes writes again.
    let mut disk = open(&top, false).expect("the overlay opens for writing after SIGKILL");
    mem.write_slice(&[0xc3; SLOT as usize], GuestAddress(0)).unwrap();
    disk.write_vectored(DISK - SLOT, &slices(&mem, &[(0, SLOT as usize)])).unwrap();
    disk.flush().unwrap();
    drop(disk);
    qemu_check(&top);
    eprintln!("round {round}: killed after {last_flushed}+ writes; {} slots verified", slots.len());
}

#[test]
fn crash_during_heavy_writes_leaves_a_consistent_overlay() {
    let dir = tmpdir();
    let base = make_base_with(dir.as_path(), "base.raw", DISK, PATTERNED);
    // The base is 2 GiB of mostly hole: compare its data part, size, blocks and mtime.
    let fingerprint = |p: &Path| {
        let m = std::fs::metadata(p).unwrap();
        (base_bytes_on_disk(p), m.len(), allocated(p), mtime(p))
    };
    let before = fingerprint(&base);
    for round in 0..3 {
        run_round(dir.as_path(), &base, round);
    }
    assert_eq!(fingerprint(&base), before, "the base changed");
}
