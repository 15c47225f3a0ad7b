//! Keeping a restored guest's TSC and kvmclock in step.
//!
//! A guest reads time two ways: kvmclock, and the TSC directly. Linux checks one against the
//! other (its clocksource watchdog, every half second) and, on a disagreement of more than
//! about half a millisecond, marks the TSC unstable for good. That switch costs the guest a
//! stop-the-machine, and each restored or forked sandbox would pay it on its own pages.
//!
//! Restoring the TSC as an MSR value and kvmclock as a clock value, each at its own moment,
//! shifts them by different amounts: whatever time passes between the two reads on the way out
//! (a disk flush lies between them) and the two writes on the way in. Instead, as KVM's
//! documentation describes for migration (devices/vcpu.rst, KVM_VCPU_TSC_OFFSET), the snapshot
//! keeps one KVM_GET_CLOCK reading together with the host TSC at that instant, and each vCPU's
//! TSC offset. On restore, after KVM_SET_CLOCK, each offset is moved so that
//! `offset + host TSC - kvmclock × frequency` is what it was: both clocks then resume from
//! the snapshot together. Hosts without KVM_VCPU_TSC_OFFSET (before Linux 5.16) keep the MSR
//! value alone.
//!
//! The clock value saved is the guest's own: what its kvmclock page (pvclock) makes of its TSC
//! at the reading. Where the host's clocksource is the TSC, that is what KVM_GET_CLOCK says;
//! elsewhere KVM_GET_CLOCK follows the host's clock, and the guest's drifts from it between
//! KVM's updates of the page (by tens of milliseconds under the nested harness), which the
//! restored guest would see as a jump of kvmclock against its TSC.

use kvm_bindings::{kvm_clock_data, kvm_device_attr, KVM_CLOCK_HOST_TSC, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, KVMIO};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use super::vcpu::Vcpu;

ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

/// A bracket of two TSC reads this narrow (~10-30 µs at today's TSC rates) places the reading
/// well within the guest watchdog's half-millisecond tolerance.
const GOOD_BRACKET_TICKS: u64 = 50_000;
/// Readings tried for a narrow bracket before the narrowest is taken.
const BRACKET_TRIES: usize = 16;

/// KVM_GET_CLOCK with the host TSC at the instant of the reading: KVM's own where it tells it
/// (KVM_CLOCK_HOST_TSC, when the host's clocksource is the TSC), else the middle of two reads
/// of the TSC around the call. The call takes microseconds, but a thread preempted inside it
/// (a loaded host: forks restore their children in parallel) brackets it by milliseconds, and
/// half of that would become a skew between the restored guest's TSC and its kvmclock, which
/// its clocksource watchdog reports as an unstable TSC. So the reading is retried until the
/// bracket is narrow, and the narrowest one kept.
pub fn clock_and_host_tsc(vm: &VmFd) -> Result<(kvm_clock_data, u64), kvm_ioctls::Error> {
    let mut best: Option<(kvm_clock_data, u64, u64)> = None;
    let mut first_width = None;
    for _ in 0..BRACKET_TRIES {
        // SAFETY: RDTSC has no memory effects; every x86_64 CPU has it.
        let before = unsafe { core::arch::x86_64::_rdtsc() };
        let clock = vm.get_clock()?;
        // SAFETY: as above.
        let after = unsafe { core::arch::x86_64::_rdtsc() };
        if let Some(host_tsc) = host_tsc_of(&clock) {
            return Ok((clock, host_tsc));
        }
        let width = after.saturating_sub(before);
        first_width.get_or_insert(width);
        if best.as_ref().is_none_or(|&(_, _, w)| width < w) {
            best = Some((clock, before + width / 2, width));
        }
        if width <= GOOD_BRACKET_TICKS {
            break;
        }
    }
    let (clock, host_tsc, width) = best.expect("at least one reading");
    let first = first_width.unwrap_or(width);
    if width > GOOD_BRACKET_TICKS {
        tracing::warn!("KVM_GET_CLOCK bracketed by {width} TSC ticks at best: the guest's TSC may drift from its kvmclock");
    } else if first > GOOD_BRACKET_TICKS {
        tracing::info!("KVM_GET_CLOCK bracketed by {first} TSC ticks, by {width} when read again");
    } else {
        tracing::debug!("KVM_GET_CLOCK bracketed by {width} TSC ticks");
    }
    Ok((clock, host_tsc))
}

/// The guest's kvmclock at guest TSC `guest_tsc`, as the guest computes it from the pvclock
/// structure it gave KVM (MSR_KVM_SYSTEM_TIME_NEW = `system_time_msr`). None where the guest
/// has none enabled, or where it is out of RAM or makes no sense (the guest wrote it last, so
/// nothing in it is trusted).
pub fn guest_kvmclock_ns(ram: &GuestMemoryMmap, system_time_msr: u64, guest_tsc: u64) -> Option<u64> {
    if system_time_msr & 1 == 0 {
        return None;
    }
    let at = system_time_msr & !1;
    // KVM maps it only within one page.
    if at % 4 != 0 || (at & 0xfff) + PVCLOCK_SIZE > 0x1000 {
        return None;
    }
    let mut page = [0u8; PVCLOCK_SIZE as usize];
    ram.read_slice(&mut page, GuestAddress(at)).ok()?;
    let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().expect("8 bytes"));
    let (version, tsc_timestamp, system_time, mul, shift) = (u32_at(0), u64_at(8), u64_at(16), u32_at(24), page[28] as i8);
    // An odd version is an update in progress; a TSC before the stamp, a clock gone backwards.
    if version % 2 == 1 || mul == 0 || !(-32..=32).contains(&shift) || guest_tsc < tsc_timestamp {
        return None;
    }
    let delta = (guest_tsc - tsc_timestamp) as u128;
    // At most 96 bits shifted, times 32 bits of multiplier: within u128.
    let delta = if shift < 0 { delta >> -shift } else { delta << shift };
    let ns = u64::try_from((delta * mul as u128) >> 32).ok()?;
    system_time.checked_add(ns)
}

/// Bytes of `struct pvclock_vcpu_time_info`.
const PVCLOCK_SIZE: u64 = 32;

fn host_tsc_of(clock: &kvm_clock_data) -> Option<u64> {
    (clock.flags & KVM_CLOCK_HOST_TSC != 0).then_some(clock.host_tsc)
}

/// How far each vCPU's TSC offset moves on restore, in host TSC ticks and kvmclock
/// nanoseconds: the host TSC and kvmclock at the snapshot's reading minus those at one reading
/// after KVM_SET_CLOCK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscShift {
    pub host_tsc: i128,
    pub clock_ns: i128,
}

impl TscShift {
    /// From the snapshot's clock reading and one taken after KVM_SET_CLOCK on this host, each
    /// (kvmclock, host TSC).
    pub fn between(saved: (u64, u64), now: (u64, u64)) -> Self {
        Self { clock_ns: saved.0 as i128 - now.0 as i128, host_tsc: saved.1 as i128 - now.1 as i128 }
    }

    /// The offset that keeps `offset + host TSC - kvmclock × khz / 10^6` what it was, for a
    /// guest TSC running at `khz` (the host's own rate: no TSC scaling).
    pub fn moved(&self, saved_offset: u64, khz: u32) -> u64 {
        let ticks_for_clock = self.clock_ns * khz as i128 / 1_000_000;
        (saved_offset as i128 + self.host_tsc - ticks_for_clock) as u64
    }
}

impl Vcpu {
    fn tsc_offset_attr(value: &mut u64) -> kvm_device_attr {
        kvm_device_attr {
            flags: 0,
            group: KVM_VCPU_TSC_CTRL,
            attr: KVM_VCPU_TSC_OFFSET as u64,
            addr: value as *mut u64 as u64,
        }
    }

    /// The vCPU's TSC offset (guest TSC = host TSC + offset); None where KVM cannot tell it.
    pub fn tsc_offset(&self) -> Option<u64> {
        let mut value = 0u64;
        let attr = Self::tsc_offset_attr(&mut value);
        // SAFETY: KVM writes the offset to `value`, which outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DEVICE_ATTR(), &attr) };
        (ret == 0).then_some(value)
    }

    pub fn set_tsc_offset(&self, offset: u64) -> std::io::Result<()> {
        let mut value = offset;
        let attr = Self::tsc_offset_attr(&mut value);
        // SAFETY: KVM reads the offset from `value`, which outlives the call.
        let ret = unsafe { ioctl_with_ref(&self.fd, KVM_SET_DEVICE_ATTR(), &attr) };
        if ret == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_tsc_resumes_where_kvmclock_does() {
        // Saved: kvmclock 5 s, host TSC 1_000_000_000 ticks, offset 50 (guest TSC 1_000_000_050).
        // Restored 10 s of host TSC later at 2 GHz, kvmclock set back to 5 s and read 1 µs on.
        let shift = TscShift::between((5_000_000_000, 1_000_000_000), (5_000_001_000, 21_000_000_000));
        let offset = shift.moved(50, 2_000_000);
        // At the reading, the guest TSC must be the saved one plus the 1 µs kvmclock ran: 2000 ticks.
        assert_eq!(21_000_000_000u64.wrapping_add(offset), 1_000_000_050 + 2_000);
    }

    #[test]
    fn offsets_may_be_negative_and_wrap() {
        // A guest TSC behind the host's has an offset that is a negative number as u64.
        let shift = TscShift::between((1_000, 500), (1_000, 900));
        assert_eq!(shift.moved(0, 1_000_000), (-400i64) as u64);
        assert_eq!(900u64.wrapping_add(shift.moved(0, 1_000_000)), 500);
    }

    fn ram_with_pvclock(at: u64, version: u32, tsc_timestamp: u64, system_time: u64, mul: u32, shift: i8) -> GuestMemoryMmap {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut page = [0u8; 32];
        page[0..4].copy_from_slice(&version.to_le_bytes());
        page[8..16].copy_from_slice(&tsc_timestamp.to_le_bytes());
        page[16..24].copy_from_slice(&system_time.to_le_bytes());
        page[24..28].copy_from_slice(&mul.to_le_bytes());
        page[28] = shift as u8;
        ram.write_slice(&page, GuestAddress(at)).unwrap();
        ram
    }

    #[test]
    fn the_guests_kvmclock_is_what_its_pvclock_makes_of_its_tsc() {
        // 2 GHz: mul 2^31 with shift 0 halves ticks into ns.
        let ram = ram_with_pvclock(0x2000, 4, 1_000, 7_000_000, 1 << 31, 0);
        assert_eq!(guest_kvmclock_ns(&ram, 0x2001, 3_000), Some(7_001_000));
        let ram = ram_with_pvclock(0x2000, 4, 1_000, 7_000_000, 1 << 31, -1);
        assert_eq!(guest_kvmclock_ns(&ram, 0x2001, 3_000), Some(7_000_500));
    }

    #[test]
    fn a_pvclock_that_is_off_odd_or_out_of_ram_gives_nothing() {
        let ram = ram_with_pvclock(0x2000, 4, 1_000, 7_000_000, 1 << 31, 0);
        assert_eq!(guest_kvmclock_ns(&ram, 0x2000, 3_000), None, "not enabled");
        assert_eq!(guest_kvmclock_ns(&ram, 0x2ff1, 3_000), None, "across a page");
        assert_eq!(guest_kvmclock_ns(&ram, 0x10_0001, 3_000), None, "outside RAM");
        assert_eq!(guest_kvmclock_ns(&ram, 0x2001, 999), None, "a TSC before the stamp");
        let odd = ram_with_pvclock(0x2000, 5, 1_000, 7_000_000, 1 << 31, 0);
        assert_eq!(guest_kvmclock_ns(&odd, 0x2001, 3_000), None, "an update in progress");
        let wild = ram_with_pvclock(0x2000, 4, 0, 0, u32::MAX, 32);
        assert_eq!(guest_kvmclock_ns(&wild, 0x2001, u64::MAX), None, "beyond 64 bits of ns");
        let late = ram_with_pvclock(0x2000, 4, 0, u64::MAX, 1 << 31, 0);
        assert_eq!(guest_kvmclock_ns(&late, 0x2001, 2), None, "past the end of time");
    }

    #[test]
    fn kvms_host_tsc_is_taken_where_it_tells_it() {
        let clock = |flags| kvm_clock_data { clock: 1, flags, host_tsc: 7, ..Default::default() };
        assert_eq!(host_tsc_of(&clock(KVM_CLOCK_HOST_TSC)), Some(7));
        assert_eq!(host_tsc_of(&clock(0)), None);
    }

    #[test]
    fn a_reading_on_this_host_comes_with_a_tsc_between_the_ones_around_it() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else { return };
        let vm = kvm.create_vm().unwrap();
        // SAFETY: RDTSC has no memory effects.
        let before = unsafe { core::arch::x86_64::_rdtsc() };
        let (_, tsc) = clock_and_host_tsc(&vm).unwrap();
        // SAFETY: as above.
        let after = unsafe { core::arch::x86_64::_rdtsc() };
        assert!(before <= tsc && tsc <= after, "{before} <= {tsc} <= {after}");
    }
}
