//! The vCPU threads of a running VM: one per vCPU in KVM_RUN, paused by closing their gate and
//! kicking them out of KVM_RUN, stopped by the stop flag and a kick, joined before the VM fd and
//! guest memory go (see `Vmm`'s field order).

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::VmmError;
use crate::stats::ExitCounts;
use crate::vstate::vcpu::{kick_signal, GuestExit, ParkError, Vcpu, VcpuContext};
use crate::vstate::vcpu_state::VcpuState;

/// How long vCPU threads get to leave KVM_RUN when the VM is paused.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct VcpuThreads {
    ctx: Arc<VcpuContext>,
    threads: Vec<JoinHandle<ExitCounts>>,
}

impl VcpuThreads {
    /// Starts a thread per vCPU; if one cannot start, those started are stopped again.
    pub fn spawn(vcpus: Vec<Vcpu>, ctx: VcpuContext) -> Result<Self, VmmError> {
        let mut this = Self { ctx: Arc::new(ctx), threads: Vec::with_capacity(vcpus.len()) };
        for vcpu in vcpus {
            let ctx = this.ctx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ember-vcpu{}", vcpu.index()))
                .spawn(move || vcpu.run(&ctx))
                .map_err(VmmError::Thread)?;
            this.threads.push(thread);
        }
        Ok(this)
    }

    pub fn ctx(&self) -> &VcpuContext {
        &self.ctx
    }

    pub fn is_paused(&self) -> bool {
        self.ctx.gate.is_closed()
    }

    /// Waits until every vCPU thread is parked at its closed gate.
    pub fn wait_parked(&self) -> Result<(), VmmError> {
        if self.ctx.gate.wait_parked(self.threads.len(), PAUSE_TIMEOUT) {
            Ok(())
        } else {
            Err(VmmError::ParkTimeout)
        }
    }

    /// Parks every vCPU; if they do not all park in time, the VM goes on running.
    pub fn pause(&self) -> Result<(), VmmError> {
        self.ctx.gate.close();
        self.kick();
        if let Err(e) = self.wait_parked() {
            self.resume();
            return Err(e);
        }
        Ok(())
    }

    pub fn resume(&self) {
        self.ctx.parked_states.clear();
        self.ctx.gate.open();
    }

    /// The states the parked vCPUs saved, in index order.
    pub fn states(&self) -> Result<Vec<VcpuState>, ParkError> {
        self.ctx.parked_states.all(self.threads.len())
    }

    /// Sends each vCPU thread the kick signal, so that it leaves (or does not enter) KVM_RUN.
    fn kick(&self) {
        for t in &self.threads {
            // SAFETY: the thread has not been joined, so its pthread_t is valid.
            unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
        }
    }

    /// Stops every vCPU thread: sets the stop flag, kicks each out of KVM_RUN, joins them.
    pub fn stop(&mut self) -> ExitCounts {
        self.ctx.stop.store(true, Ordering::Release);
        self.ctx.gate.wake();
        self.kick();
        let mut total = ExitCounts::default();
        for t in self.threads.drain(..) {
            match t.join() {
                Ok(counts) => total.merge(&counts),
                Err(_) => self.ctx.exit.report(GuestExit::Failure("a vCPU thread panicked".into())),
            }
        }
        total
    }
}

impl Drop for VcpuThreads {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}
