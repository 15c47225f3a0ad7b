//! The Intel MultiProcessor Specification 1.4 table: without ACPI it is how the guest learns
//! how many CPUs it has, their APIC IDs, the IOAPIC and how ISA interrupts are wired to it.

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

/// The table sits in the BIOS area, which the kernel scans for the floating pointer and which
/// the e820 map leaves out of RAM. 64 KiB leaves room for every APIC ID an xAPIC can address.
pub const MPTABLE_START: u64 = 0xf_0000;
const MPTABLE_ROOM: usize = 0x1_0000;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 stepping, as a generic "modern x86" processor signature.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURE_FPU: u32 = 1;
const CPU_FEATURE_APIC: u32 = 1 << 9;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINTR: u8 = 3;
const ENTRY_LOCALINTR: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("an MP table cannot describe {0} vCPUs (at most 254: xAPIC IDs are 8 bits and one goes to the IOAPIC)")]
    TooManyCpus(u8),
    #[error("an MP table needs at least one vCPU")]
    NoCpus,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer and configuration table for `num_cpus` vCPUs whose APIC IDs are
/// 0..num_cpus; the result is to be written at [`MPTABLE_START`].
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if num_cpus > 254 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_FPU | CPU_FEATURE_APIC).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IOINTR, INT_TYPE_INT, 0, 0, ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LOCALINTR, INT_TYPE_EXTINT, 0, 0, ISA_BUS_ID, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LOCALINTR, INT_TYPE_NMI, 0, 0, ISA_BUS_ID, 0, ALL_LAPICS, 1]);
    count += 2;

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_addr = MPTABLE_START as u32 + FLOATING_LEN as u32;
    let table_len = HEADER_LEN + entries.len();

    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"EMBER   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes()); // no extended table
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut table = Vec::with_capacity(FLOATING_LEN + table_len);
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&table_addr.to_le_bytes());
    table.push(1); // length in 16-byte units
    table.push(4);
    table.push(0); // checksum, filled below
    table.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    table[10] = checksum(&table);
    table.extend_from_slice(&header);
    assert!(table.len() <= MPTABLE_ROOM);
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses the table the way Linux's mpparse does and returns (APIC ID, BSP) per processor.
    fn processors(t: &[u8]) -> Vec<(u8, bool)> {
        assert_eq!(&t[0..4], b"_MP_");
        let phys = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        let off = (phys - MPTABLE_START) as usize;
        let hdr = &t[off..];
        assert_eq!(&hdr[0..4], b"PCMP");
        let len = u16::from_le_bytes(hdr[4..6].try_into().unwrap()) as usize;
        assert_eq!(sum(&hdr[..len]), 0, "config table checksum");
        let count = u16::from_le_bytes(hdr[34..36].try_into().unwrap());
        let mut cpus = vec![];
        let mut p = 44;
        for _ in 0..count {
            let size = match hdr[p] {
                ENTRY_PROCESSOR => {
                    cpus.push((hdr[p + 1], hdr[p + 3] & CPU_BOOTPROCESSOR != 0));
                    20
                }
                1..=4 => 8,
                other => panic!("unknown entry type {other}"),
            };
            p += size;
        }
        assert_eq!(p, len, "entries fill the table exactly");
        cpus
    }

    #[test]
    fn checksums_and_processor_entries() {
        for n in [1u8, 2, 7, 254] {
            let t = build(n).unwrap();
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let cpus = processors(&t);
            assert_eq!(cpus.len(), n as usize);
            for (i, (id, bsp)) in cpus.iter().enumerate() {
                assert_eq!(*id as usize, i);
                assert_eq!(*bsp, i == 0);
            }
        }
    }

    #[test]
    fn rejects_impossible_cpu_counts() {
        assert_eq!(build(0), Err(MpTableError::NoCpus));
        assert_eq!(build(255), Err(MpTableError::TooManyCpus(255)));
    }
}
