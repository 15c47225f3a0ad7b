//! Runs a built VM: one thread per vCPU in KVM_RUN, the calling thread in the event loop
//! (console input, devices, the guest's reset request, vCPU exit reports, API calls: pause and
//! resume), then an orderly stop.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use api::models::{
    ActionType, FrozenMemory, InstanceInfo, Metrics, VcpuMetrics, InstanceState, MachineConfig, PartialDrive, SnapshotCreateParams, VmState,
};
use api::{ApiChannel, ApiRequest, ApiResponse};
use crate::builder::{AttachedVirtio, BuiltVm, VirtioKind};
use crate::devices::bus::lock;
use crate::devices::virtio::block::Block;
use disk::{self, overlay};
use crate::devices::legacy::serial::{SerialDevice, SerialInput};
use crate::snapshot::{self, SnapshotFiles, SnapshotParts};
use crate::stats::{ExitCounts, RunStats};
use crate::vstate::memory::GuestRam;
use crate::vstate::pause::PauseGate;
use crate::vstate::vm::Vm;
use crate::vstate::vcpu::{install_kick_handler, kick_signal, ExitSignal, GuestExit, ParkedStates, VcpuContext, VcpuError};

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

/// The API of a running VM: where calls arrive, and what `GET /` and `GET /machine-config`
/// report.
pub struct RuntimeApi {
    pub channel: ApiChannel,
    pub id: String,
    pub machine: MachineConfig,
    /// Start with the vCPUs parked and the devices out of the event loop, as after a pause (a
    /// snapshot loaded without `resume_vm`).
    pub start_paused: bool,
    /// When the snapshot this VM was restored from was asked for: vCPU 0 logs how long its
    /// first KVM_RUN came after it.
    pub loaded_at: Option<Instant>,
    /// Where FlushMetrics appends (PUT /metrics).
    pub metrics_path: Option<std::path::PathBuf>,
}

type Manager = EventManager<Box<dyn MutEventSubscriber + Send>>;
type VcpuThread = std::thread::JoinHandle<ExitCounts>;

/// Runs the VM to its end. `started` is when the process started, for the boot timings.
pub fn run(vm: BuiltVm, started: Instant, console_input: bool) -> Result<RunOutcome, RunError> {
    run_with_api(vm, started, console_input, None)
}

/// Runs the VM to its end, answering `api`'s calls meanwhile.
pub fn run_with_api(
    vm: BuiltVm,
    started: Instant,
    console_input: bool,
    api: Option<RuntimeApi>,
) -> Result<RunOutcome, RunError> {
    install_kick_handler()?;
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(RunError::EventFd)?;
    let ctx = Arc::new(VcpuContext {
        pio: vm.pio.clone(),
        mmio: vm.mmio.clone(),
        stop: Arc::new(AtomicBool::new(false)),
        exit: Arc::new(ExitSignal::new(exit_evt.try_clone().map_err(RunError::EventFd)?)),
        gate: Arc::new(PauseGate::default()),
        parked_states: ParkedStates::default(),
        loaded_at: api.as_ref().and_then(|a| a.loaded_at),
        exits: Default::default(),
    });
    let start_paused = api.as_ref().is_some_and(|a| a.start_paused);
    if start_paused {
        ctx.gate.close();
    }

    let mut manager = Manager::new().map_err(RunError::EventLoop)?;
    let done = Arc::new(AtomicBool::new(false));
    manager.add_subscriber(Box::new(StopWatch {
        reset_evt: vm.reset_evt.try_clone().map_err(RunError::EventFd)?,
        exit_evt,
        done: done.clone(),
    }));
    let api_pending = Arc::new(AtomicBool::new(false));
    if let Some(api) = &api {
        let evt = api.channel.evt.try_clone().map_err(RunError::EventFd)?;
        manager.add_subscriber(Box::new(ApiWatch { evt, pending: api_pending.clone() }));
    }
    let mut devices = Devices::default();
    if console_input {
        if let Ok(stdin) = std::io::stdin().as_fd().try_clone_to_owned() {
            let input = SerialInput { serial: vm.serial.clone(), input: File::from(stdin) };
            devices.ids.push(manager.add_subscriber(Box::new(input)));
        }
    }

    let BuiltVm { vcpus, vm: kvm_vm, mut ram, kvm, console, subscribers, serial, mut virtio, .. } = vm;
    if start_paused {
        devices.parked.extend(subscribers);
    } else {
        for subscriber in subscribers {
            devices.ids.push(manager.add_subscriber(subscriber));
        }
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

    if start_paused && !ctx.gate.wait_parked(threads.len(), PAUSE_TIMEOUT) {
        stop_vcpus(&ctx, &mut threads);
        return Err(RunError::Thread(std::io::Error::other("the vCPU threads did not park within 5 s")));
    }
    // What building or restoring the VM allocated and freed, and the stack it went through,
    // would stay resident for the VM's whole life: every idle VM's VMM counts against the
    // host's density.
    trim_stack();
    trim_heap();
    let mut machine = Machine { vm: &kvm_vm, ram: &mut ram, serial: &serial, virtio: &mut virtio };
    let mut loop_result = Ok(());
    while !done.load(Ordering::Acquire) {
        if let Err(e) = manager.run() {
            loop_result = Err(RunError::EventLoop(e));
            break;
        }
        if let Some(api) = &api {
            if api_pending.swap(false, Ordering::AcqRel) {
                for call in api.channel.calls.try_iter() {
                    let response = answer(api, call.request, &ctx, &threads, &mut manager, &mut devices, &mut machine);
                    let _ = call.reply.send(response);
                }
                trim_heap();
            }
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
    drop((virtio, serial, kvm_vm, ram, kvm));
    Ok(RunOutcome { exit, stats: RunStats { exits, first_serial_byte, total } })
}

/// The device subscribers: in the event manager while the VM runs, taken out of it while the
/// VM is paused so that no device touches guest memory or its queues.
#[derive(Default)]
struct Devices {
    ids: Vec<SubscriberId>,
    parked: Vec<Box<dyn MutEventSubscriber + Send>>,
}

/// How long vCPU threads get to leave KVM_RUN when the VM is paused.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a snapshot reads of the running VM besides its vCPUs.
struct Machine<'a> {
    vm: &'a Vm,
    ram: &'a mut GuestRam,
    serial: &'a Arc<Mutex<SerialDevice>>,
    virtio: &'a mut [AttachedVirtio],
}

fn answer(
    api: &RuntimeApi,
    request: ApiRequest,
    ctx: &VcpuContext,
    threads: &[VcpuThread],
    manager: &mut Manager,
    devices: &mut Devices,
    machine: &mut Machine,
) -> ApiResponse {
    let paused = ctx.gate.is_closed();
    match request {
        ApiRequest::GetInfo => ApiResponse::json(&InstanceInfo {
            id: api.id.clone(),
            state: if paused { InstanceState::Paused } else { InstanceState::Running },
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            app_name: "ember".into(),
        }),
        ApiRequest::GetMachineConfig => ApiResponse::json(&api.machine),
        ApiRequest::PatchVm(VmState::Paused) if paused => ApiResponse::no_content(),
        ApiRequest::PatchVm(VmState::Paused) => {
            ctx.gate.close();
            kick(threads);
            if !ctx.gate.wait_parked(threads.len(), PAUSE_TIMEOUT) {
                ctx.parked_states.clear();
                ctx.gate.open();
                return ApiResponse::fault(500, "the vCPUs did not stop within 5 s; the VM keeps running");
            }
            for id in devices.ids.drain(..) {
                match manager.remove_subscriber(id) {
                    Ok(device) => devices.parked.push(device),
                    Err(e) => tracing::error!("cannot quiesce a device: {e:?}"),
                }
            }
            ApiResponse::no_content()
        }
        ApiRequest::PatchVm(VmState::Resumed) => {
            for device in devices.parked.drain(..) {
                devices.ids.push(manager.add_subscriber(device));
            }
            ctx.parked_states.clear();
            ctx.gate.open();
            ApiResponse::no_content()
        }
        ApiRequest::CreateSnapshot(_) if !paused => {
            ApiResponse::bad_request("Cannot create a snapshot: the microVM is not paused; pause it first (PATCH /vm)")
        }
        ApiRequest::CreateSnapshot(params) => create_snapshot(&params, ctx, threads.len(), machine),
        ApiRequest::PatchDrive(drive) => patch_drive(&drive, machine),
        ApiRequest::LoadSnapshot(_) => ApiResponse::bad_request("Loading a snapshot is not allowed after the microVM started."),
        ApiRequest::Action(ActionType::InstanceStart) => ApiResponse::bad_request("The microVM is already running."),
        ApiRequest::Action(ActionType::SendCtrlAltDel) => ApiResponse::bad_request(
            "SendCtrlAltDel needs an i8042 keyboard driver in the guest, which ember's guest kernel does not have; \
             stop the VM by powering it off from inside or by ending its VMM process",
        ),
        ApiRequest::Action(ActionType::FlushMetrics) => flush_metrics(api, ctx),
        ApiRequest::PutMetrics(_) => ApiResponse::bad_request("The metrics file can only be set before the microVM starts."),
        ApiRequest::PutBootSource(_) | ApiRequest::PutMachineConfig(_) | ApiRequest::PutDrive(_) | ApiRequest::PutVsock(_) => {
            ApiResponse::bad_request("The requested operation is not supported after starting the microVM.")
        }
    }
}

/// Writes a snapshot of the paused VM with the vCPU states its threads saved as they parked;
/// with `freeze_memory`, freezes guest memory in place instead of writing it, and answers with
/// the files that hold it.
fn create_snapshot(params: &SnapshotCreateParams, ctx: &VcpuContext, vcpus: usize, machine: &mut Machine) -> ApiResponse {
    let started = Instant::now();
    let vcpus = match ctx.parked_states.all(vcpus) {
        Ok(states) => states,
        Err(e) => return ApiResponse::fault(500, format!("Cannot create the snapshot: {e}")),
    };
    let state_path = std::path::PathBuf::from(&params.snapshot_path);
    let parts =
        SnapshotParts { vm: machine.vm, ram: &*machine.ram, vcpus, serial: machine.serial, virtio: &*machine.virtio };
    if params.freeze_memory {
        let frozen = match snapshot::create_state(&state_path, parts) {
            Ok(_) => machine.ram.freeze(),
            Err(e) => return ApiResponse::bad_request(format!("Cannot create the snapshot: {e}")),
        };
        return match frozen {
            Ok(frozen) => {
                tracing::info!("state written and memory frozen in {:?}", started.elapsed());
                let path = |f: &std::fs::File| format!("/proc/{}/fd/{}", std::process::id(), f.as_raw_fd());
                ApiResponse::json(&FrozenMemory {
                    mem_file_path: path(&frozen.base),
                    mem_layers: frozen.layers.iter().map(|l| path(l)).collect(),
                })
            }
            Err(e) => ApiResponse::fault(500, format!("Cannot freeze guest memory: {e}")),
        };
    }
    let files = SnapshotFiles { state: state_path, memory: params.mem_file_path.clone().into() };
    match snapshot::create(&files, parts) {
        Ok(info) => {
            tracing::info!(
                "snapshot written in {:?}: state {} bytes, {} KiB of memory data",
                started.elapsed(),
                info.state_bytes,
                info.memory_bytes >> 10
            );
            ApiResponse::no_content()
        }
        Err(e) => ApiResponse::bad_request(format!("Cannot create the snapshot: {e}")),
    }
}

/// Puts another file behind a drive (PATCH /drives/{id}): checked first without locks, then
/// swapped in; if the swap fails, the old file goes back.
fn patch_drive(patch: &PartialDrive, machine: &mut Machine) -> ApiResponse {
    let fail = |m: String| ApiResponse::bad_request(format!("Cannot update drive {}: {m}", patch.drive_id));
    let new_path = std::path::PathBuf::from(patch.path_on_host.as_deref().unwrap_or_default());
    let attached = machine.virtio.iter_mut().find_map(|a| match &mut a.kind {
        VirtioKind::Block(cfg) if cfg.id.as_deref() == Some(patch.drive_id.as_str()) => Some((cfg, &a.transport)),
        _ => None,
    });
    let Some((cfg, transport)) = attached else {
        return fail("there is no such drive".into());
    };
    if let Err(e) = overlay::info(&new_path) {
        return fail(e.to_string());
    }
    let mut transport = lock(transport);
    let Some(block) = transport.device_mut().as_any_mut().downcast_mut::<Block>() else {
        return fail("it is not a block device".into());
    };
    let read_only = cfg.read_only;
    let open = |path: &std::path::Path| {
        let path = path.to_owned();
        move || disk::open(&path, read_only).map_err(|e| e.to_string())
    };
    match block.replace_disk(open(&new_path)) {
        Ok(()) => {
            tracing::info!("drive {} now on {}", patch.drive_id, new_path.display());
            cfg.path = new_path;
            ApiResponse::no_content()
        }
        Err(e) => {
            if let Err(back) = block.attach(open(&cfg.path)) {
                tracing::error!("drive {}: cannot reopen {} either, its requests fail: {back}", patch.drive_id, cfg.path.display());
            }
            fail(e)
        }
    }
}

/// Appends one line of metrics to the metrics file, as Firecracker's FlushMetrics does: the
/// VM exits so far, which do not depend on the host's speed.
fn flush_metrics(api: &RuntimeApi, ctx: &VcpuContext) -> ApiResponse {
    let Some(path) = &api.metrics_path else {
        return ApiResponse::bad_request("There is no metrics file to flush to: set one with PUT /metrics before the start.");
    };
    let metrics = Metrics {
        utc_timestamp_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        vcpu: VcpuMetrics { exits: ctx.exits.load(Ordering::Relaxed) },
    };
    let line = serde_json::to_string(&metrics).unwrap_or_default() + "\n";
    let written = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    match written {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::bad_request(format!("Cannot write the metrics to {}: {e}", path.display())),
    }
}

/// Gives the heap's free pages back to the host.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of the allocator; it has no preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// Gives the pages of this thread's stack below the current frame back to the host. They hold
/// nothing live (the stack grows down); a deeper call later faults in zeroed pages again.
/// Never inlined, so that its small frame is the last one and the address of its local marks
/// where the live stack ends.
#[inline(never)]
fn trim_stack() {
    // Room for this frame and the madvise call below it.
    const KEEP: usize = 4 << 10;
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    let (mut lowest, mut size) = (std::ptr::null_mut(), 0);
    // SAFETY: attr is initialised by pthread_getattr_np before it is read, and destroyed after.
    let known = unsafe {
        let ok = libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) == 0;
        if ok {
            libc::pthread_attr_getstack(attr.as_ptr(), &mut lowest, &mut size);
            libc::pthread_attr_destroy(attr.as_mut_ptr());
        }
        ok
    };
    let here = &attr as *const _ as usize;
    let page = 4096;
    let end = here.saturating_sub(KEEP) & !(page - 1);
    let start = (lowest as usize).next_multiple_of(page);
    if !known || start >= end {
        return;
    }
    // SAFETY: the range lies in this thread's stack below every live frame, so nothing in it
    // is in use; MADV_DONTNEED only drops its pages. Parts of it not mapped yet are skipped.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
}

/// Sends each vCPU thread the kick signal, so that it leaves (or does not enter) KVM_RUN.
fn kick(threads: &[VcpuThread]) {
    for t in threads {
        // SAFETY: the thread has not been joined, so its pthread_t is valid.
        unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
    }
}

/// Stops every vCPU thread: sets the stop flag, kicks each out of KVM_RUN, joins them.
fn stop_vcpus(ctx: &VcpuContext, threads: &mut Vec<VcpuThread>) -> ExitCounts {
    ctx.stop.store(true, Ordering::Release);
    ctx.gate.wake();
    kick(threads);
    let mut total = ExitCounts::default();
    for t in threads.drain(..) {
        match t.join() {
            Ok(counts) => total.merge(&counts),
            Err(_) => ctx.exit.report(GuestExit::Failure("a vCPU thread panicked".into())),
        }
    }
    total
}
