//! Runs a VM: one thread per vCPU in KVM_RUN, the calling thread in the event loop (console
//! input, devices, the guest's reset request, vCPU exit reports, API calls, which the runtime
//! controller answers), then an orderly stop.

mod trim;

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use event_manager::{EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use api::ApiChannel;
use crate::controller::runtime::RuntimeController;
use crate::device_manager::EventLoop;
use crate::stats::RunStats;
use crate::vmm::{Vmm, VmmError};
use crate::vstate::vcpu::{install_kick_handler, ExitSignal, GuestExit, VcpuError};
use self::trim::{trim_heap, trim_stack};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("event loop failed: {0:?}")]
    EventLoop(event_manager::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
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

/// Notices API calls; the main loop answers them, since pausing needs the event manager.
struct ApiWatch {
    evt: EventFd,
    pending: Arc<AtomicBool>,
}

impl MutEventSubscriber for ApiWatch {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("cannot watch the API channel: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.pending.store(true, Ordering::Release);
    }
}

pub struct RunOutcome {
    pub exit: GuestExit,
    pub stats: RunStats,
}

/// The API of a running VM: where calls arrive, and who answers them.
pub struct RuntimeApi {
    pub channel: ApiChannel,
    pub controller: RuntimeController,
    /// Start with the vCPUs parked and the devices out of the event loop, as after a pause (a
    /// snapshot loaded without `resume_vm`).
    pub start_paused: bool,
    /// When the snapshot this VM was restored from was asked for: vCPU 0 logs how long its
    /// first KVM_RUN came after it.
    pub loaded_at: Option<Instant>,
}

/// Runs the VM to its end. `started` is when the process started, for the boot timings. The
/// calling thread is the VMM's main thread: confined before the guest runs.
pub fn run(vmm: Vmm, started: Instant, console_input: bool) -> Result<RunOutcome, RunError> {
    confine_main_thread()?;
    run_with_api(vmm, started, console_input, None)
}

/// Installs the main thread's seccomp filter on the calling thread. The vCPU kick handler goes
/// in first, so that the filter need not allow `rt_sigaction`. vCPU threads are spawned after
/// this and inherit the filter under their own, which is why the main filter allows all the
/// vCPU filter does; the API thread is spawned before it (its own filter alone applies).
pub fn confine_main_thread() -> Result<(), RunError> {
    install_kick_handler()?;
    seccomp::install(seccomp::Thread::Main)?;
    Ok(())
}

/// Runs the VM to its end, answering `api`'s calls meanwhile.
pub fn run_with_api(
    mut vmm: Vmm,
    started: Instant,
    console_input: bool,
    mut api: Option<RuntimeApi>,
) -> Result<RunOutcome, RunError> {
    install_kick_handler()?;
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(RunError::EventFd)?;
    let exit = Arc::new(ExitSignal::new(exit_evt.try_clone().map_err(RunError::EventFd)?));

    let mut events = EventLoop::new().map_err(RunError::EventLoop)?;
    let done = Arc::new(AtomicBool::new(false));
    events.add_subscriber(Box::new(StopWatch {
        reset_evt: vmm.devices().reset_evt().try_clone().map_err(RunError::EventFd)?,
        exit_evt,
        done: done.clone(),
    }));
    let api_pending = Arc::new(AtomicBool::new(false));
    if let Some(api) = &api {
        let evt = api.channel.evt.try_clone().map_err(RunError::EventFd)?;
        events.add_subscriber(Box::new(ApiWatch { evt, pending: api_pending.clone() }));
    }
    if console_input {
        if let Ok(stdin) = std::io::stdin().as_fd().try_clone_to_owned() {
            vmm.devices_mut().add_console_input(File::from(stdin));
        }
    }
    let start_paused = api.as_ref().is_some_and(|a| a.start_paused);
    let loaded_at = api.as_ref().and_then(|a| a.loaded_at);
    vmm.start(&mut events, exit.clone(), loaded_at, start_paused)?;
    trim_stack();
    trim_heap();

    let mut loop_result = Ok(());
    while !done.load(Ordering::Acquire) {
        let deadline = api.as_ref().and_then(|a| a.controller.deadline);
        let ran = match deadline.map(|d| d.duration_since(SystemTime::now())) {
            None => events.run(),
            Some(Ok(left)) => events.run_with_timeout(i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX)),
            Some(Err(_)) => {
                tracing::info!("the VM's deadline has passed: the VMM ends it");
                exit.report(GuestExit::Deadline);
                break;
            }
        };
        if let Err(e) = ran {
            loop_result = Err(RunError::EventLoop(e));
            break;
        }
        if let Some(api) = &mut api {
            if api_pending.swap(false, Ordering::AcqRel) {
                for call in api.channel.calls.try_iter() {
                    let response = api.controller.answer(call.request, &mut vmm, &mut events);
                    let _ = call.reply.send(response);
                }
                trim_heap();
            }
        }
    }
    let exits = vmm.stop();
    let total = started.elapsed();
    loop_result?;

    // A panic outranks everything: with `panic=-1` it ends in the same reset as a reboot.
    let console = vmm.devices().console();
    let exit = match (console.panic_message(), exit.take()) {
        (Some(line), _) => GuestExit::Panic(line),
        (None, Some(exit)) => exit,
        (None, None) => GuestExit::Reset,
    };
    let first_serial_byte = console.first_byte.get().map(|t| t.saturating_duration_since(started));
    Ok(RunOutcome { exit, stats: RunStats { exits, first_serial_byte, total } })
}
