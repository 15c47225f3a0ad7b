//! The threads that serve connections, one connection at a time each, kept once started, and
//! at most so many connections at once.
//!
//! A thread per connection is the agent's model (a connection's requests are answered in order
//! and an exec may hold one for long), but a new thread costs a stack, a kernel stack and task
//! structures, all freshly written pages. In a sandbox restored from a template or forked,
//! every page the guest writes becomes host memory of that sandbox alone (and, on the way, a
//! fault): the thread that served the template's last connection, idle in the snapshot, serves
//! the restored sandbox's first one with pages it already has.
//!
//! The bound on connections is the bound on their threads (and on the frame buffers they
//! hold): each open connection has its thread, and past `max_open` a connection is handed
//! back to the caller to refuse instead of getting one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use tracing::warn;

/// Idle threads kept for later connections; more (after a burst) end.
pub const MAX_IDLE: usize = 2;

pub struct Workers<S> {
    queue: Sender<S>,
    shared: Arc<Shared<S>>,
}

struct Shared<S> {
    queue: Mutex<Receiver<S>>,
    /// Threads that finished a connection and wait for the next, or are about to.
    idle: AtomicUsize,
    serve: Box<dyn Fn(S) + Send + Sync>,
    stack_size: usize,
    /// Connections handed to a thread and not yet served to their end.
    open: AtomicUsize,
    max_open: usize,
}

/// A connection that [`Workers::dispatch`] did not take: `open` connections are being served,
/// as many as it serves at once.
pub struct Full<S> {
    pub conn: S,
    pub open: usize,
}

impl<S: Send + 'static> Workers<S> {
    /// Threads of `stack_size` bytes serving at most `max_open` connections at once.
    pub fn new(stack_size: usize, max_open: usize, serve: impl Fn(S) + Send + Sync + 'static) -> Self {
        let (queue, receiver) = channel();
        let shared = Shared {
            queue: Mutex::new(receiver),
            idle: AtomicUsize::new(0),
            serve: Box::new(serve),
            stack_size,
            open: AtomicUsize::new(0),
            max_open,
        };
        Self { queue, shared: Arc::new(shared) }
    }

    /// Hands `conn` to an idle thread, or to a new one if none is idle; gives it back when
    /// `max_open` connections are being served already.
    pub fn dispatch(&self, conn: S) -> Result<(), Full<S>> {
        let counted = self.shared.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.shared.max_open).then_some(n + 1));
        if let Err(open) = counted {
            return Err(Full { conn, open });
        }
        // An idle thread counted here is waiting for the queue or about to, so the connection
        // is taken at once; claiming it keeps a second connection from counting on it too.
        let claimed = self.shared.idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
        if !claimed {
            let shared = self.shared.clone();
            let started = std::thread::Builder::new()
                .name("conn".into())
                .stack_size(self.shared.stack_size)
                .spawn(move || shared.work());
            if let Err(e) = started {
                // Dropped: the host sees it closed, as when the agent is not there yet.
                warn!("cannot start a connection thread: {e}");
                self.shared.open.fetch_sub(1, Ordering::AcqRel);
                return Ok(());
            }
        }
        // The receiver lives as long as `shared`, which `self` holds.
        let _ = self.queue.send(conn);
        Ok(())
    }

    /// Threads waiting for a connection.
    pub fn idle(&self) -> usize {
        self.shared.idle.load(Ordering::Acquire)
    }
}

impl<S> Shared<S> {
    fn work(&self) {
        loop {
            let next = self.queue.lock().unwrap_or_else(|e| e.into_inner()).recv();
            let Ok(conn) = next else { return };
            (self.serve)(conn);
            self.open.fetch_sub(1, Ordering::AcqRel);
            let kept = self.idle.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_IDLE).then_some(n + 1));
            if kept.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{sync_channel, SyncSender};
    use std::thread::ThreadId;
    use std::time::{Duration, Instant};

    use super::*;

    /// A connection that reports which thread served it, and is held until `release` says.
    struct Conn {
        served_by: SyncSender<ThreadId>,
        release: Receiver<()>,
    }

    fn pool() -> Workers<Conn> {
        pool_of(16)
    }

    fn pool_of(max_open: usize) -> Workers<Conn> {
        Workers::new(64 << 10, max_open, |c: Conn| {
            c.served_by.send(std::thread::current().id()).unwrap();
            let _ = c.release.recv();
        })
    }

    /// Dispatches a connection; returns the serving thread's id and the connection's release.
    fn open(w: &Workers<Conn>) -> (ThreadId, SyncSender<()>) {
        let (served_by, served) = sync_channel(1);
        let (release, held) = sync_channel(1);
        assert!(w.dispatch(Conn { served_by, release: held }).is_ok(), "the connection was refused");
        (served.recv_timeout(Duration::from_secs(5)).expect("the connection was not served"), release)
    }

    fn idle_becomes(w: &Workers<Conn>, n: usize) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while w.idle() != n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        w.idle() == n
    }

    #[test]
    fn a_finished_thread_serves_the_next_connection() {
        let w = pool();
        let (first, release) = open(&w);
        release.send(()).unwrap();
        assert!(idle_becomes(&w, 1));
        let (second, release) = open(&w);
        assert_eq!(first, second, "a new thread served the second connection");
        assert_eq!(w.idle(), 0);
        release.send(()).unwrap();
    }

    #[test]
    fn connections_at_once_each_get_a_thread_and_few_stay_idle() {
        let w = pool();
        let held: Vec<_> = (0..MAX_IDLE + 3).map(|_| open(&w)).collect();
        let threads: std::collections::HashSet<_> = held.iter().map(|(t, _)| *t).collect();
        assert_eq!(threads.len(), MAX_IDLE + 3, "a connection waited for another to finish");
        for (_, release) in &held {
            release.send(()).unwrap();
        }
        assert!(idle_becomes(&w, MAX_IDLE));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(w.idle(), MAX_IDLE, "more threads than that stayed idle");
    }

    #[test]
    fn past_the_limit_connections_are_given_back_until_one_ends() {
        let w = pool_of(2);
        let (_, first) = open(&w);
        let _second = open(&w);
        let (served_by, _) = sync_channel(1);
        let (_, held) = sync_channel(1);
        let Err(full) = w.dispatch(Conn { served_by, release: held }) else { panic!("a third connection was served") };
        assert_eq!(full.open, 2);
        first.send(()).unwrap();
        // The first connection's thread counts it as ended before it goes idle.
        assert!(idle_becomes(&w, 1));
        let _third = open(&w);
    }
}
