//! Runs a built VM: one thread per vCPU in KVM_RUN, the calling thread in the event loop
//! (console input, the guest's reset request, vCPU exit reports), then an orderly stop.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::builder::BuiltVm;
use crate::devices::legacy::serial::SerialInput;
use crate::stats::{ExitCounts, RunStats};
use crate::vstate::vcpu::{install_kick_handler, kick_signal, ExitSignal, GuestExit, VcpuContext, VcpuError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Watches the eventfds that end the VM: the guest's reset request and vCPU exit reports.
struct StopWatch {
    reset_evt: EventFd,
    exit_evt: EventFd,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopWatch {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset_evt, &self.exit_evt] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch a VM stop event: {e:?}");
            }
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.reset_evt.read();
        let _ = self.exit_evt.read();
        self.done.store(true, Ordering::Release);
    }
}

pub struct RunOutcome {
    pub exit: GuestExit,
    pub stats: RunStats,
}

/// Runs the VM to its end. `started` is when the process started, for the boot timings.
pub fn run(vm: BuiltVm, started: Instant, console_input: bool) -> Result<RunOutcome, RunError> {
    install_kick_handler()?;
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(RunError::EventFd)?;
    let ctx = Arc::new(VcpuContext {
        pio: vm.pio.clone(),
        mmio: vm.mmio.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        exit: Arc::new(ExitSignal::new(exit_evt.try_clone().map_err(RunError::EventFd)?)),
    });

    let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new().map_err(RunError::EventLoop)?;
    let done = Arc::new(AtomicBool::new(false));
    manager.add_subscriber(Box::new(StopWatch {
        reset_evt: vm.reset_evt.try_clone().map_err(RunError::EventFd)?,
        exit_evt,
        done: done.clone(),
    }));
    if console_input {
        if let Ok(stdin) = std::io::stdin().as_fd().try_clone_to_owned() {
            manager.add_subscriber(Box::new(SerialInput { serial: vm.serial.clone(), input: File::from(stdin) }));
        }
    }

    let BuiltVm { vcpus, vm: kvm_vm, ram, kvm, console, subscribers, .. } = vm;
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    let mut threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let thread_ctx = ctx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("ember-vcpu{}", vcpu.index()))
            .spawn(move || vcpu.run(&thread_ctx))
            .map_err(RunError::Thread);
        match handle {
            Ok(h) => threads.push(h),
            Err(e) => {
                stop_vcpus(&ctx, &mut threads);
                return Err(e);
            }
        }
    }

    let mut loop_result = Ok(());
    while !done.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            loop_result = Err(RunError::EventLoop(e));
            break;
        }
    }
    let exits = stop_vcpus(&ctx, &mut threads);
    let total = started.elapsed();
    loop_result?;

    // A panic outranks everything: with `panic=-1` it ends in the same reset as a reboot.
    let reported = ctx.exit.take();
    let exit = match (console.panic_message(), reported) {
        (Some(line), _) => GuestExit::Panic(line),
        (None, Some(exit)) => exit,
        (None, None) => GuestExit::Reset,
    };
    let first_serial_byte = console.first_byte.get().map(|t| t.saturating_duration_since(started));
    drop((kvm_vm, ram, kvm));
    Ok(RunOutcome { exit, stats: RunStats { exits, first_serial_byte, total } })
}

/// Stops every vCPU thread: sets the stop flag, kicks each out of KVM_RUN, joins them.
fn stop_vcpus(ctx: &VcpuContext, threads: &mut Vec<std::thread::JoinHandle<ExitCounts>>) -> ExitCounts {
    ctx.stop.store(true, Ordering::Release);
    for t in threads.iter() {
        // SAFETY: the thread has not been joined, so its pthread_t is valid.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
    }
    let mut total = ExitCounts::default();
    for t in threads.drain(..) {
        match t.join() {
            Ok(counts) => total.merge(&counts),
            Err(_) => ctx.exit.report(GuestExit::Failure("a vCPU thread panicked".into())),
        }
    }
    total
}
