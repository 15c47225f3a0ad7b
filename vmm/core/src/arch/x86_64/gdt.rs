//! The flat GDT a 64-bit Linux entry needs, and the KVM segment descriptions matching it.

use kvm_bindings::kvm_segment;

/// Null, 64-bit code, data and TSS descriptors, in the order the selectors below assume.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_SELECTOR: u16 = 1;
pub const DATA_SELECTOR: u16 = 2;
pub const TSS_SELECTOR: u16 = 3;

/// Packs flags, base and limit into a segment descriptor (Intel SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Unpacks a descriptor of `BOOT_GDT` into the form KVM_SET_SREGS takes.
pub fn kvm_segment_from_gdt(entry: u64, table_index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 { (limit_raw << 12) | 0xfff } else { limit_raw };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: table_index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 1 { 0 } else { 1 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_ring0() {
        let cs = kvm_segment_from_gdt(BOOT_GDT[CODE_SELECTOR as usize], CODE_SELECTOR);
        assert_eq!(cs.selector, 8);
        assert_eq!((cs.l, cs.db, cs.present, cs.dpl, cs.s), (1, 0, 1, 0, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.base, 0);
    }

    #[test]
    fn data_and_tss_segments() {
        let ds = kvm_segment_from_gdt(BOOT_GDT[DATA_SELECTOR as usize], DATA_SELECTOR);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l, ds.s), (16, 3, 1, 0, 1));
        let tss = kvm_segment_from_gdt(BOOT_GDT[TSS_SELECTOR as usize], TSS_SELECTOR);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.present), (24, 0xb, 0, 1));
        let null = kvm_segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_matches_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }
}
