//! Identity page tables for the 64-bit entry: the first 1 GiB mapped with 2 MiB pages, which
//! covers the kernel, the zero page and the command line until the kernel builds its own.

use super::layout::{PDPT_ADDR, PD_ADDR, PML4_ADDR};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE_PAGE: u64 = 1 << 7;
const ENTRIES: usize = 512;

/// The three tables, as (guest address, 512 entries) pairs ready to be written to guest memory.
pub fn identity_tables() -> [(u64, [u64; ENTRIES]); 3] {
    let mut pml4 = [0u64; ENTRIES];
    pml4[0] = PDPT_ADDR | PRESENT | WRITABLE;
    let mut pdpt = [0u64; ENTRIES];
    pdpt[0] = PD_ADDR | PRESENT | WRITABLE;
    let mut pd = [0u64; ENTRIES];
    for (i, entry) in pd.iter_mut().enumerate() {
        *entry = ((i as u64) << 21) | PRESENT | WRITABLE | HUGE_PAGE;
    }
    [(PML4_ADDR, pml4), (PDPT_ADDR, pdpt), (PD_ADDR, pd)]
}

/// Walks the tables the way the MMU would, for tests: returns the physical address of `virt`.
#[cfg(test)]
fn translate(tables: &[(u64, [u64; ENTRIES]); 3], virt: u64) -> Option<u64> {
    let table_at = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, t)| t);
    let pml4e = table_at(PML4_ADDR)?[((virt >> 39) & 0x1ff) as usize];
    if pml4e & PRESENT == 0 {
        return None;
    }
    let pdpte = table_at(pml4e & !0xfff)?[((virt >> 30) & 0x1ff) as usize];
    if pdpte & PRESENT == 0 {
        return None;
    }
    let pde = table_at(pdpte & !0xfff)?[((virt >> 21) & 0x1ff) as usize];
    if pde & PRESENT == 0 || pde & HUGE_PAGE == 0 {
        return None;
    }
    Some((pde & !0x1f_ffff) | (virt & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_gigabyte_is_identity_mapped() {
        let t = identity_tables();
        for virt in [0u64, 0x7000, 0x100_0000, 0x123_4567, (1 << 30) - 1] {
            assert_eq!(translate(&t, virt), Some(virt), "virt {virt:#x}");
        }
        assert_eq!(translate(&t, 1 << 30), None);
    }
}
