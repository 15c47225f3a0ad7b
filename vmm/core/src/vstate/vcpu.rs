//! A vCPU: its boot-time configuration and the thread loop around KVM_RUN.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{kvm_run, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::arch::x86_64::cpuid::{normalize, CpuidOptions};
use crate::arch::x86_64::interrupts::set_lint;
use crate::arch::x86_64::msr::boot_msr_list;
use crate::arch::x86_64::regs::{boot_fpu, boot_regs, boot_sregs};
use crate::devices::bus::{lock, Bus};
use super::pause::PauseGate;
use crate::stats::ExitCounts;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create { index: u8, source: kvm_ioctls::Error },
    #[error("cannot configure vCPU {index}: {what} failed: {source}")]
    Configure { index: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {index}: more CPUID entries than KVM accepts")]
    CpuidTooLarge { index: u8 },
    #[error("vCPU {index}: KVM refused MSR {msr:#x}")]
    Msr { index: u8, msr: u32 },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("vCPU {index}: {what} failed: {source}")]
    State { index: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {index}: cannot allocate an XSAVE buffer of {words} extra words")]
    XsaveSize { index: u8, words: usize },
    #[error("vCPU {index}: the snapshot's XSAVE area is {saved} bytes, this host's KVM takes at most {here}")]
    XsaveTooLarge { index: u8, saved: usize, here: usize },
    #[error(
        "vCPU {index}: the snapshot's TSC runs at {saved} kHz, this host's at {here} kHz, and KVM cannot scale it: \
         {source}"
    )]
    TscFrequency { index: u8, saved: u32, here: u32, source: kvm_ioctls::Error },
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest asked for a reset through the i8042 (a reboot with `reboot=k`).
    Reset,
    /// A triple fault: KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// KVM reported a system event (PSCI-style shutdown or reset) of this type.
    SystemEvent(u32),
    /// The guest kernel panicked; its panic line.
    Panic(String),
    /// The VMM could not go on running the guest.
    Failure(String),
    /// The VMM ended the VM: its deadline (PUT /deadline) passed.
    Deadline,
}

/// Where vCPU threads report why the VM must stop; the first report wins.
pub struct ExitSignal {
    reason: Mutex<Option<GuestExit>>,
    pub evt: EventFd,
}

impl ExitSignal {
    pub fn new(evt: EventFd) -> Self {
        Self { reason: Mutex::new(None), evt }
    }

    pub fn report(&self, exit: GuestExit) {
        let mut reason = lock(&self.reason);
        if reason.is_none() {
            *reason = Some(exit);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal the VM's exit: {e}");
        }
    }

    pub fn take(&self) -> Option<GuestExit> {
        lock(&self.reason).take()
    }
}

/// What a vCPU thread shares with the rest of the VMM.
pub struct VcpuContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub stop: Arc<AtomicBool>,
    pub exit: Arc<ExitSignal>,
    /// Closed while the VM is paused.
    pub gate: Arc<PauseGate>,
    /// Each parked vCPU's state, read on its own thread as it parked, so that a snapshot of
    /// the paused VM holds exactly the state at the pause. Emptied on resume.
    pub parked_states: ParkedStates,
    /// When the snapshot this VM was restored from was asked for, if it runs at once.
    pub loaded_at: Option<std::time::Instant>,
    /// VM exits of all vCPUs so far (each KVM_RUN that returns), for the API's metrics.
    pub exits: std::sync::atomic::AtomicU64,
}

/// Why a parked vCPU has no state to give.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ParkError {
    #[error("vCPU {0} has not saved its state (it is not parked)")]
    NotParked(usize),
    #[error("vCPU {index}: completing its last I/O exit failed: {source}")]
    CompleteIo { index: u8, source: kvm_ioctls::Error },
    #[error("vCPU {index}: KVM_RUN with immediate_exit ran the guest: {exit}")]
    RanGuest { index: u8, exit: String },
    /// Shared, since every snapshot attempt of the pause reports it.
    #[error(transparent)]
    State(Arc<VcpuError>),
}

/// The states vCPU threads save as they park, by vCPU index, or why one could not be read.
#[derive(Default)]
pub struct ParkedStates(Mutex<BTreeMap<u8, Result<VcpuState, ParkError>>>);

impl ParkedStates {
    fn put(&self, index: u8, state: Result<VcpuState, ParkError>) {
        lock(&self.0).insert(index, state);
    }

    /// The states of vCPUs `0..count`, in index order; an error names the first vCPU whose
    /// state is missing or could not be read.
    pub fn all(&self, count: usize) -> Result<Vec<VcpuState>, ParkError> {
        let states = lock(&self.0);
        (0..count)
            .map(|i| match states.get(&(i as u8)) {
                Some(Ok(state)) => Ok(state.clone()),
                Some(Err(e)) => Err(e.clone()),
                None => Err(ParkError::NotParked(i)),
            })
            .collect()
    }

    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}

thread_local! {
    /// The running vCPU's `kvm_run`, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit makes a KVM_RUN that is about to start return at once, so a kick
    // that lands between the stop check and the ioctl is not lost; one that lands inside
    // KVM_RUN interrupts it with EINTR.
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own vCPU's mapped kvm_run and
            // cleared before that mapping goes away.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal));
    result
}

pub struct Vcpu {
    pub(super) fd: VcpuFd,
    index: u8,
    /// Bytes of XSAVE state KVM_GET_XSAVE2 returns for this VM (0: only KVM_GET_XSAVE).
    pub(super) xsave_size: usize,
    /// MSRs a snapshot of this vCPU reads.
    pub(super) msrs_to_save: Arc<[u32]>,
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd
            .create_vcpu(index as u64)
            .map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self { fd, index, xsave_size: vm.xsave_size, msrs_to_save: vm.snapshot_msrs.clone() })
    }

    pub fn index(&self) -> u8 {
        self.index
    }

    /// The KVM vCPU, for tests and benchmarks that drive KVM_RUN themselves.
    pub fn kvm_fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; the boot vCPU also gets the 64-bit entry state.
    /// The others wait in the in-kernel LAPIC for the boot vCPU's INIT/SIPI.
    pub fn configure(&self, kvm: &Kvm, num_cpus: u8, entry: u64) -> Result<(), VcpuError> {
        let index = self.index;
        let cfg = |what| move |source| VcpuError::Configure { index, what, source };
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(cfg("KVM_GET_SUPPORTED_CPUID"))?;
        let mut entries = supported.as_slice().to_vec();
        normalize(
            &mut entries,
            CpuidOptions { cpu_index: index, num_cpus, tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer) },
        );
        for e in &entries {
            tracing::trace!(
                "vCPU {index} CPUID {:#x}/{}: eax={:#x} ebx={:#x} ecx={:#x} edx={:#x}",
                e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
            );
        }
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::CpuidTooLarge { index })?;
        self.fd.set_cpuid2(&cpuid).map_err(cfg("KVM_SET_CPUID2"))?;
        let msrs = boot_msr_list();
        let written = self.fd.set_msrs(&msrs).map_err(cfg("KVM_SET_MSRS"))?;
        if let Some(refused) = msrs.as_slice().get(written) {
            return Err(VcpuError::Msr { index, msr: refused.index });
        }
        self.fd.set_fpu(&boot_fpu()).map_err(cfg("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(cfg("KVM_GET_LAPIC"))?;
        set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(cfg("KVM_SET_LAPIC"))?;
        if index == 0 {
            self.fd.set_regs(&boot_regs(entry)).map_err(cfg("KVM_SET_REGS"))?;
            let sregs = self.fd.get_sregs().map_err(cfg("KVM_GET_SREGS"))?;
            self.fd.set_sregs(&boot_sregs(sregs)).map_err(cfg("KVM_SET_SREGS"))?;
        }
        Ok(())
    }

    /// Runs the guest until the VM is stopped, handling the exits that need the VMM. The
    /// thread's seccomp filter (the vCPU one) goes on before the first KVM_RUN.
    pub fn run(mut self, ctx: &VcpuContext) -> ExitCounts {
        let mut counts = ExitCounts::default();
        if let Err(e) = seccomp::install(seccomp::Thread::Vcpu) {
            ctx.exit.report(GuestExit::Failure(format!("vCPU {}: {e}", self.index)));
            return counts;
        }
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        let mut loaded_at = ctx.loaded_at.filter(|_| self.index == 0);
        while !ctx.stop.load(Ordering::Acquire) {
            if ctx.gate.is_closed() {
                ctx.parked_states.put(self.index, self.state_at_park());
                ctx.gate.park(&ctx.stop);
                continue;
            }
            if let Some(at) = loaded_at.take() {
                tracing::info!("first KVM_RUN {:?} after the snapshot load request", at.elapsed());
            }
            let result = self.fd.run();
            ctx.exits.fetch_add(1, Ordering::Relaxed);
            let next = match result {
                Ok(exit) => handle_exit(exit, ctx, &mut counts),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    counts.add("interrupted", "");
                    Next::Run
                }
                Err(e) => Next::Stop(GuestExit::Failure(format!("KVM_RUN failed on vCPU {}: {e}", self.index))),
            };
            let exit = match next {
                Next::Run => continue,
                Next::Stop(exit) => exit,
                Next::InternalError => {
                    // SAFETY: KVM filled in the `internal` member for KVM_EXIT_INTERNAL_ERROR.
                    let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    GuestExit::Failure(format!(
                        "KVM could not run vCPU {} (internal error, suberror {suberror}): the host's KVM \
                         cannot run this guest",
                        self.index
                    ))
                }
            };
            if exit == GuestExit::TripleFault {
                self.log_fault_state();
            }
            ctx.exit.report(exit);
            break;
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        counts
    }
}

impl Vcpu {
    /// Completes the port or MMIO access of the last exit (KVM finishes it on the next
    /// KVM_RUN; with immediate_exit set that returns EINTR without entering the guest), then
    /// reads the vCPU's state, which is only whole once no access is pending.
    fn state_at_park(&mut self) -> Result<VcpuState, ParkError> {
        let index = self.index;
        self.fd.set_kvm_immediate_exit(1);
        let completed = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(source) => Err(ParkError::CompleteIo { index, source }),
            Ok(exit) => Err(ParkError::RanGuest { index, exit: format!("{exit:?}") }),
        };
        self.fd.set_kvm_immediate_exit(0);
        completed?;
        self.save_state().map_err(|e| ParkError::State(Arc::new(e)))
    }
}

impl Vcpu {
    /// Where the guest was when it triple-faulted: what there is to go on, since the guest
    /// itself prints nothing.
    fn log_fault_state(&self) {
        let (Ok(r), Ok(s), Ok(ev)) = (self.fd.get_regs(), self.fd.get_sregs(), self.fd.get_vcpu_events()) else {
            tracing::error!("vCPU {}: triple fault; its registers cannot be read", self.index);
            return;
        };
        tracing::error!(
            "vCPU {}: triple fault at rip {:#x} rsp {:#x} rflags {:#x}; cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} \
             efer {:#x}; cs {:#x} ss {:#x}; idt {:#x}+{:#x} gdt {:#x}+{:#x}; exception pending {} injected {} nr {} \
             error code {:#x}",
            self.index,
            r.rip,
            r.rsp,
            r.rflags,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.ss.selector,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.gdt.limit,
            ev.exception.pending,
            ev.exception.injected,
            ev.exception.nr,
            ev.exception.error_code,
        );
    }
}

/// What a vCPU thread does after an exit.
enum Next {
    Run,
    Stop(GuestExit),
    /// Described by the caller, which can read `kvm_run` once the exit's borrow has ended.
    InternalError,
}

fn handle_exit(exit: VcpuExit, ctx: &VcpuContext, counts: &mut ExitCounts) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => {
            let who = ctx.pio.write(port as u64, data);
            counts.add("pio-write", who.unwrap_or("unclaimed"));
            Next::Run
        }
        VcpuExit::IoIn(port, data) => {
            let who = ctx.pio.read(port as u64, data);
            counts.add("pio-read", who.unwrap_or("unclaimed"));
            Next::Run
        }
        VcpuExit::MmioRead(addr, data) => {
            let who = ctx.mmio.read(addr, data);
            counts.add("mmio-read", who.unwrap_or("unclaimed"));
            Next::Run
        }
        VcpuExit::MmioWrite(addr, data) => {
            let who = ctx.mmio.write(addr, data);
            counts.add("mmio-write", who.unwrap_or("unclaimed"));
            Next::Run
        }
        VcpuExit::Intr => {
            counts.add("interrupted", "");
            Next::Run
        }
        VcpuExit::Shutdown => {
            counts.add("shutdown", "");
            Next::Stop(GuestExit::TripleFault)
        }
        VcpuExit::SystemEvent(kind, _) => {
            counts.add("system-event", "");
            Next::Stop(GuestExit::SystemEvent(kind))
        }
        VcpuExit::Hlt => {
            counts.add("hlt", "");
            Next::Stop(GuestExit::Failure("a vCPU halted outside the in-kernel irqchip's control".into()))
        }
        VcpuExit::InternalError => {
            counts.add("internal-error", "");
            Next::InternalError
        }
        VcpuExit::FailEntry(reason, cpu) => {
            counts.add("fail-entry", "");
            Next::Stop(GuestExit::Failure(format!(
                "KVM could not enter the guest on host CPU {cpu} (hardware entry failure reason {reason:#x})"
            )))
        }
        other => {
            counts.add("unexpected", "");
            Next::Stop(GuestExit::Failure(format!("unexpected VM exit: {other:?}")))
        }
    }
}
