//! A vCPU's complete KVM state, saved for a snapshot and set again on restore.
//!
//! Both directions must run while the vCPU is outside KVM_RUN (on its own thread, parked, or
//! before its thread starts). The orders of the ioctls matter; they follow what KVM's own
//! documentation and Firecracker's experience require (see the comments at each step).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::tsc::TscShift;
use super::vcpu::{Vcpu, VcpuError};
use crate::arch::x86_64::msr::MSR_IA32_TSC_DEADLINE;

/// Words of the legacy `kvm_xsave` region (4 KiB) every XSAVE state starts with.
const XSAVE_REGION_WORDS: usize = 1024;

/// TSC frequencies closer than this (parts per million) count as equal: hosts calibrate their
/// TSC at boot and rarely land on the same kHz.
const TSC_KHZ_TOLERANCE_PPM: u64 = 250;

#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// In restore order; the TSC deadline comes after the TSC it is relative to.
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The XSAVE area as KVM_GET_XSAVE2 returns it: the 4 KiB legacy region, then the rest.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    /// None where the host's KVM cannot tell its TSC frequency.
    pub tsc_khz: Option<u32>,
    /// KVM_VCPU_TSC_OFFSET; None where the host's KVM cannot tell it (see `vstate::tsc`).
    pub tsc_offset: Option<u64>,
}

impl Vcpu {
    fn state_err(&self, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VcpuError {
        let index = self.index();
        move |source| VcpuError::State { index, what, source }
    }

    /// Reads everything KVM holds for this vCPU. After an I/O or MMIO exit KVM finishes the
    /// instruction only on the next KVM_RUN, so a vCPU stopped right after one must first enter
    /// KVM_RUN once with `immediate_exit` set (it returns EINTR at once, the instruction done).
    /// A vCPU whose last KVM_RUN ended with EINTR has nothing pending.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let fd = &self.fd;
        // KVM_GET_MP_STATE processes pending INIT/SIPI events, which can change the LAPIC and
        // registers, so it goes first; the vCPU events go last because the other reads can still
        // change what is pending.
        let mp_state = fd.get_mp_state().map_err(self.state_err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(self.state_err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(self.state_err("KVM_GET_SREGS"))?;
        let xsave = self.get_xsave()?;
        let xcrs = fd.get_xcrs().map_err(self.state_err("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(self.state_err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(self.state_err("KVM_GET_LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let mut cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.state_err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        // KVM_GET_CPUID2 leaves the unused tail of the buffer zeroed.
        cpuid.retain(|e| !(e.function == 0 && e.index == 0 && e.flags == 0 && e.eax == 0));
        let msrs = self.get_msrs()?;
        let events = fd.get_vcpu_events().map_err(self.state_err("KVM_GET_VCPU_EVENTS"))?;
        let tsc_offset = self.tsc_offset();
        Ok(VcpuState {
            index: self.index(),
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            events,
            tsc_khz,
            tsc_offset,
        })
    }

    fn get_xsave(&self) -> Result<Vec<u32>, VcpuError> {
        let extra_words = self.xsave_size.saturating_sub(std::mem::size_of::<kvm_xsave>()).div_ceil(4);
        if extra_words == 0 {
            let xsave = self.fd.get_xsave().map_err(self.state_err("KVM_GET_XSAVE"))?;
            return Ok(xsave.region.to_vec());
        }
        let mut xsave = Xsave::new(extra_words).map_err(|_| VcpuError::XsaveSize { index: self.index(), words: extra_words })?;
        // SAFETY: `xsave` holds the size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reported for this VM.
        unsafe { self.fd.get_xsave2(&mut xsave) }.map_err(self.state_err("KVM_GET_XSAVE2"))?;
        let fam = xsave.as_fam_struct_ref();
        let mut words = fam.xsave.region.to_vec();
        words.extend_from_slice(xsave.as_slice());
        Ok(words)
    }

    /// Reads the MSRs a snapshot keeps. An MSR that KVM lists but refuses for this vCPU (its
    /// CPUID lacks the feature) is left out, so the list that restores is the one that read.
    fn get_msrs(&self) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut entries: Vec<kvm_msr_entry> =
            self.msrs_to_save.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut done = 0;
        while done < entries.len() {
            let chunk_end = entries.len().min(done + KVM_MAX_MSR_ENTRIES);
            let mut msrs = Msrs::from_entries(&entries[done..chunk_end]).expect("chunk within KVM_MAX_MSR_ENTRIES");
            let read = self.fd.get_msrs(&mut msrs).map_err(self.state_err("KVM_GET_MSRS"))?;
            entries[done..done + read].copy_from_slice(&msrs.as_slice()[..read]);
            done += read;
            if done < chunk_end {
                tracing::debug!("vCPU {}: MSR {:#x} not readable, not saved", self.index(), entries[done].index);
                entries.remove(done);
            }
        }
        // The TSC deadline is an absolute TSC value: KVM arms the timer against the TSC at the
        // time of the write, so it must be restored after the TSC.
        entries.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
        Ok(entries)
    }

    /// Sets everything KVM holds for this vCPU from `state`, which must have passed
    /// [`VcpuState::check`]; `tsc_shift` is what the VM's restore returned.
    pub fn restore_state(&self, state: &VcpuState, tsc_shift: TscShift) -> Result<(), VcpuError> {
        let fd = &self.fd;
        let index = self.index();
        // CPUID first: what KVM accepts in the MSRs and XSAVE depends on it.
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::CpuidTooLarge { index })?;
        fd.set_cpuid2(&cpuid).map_err(self.state_err("KVM_SET_CPUID2"))?;
        let unscaled_khz = match state.tsc_khz {
            Some(khz) => self.match_tsc_khz(khz)?,
            None => None,
        };
        fd.set_mp_state(state.mp_state).map_err(self.state_err("KVM_SET_MP_STATE"))?;
        // KVM_SET_REGS clears a pending exception, which KVM_SET_VCPU_EVENTS at the end restores.
        fd.set_regs(&state.regs).map_err(self.state_err("KVM_SET_REGS"))?;
        // KVM_SET_SREGS also sets the APIC base, which the LAPIC state below relies on.
        fd.set_sregs(&state.sregs).map_err(self.state_err("KVM_SET_SREGS"))?;
        let xsave = self.xsave_for_restore(&state.xsave)?;
        // SAFETY: the buffer is at least the size this VM's KVM reads (checked above).
        unsafe { fd.set_xsave2(&xsave) }.map_err(self.state_err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(self.state_err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&state.debugregs).map_err(self.state_err("KVM_SET_DEBUGREGS"))?;
        // The LAPIC goes before the MSRs: KVM only accepts the TSC deadline with the LAPIC in
        // TSC-deadline mode.
        fd.set_lapic(&state.lapic).map_err(self.state_err("KVM_SET_LAPIC"))?;
        let deadline = state.msrs.iter().position(|e| e.index == MSR_IA32_TSC_DEADLINE).unwrap_or(state.msrs.len());
        let (msrs, deadline) = state.msrs.split_at(deadline);
        self.set_msrs(msrs)?;
        if let (Some(offset), Some(khz)) = (state.tsc_offset, unscaled_khz) {
            // Over the TSC value the MSRs just set, which left it out of step with kvmclock.
            if let Err(e) = self.set_tsc_offset(tsc_shift.moved(offset, khz)) {
                tracing::debug!("vCPU {index}: KVM_VCPU_TSC_OFFSET: {e}; the TSC is restored by value");
            }
        }
        self.set_msrs(deadline)?;
        fd.set_vcpu_events(&state.events).map_err(self.state_err("KVM_SET_VCPU_EVENTS"))?;
        // Tells a guest using kvmclock that it was paused, so its soft-lockup watchdog does not
        // fire for the time it spent in the snapshot. Fails harmlessly when kvmclock is unused.
        if let Err(e) = fd.kvmclock_ctrl() {
            tracing::debug!("vCPU {index}: KVM_KVMCLOCK_CTRL: {e}");
        }
        Ok(())
    }

    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuError> {
        for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).expect("chunk within KVM_MAX_MSR_ENTRIES");
            let written = self.fd.set_msrs(&msrs).map_err(self.state_err("KVM_SET_MSRS"))?;
            if let Some(refused) = chunk.get(written) {
                return Err(VcpuError::Msr { index: self.index(), msr: refused.index });
            }
        }
        Ok(())
    }

    /// A guest that measured its TSC at one rate must keep seeing that rate. Returns the rate
    /// where the guest's TSC runs at the host's own (no scaling).
    fn match_tsc_khz(&self, khz: u32) -> Result<Option<u32>, VcpuError> {
        let Ok(here) = self.fd.get_tsc_khz() else {
            return Ok(None);
        };
        if (here as u64).abs_diff(khz as u64) * 1_000_000 <= khz as u64 * TSC_KHZ_TOLERANCE_PPM {
            return Ok(Some(here));
        }
        self.fd
            .set_tsc_khz(khz)
            .map_err(|source| VcpuError::TscFrequency { index: self.index(), saved: khz, here, source })?;
        Ok(None)
    }

    fn xsave_for_restore(&self, words: &[u32]) -> Result<Xsave, VcpuError> {
        let index = self.index();
        let here_words = self.xsave_size.max(std::mem::size_of::<kvm_xsave>()).div_ceil(4);
        if words.len() > here_words {
            return Err(VcpuError::XsaveTooLarge { index, saved: words.len() * 4, here: here_words * 4 });
        }
        // A shorter area (from a host with fewer XSAVE components) is padded with zeros: its
        // header says which components it holds, so the rest is ignored.
        let extra = here_words - XSAVE_REGION_WORDS;
        let mut xsave = Xsave::new(extra).map_err(|_| VcpuError::XsaveSize { index, words: extra })?;
        let (region, rest) = words.split_at(words.len().min(XSAVE_REGION_WORDS));
        // SAFETY: only the fixed-size region is written; the FAM length stays as allocated.
        let fam: &mut kvm_xsave2 = unsafe { xsave.as_mut_fam_struct() };
        fam.xsave.region[..region.len()].copy_from_slice(region);
        xsave.as_mut_slice()[..rest.len()].copy_from_slice(rest);
        Ok(xsave)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU state {expected} is for vCPU {found}")]
    Index { expected: u8, found: u8 },
    #[error("vCPU {index} has {count} CPUID entries")]
    Cpuid { index: u8, count: usize },
    #[error("vCPU {index}'s XSAVE area is {bytes} bytes, less than 4 KiB")]
    Xsave { index: u8, bytes: usize },
}

impl VcpuState {
    /// Checks what can be checked without KVM, so that a bad snapshot fails before any VM exists.
    pub fn check(&self, expected_index: u8) -> Result<(), VcpuStateError> {
        let index = expected_index;
        if self.index != expected_index {
            return Err(VcpuStateError::Index { expected: expected_index, found: self.index });
        }
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(VcpuStateError::Cpuid { index, count: self.cpuid.len() });
        }
        if self.xsave.len() < XSAVE_REGION_WORDS {
            return Err(VcpuStateError::Xsave { index, bytes: self.xsave.len() * 4 });
        }
        Ok(())
    }
}
