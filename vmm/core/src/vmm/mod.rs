//! A VM and everything it is made of: KVM's VM and vCPUs, guest memory and the devices. A
//! [`Vmm`] is built ([`crate::builder::build`]) or restored from a snapshot
//! ([`Vmm::restore`]); it then starts its vCPU threads, can be paused, resumed, snapshotted
//! and have a drive's disk replaced while it runs.

mod snapshot;
mod vcpus;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use self::vcpus::VcpuThreads;
use crate::device_manager::{DeviceError, DeviceManager, EventLoop};
use crate::snapshot::SnapshotError;
use crate::stats::ExitCounts;
use crate::vstate::memory::{GuestRam, MemoryError};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{ExitSignal, ParkError, ParkedStates, Vcpu, VcpuContext, VcpuError};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot start vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("the vCPUs did not stop within 5 s; the VM keeps running")]
    ParkTimeout,
    #[error(transparent)]
    Park(#[from] ParkError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot freeze guest memory: {0}")]
    Freeze(MemoryError),
    #[error(transparent)]
    Devices(#[from] DeviceError),
}

pub struct Vmm {
    // Field order is drop order: the vCPU threads are joined, then the vCPUs and the VM go,
    // before the memory they map.
    threads: Option<VcpuThreads>,
    vcpus: Vec<Vcpu>,
    devices: DeviceManager,
    vm: Vm,
    ram: GuestRam,
}

impl Vmm {
    pub(crate) fn new(vm: Vm, ram: GuestRam, devices: DeviceManager, vcpus: Vec<Vcpu>) -> Self {
        Self { threads: None, vcpus, devices, vm, ram }
    }

    /// The vCPUs, until their threads start.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    pub fn vcpus_mut(&mut self) -> &mut [Vcpu] {
        &mut self.vcpus
    }

    /// Takes the vCPUs out, to be run by the caller (tests).
    pub fn take_vcpus(&mut self) -> Vec<Vcpu> {
        std::mem::take(&mut self.vcpus)
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    pub fn devices_mut(&mut self) -> &mut DeviceManager {
        &mut self.devices
    }

    /// Starts a thread per vCPU, reporting to `exit` why the VM must stop; `paused`, with the
    /// vCPUs parked and the devices out of the event loop once this returns.
    pub fn start(
        &mut self,
        events: &mut EventLoop,
        exit: Arc<ExitSignal>,
        loaded_at: Option<Instant>,
        paused: bool,
    ) -> Result<(), VmmError> {
        let ctx = VcpuContext {
            pio: self.devices.pio().clone(),
            mmio: self.devices.mmio().clone(),
            stop: Arc::new(AtomicBool::new(false)),
            exit,
            gate: Arc::new(PauseGate::default()),
            parked_states: ParkedStates::default(),
            loaded_at,
            exits: Default::default(),
        };
        if paused {
            ctx.gate.close();
        } else {
            self.devices.resume(events);
        }
        let threads = VcpuThreads::spawn(std::mem::take(&mut self.vcpus), ctx)?;
        if paused {
            threads.wait_parked()?;
        }
        self.threads = Some(threads);
        Ok(())
    }

    /// Stops and joins the vCPU threads; their exit counts.
    pub fn stop(&mut self) -> ExitCounts {
        self.threads.take().map(|mut t| t.stop()).unwrap_or_default()
    }

    pub fn is_paused(&self) -> bool {
        self.threads.as_ref().is_some_and(VcpuThreads::is_paused)
    }

    /// VM exits of all vCPUs since they started.
    pub fn exits(&self) -> u64 {
        self.threads.as_ref().map_or(0, |t| t.ctx().exits.load(Ordering::Relaxed))
    }

    /// Parks the vCPUs (each saves its state as it parks), then takes the devices out of the
    /// event loop, so that nothing touches guest memory or the queues.
    pub fn pause(&mut self, events: &mut EventLoop) -> Result<(), VmmError> {
        if let Some(threads) = &self.threads {
            threads.pause()?;
        }
        self.devices.pause(events);
        Ok(())
    }

    pub fn resume(&mut self, events: &mut EventLoop) {
        self.devices.resume(events);
        if let Some(threads) = &self.threads {
            threads.resume();
        }
    }

    /// The vCPUs' states: those the parked threads saved, or read from vCPUs not running.
    pub fn save_vcpus(&self) -> Result<Vec<VcpuState>, VmmError> {
        match &self.threads {
            Some(threads) => Ok(threads.states()?),
            None => Ok(self.vcpus.iter().map(Vcpu::save_state).collect::<Result<_, _>>()?),
        }
    }

    /// Puts the disk at `path` (in `format`, else the drive's) behind the drive the API knows
    /// as `id` (PATCH /drives/{id}), its backing files where `backing` allows.
    pub fn update_drive(
        &mut self,
        id: &str,
        path: &Path,
        format: Option<disk::Format>,
        backing: &disk::BackingPolicy,
    ) -> Result<(), DeviceError> {
        self.devices.update_drive(id, path, format, backing)
    }
}
