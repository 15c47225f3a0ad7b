//! Parking vCPU threads outside KVM_RUN, for pause/resume (and for reading vCPU state, which
//! must not change under the reader).
//!
//! The main thread closes the gate, kicks every vCPU thread out of KVM_RUN and waits until all
//! of them are parked; opening the gate lets them run on. A thread checks the gate before each
//! KVM_RUN, and the kick's `immediate_exit` guarantees it gets back to that check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct PauseGate {
    /// Read by vCPU threads before every KVM_RUN without taking the lock.
    closed: AtomicBool,
    parked: Mutex<usize>,
    changed: Condvar,
}

impl PauseGate {
    fn parked(&self) -> MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// vCPU side: waits while the gate is closed, unless the VM is stopping.
    pub fn park(&self, stop: &AtomicBool) {
        let mut parked = self.parked();
        *parked += 1;
        self.changed.notify_all();
        while self.is_closed() && !stop.load(Ordering::Acquire) {
            parked = self.changed.wait(parked).unwrap_or_else(|e| e.into_inner());
        }
        *parked -= 1;
        self.changed.notify_all();
    }

    /// Main side: from now on vCPU threads park at their next check.
    pub fn close(&self) {
        let _parked = self.parked();
        self.closed.store(true, Ordering::Release);
    }

    /// Main side: waits until `count` threads are parked; false if that takes longer than
    /// `timeout`.
    pub fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut parked = self.parked();
        while *parked < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            parked = self.changed.wait_timeout(parked, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        true
    }

    /// Main side: lets parked threads run again. Also how a stopping VM wakes them.
    pub fn open(&self) {
        let _parked = self.parked();
        self.closed.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Wakes parked threads so that they see the stop flag.
    pub fn wake(&self) {
        let _parked = self.parked();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn threads_park_while_closed_and_leave_when_opened_or_stopped() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Each thread loops like a vCPU thread: check the gate, then "run".
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (gate, stop, ran) = (gate.clone(), stop.clone(), ran.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if gate.is_closed() {
                            gate.park(&stop);
                            continue;
                        }
                        ran.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
            .collect();
        let wait_for_progress = |from: usize| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while ran.load(Ordering::SeqCst) <= from {
                assert!(Instant::now() < deadline, "the threads make no progress");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        wait_for_progress(0);
        gate.close();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        let at_pause = ran.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ran.load(Ordering::SeqCst), at_pause, "nothing runs while the gate is closed");
        gate.open();
        wait_for_progress(at_pause);
        gate.close();
        assert!(gate.wait_parked(3, Duration::from_secs(10)));
        stop.store(true, Ordering::Release);
        gate.wake();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!gate.wait_parked(1, Duration::from_millis(10)), "no thread is left parked");
    }
}
