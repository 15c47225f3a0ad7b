//! Commands that outlive their client: each runs with its output kept in an [`OutputLog`], which
//! any number of WebSocket or SSE clients read from their own offsets, now or after they
//! reconnect, until the command's session expires (`ttl_seconds` after it ended).
//!
//! A command's output is pumped from the backend by a thread of its own. When the output no
//! client has been sent reaches the log's capacity, that thread waits: the backend stops
//! reading, and the command blocks on its full pipe until a client catches up. A command with
//! no client attached is killed after its `idle_timeout_seconds`, or at once when its last
//! client leaves with `kill_on_disconnect`; one that runs past `timeout_seconds` is killed and
//! reported as timed out.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::output::{OutputLog, Piece};
use crate::backend::{Control, Exit, OutputSink, Running, Stream};
use crate::clock::{now_ms, rfc3339};
use crate::state::Shared;

/// Finished commands kept per box at most, whatever their `ttl_seconds`.
const MAX_FINISHED_PER_BOX: usize = 256;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub kill_on_disconnect: bool,
    /// How long a finished command is kept for reconnects; `None`: until its box goes.
    pub ttl: Option<Duration>,
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Exit(i32),
    TimedOut(Duration),
    Failed(String),
}

struct Inner {
    log: OutputLog,
    ending: Option<Ending>,
    attached: usize,
    detached_since: Option<Instant>,
    finished_at: Option<Instant>,
    /// Killed, or its box deleted: its output is no longer held back for clients.
    released: bool,
    timed_out: bool,
}

pub struct Command {
    pub id: String,
    pub box_id: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub user: Option<String>,
    pub cwd: Option<String>,
    started: Instant,
    started_ms: u64,
    options: Options,
    control: Arc<dyn Control>,
    inner: Mutex<Inner>,
    /// Signalled when clients were sent output (room in the log) or the command was released.
    room: Condvar,
    changes: watch::Sender<()>,
}

/// What a client reads: the output after its cursor and, once it has all of it, the ending.
pub struct Read {
    pub pieces: Vec<Piece>,
    /// Set once nothing follows the cursor and the command has ended.
    pub ending: Option<Ending>,
    /// Whether the command waits for clients to be sent what it wrote.
    pub held_back: bool,
}

/// A client attached to a command, counted until dropped.
pub struct Attachment(Arc<Command>);

impl Drop for Attachment {
    fn drop(&mut self) {
        let kill = {
            let mut inner = self.0.inner.lock().unwrap();
            inner.attached -= 1;
            if inner.attached == 0 {
                inner.detached_since = Some(Instant::now());
            }
            inner.attached == 0 && inner.ending.is_none() && self.0.options.kill_on_disconnect
        };
        if kill {
            self.0.kill();
        }
    }
}

impl Command {
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    pub fn attach(self: &Arc<Self>) -> Attachment {
        let mut inner = self.inner.lock().unwrap();
        inner.attached += 1;
        inner.detached_since = None;
        Attachment(self.clone())
    }

    /// At most `max` bytes of output after `cursor`, which moves past them.
    pub fn read(&self, cursor: &mut [u64; 2], max: usize) -> Read {
        let inner = self.inner.lock().unwrap();
        let pieces = inner.log.read(cursor, max);
        let all_read = *cursor == inner.log.end();
        Read {
            pieces,
            ending: inner.ending.clone().filter(|_| all_read),
            held_back: inner.log.unacked() >= inner.log.capacity() as u64,
        }
    }

    /// A client has `stream`'s output before `offset`.
    pub fn ack(&self, stream: Stream, offset: u64) {
        self.inner.lock().unwrap().log.ack(stream, offset);
        self.room.notify_all();
    }

    pub fn write_stdin(&self, data: &[u8]) {
        self.control.write_stdin(data);
    }

    pub fn close_stdin(&self) {
        self.control.close_stdin();
    }

    pub fn kill(&self) {
        self.inner.lock().unwrap().released = true;
        self.room.notify_all();
        self.control.kill();
    }

    pub fn running(&self) -> bool {
        self.inner.lock().unwrap().ending.is_none()
    }

    fn finish(&self, ending: Ending) {
        let mut inner = self.inner.lock().unwrap();
        inner.ending = Some(match ending {
            Ending::Exit(_) if inner.timed_out => {
                Ending::TimedOut(self.options.timeout.unwrap_or_default())
            }
            ending => ending,
        });
        inner.finished_at = Some(Instant::now());
        drop(inner);
        self.changes.send_replace(());
    }

    /// What the reaper does to it now: kill it (timed out, idle), or forget it (expired).
    fn reap(&self, now: Instant) -> bool {
        let mut inner = self.inner.lock().unwrap();
        if let Some(at) = inner.finished_at {
            return self
                .options
                .ttl
                .is_some_and(|ttl| now.duration_since(at) >= ttl);
        }
        let timed_out = self
            .options
            .timeout
            .is_some_and(|t| now.duration_since(self.started) >= t);
        let idle = match (inner.detached_since, self.options.idle_timeout) {
            (Some(since), Some(idle)) => inner.attached == 0 && now.duration_since(since) >= idle,
            _ => false,
        };
        if timed_out && !inner.timed_out {
            inner.timed_out = true;
        }
        if (timed_out || idle) && !inner.released {
            drop(inner);
            self.kill();
        }
        false
    }

    /// Its event in its box's trace, once it ended.
    fn event(&self, ending: &Ending) -> serde_json::Value {
        let end = self.inner.lock().unwrap().log.end();
        let mut event = serde_json::json!({
            "kind": "command",
            "phase": "end",
            "command_id": self.id,
            "argv": self.argv,
            "user": self.user,
            "cwd": self.cwd,
            "started_at": rfc3339(self.started_ms),
            "ended_at": rfc3339(now_ms()),
            "stdout_bytes": end[0],
            "stderr_bytes": end[1],
        });
        let (key, value) = match ending {
            Ending::Exit(code) => ("exit_code", serde_json::json!(code)),
            Ending::TimedOut(t) => ("timed_out_after_seconds", serde_json::json!(t.as_secs())),
            Ending::Failed(m) => ("error", serde_json::json!(m)),
        };
        event[key] = value;
        event
    }
}

impl OutputSink for Command {
    fn write(&self, stream: Stream, data: &[u8]) {
        let mut inner = self.inner.lock().unwrap();
        while !inner.released && inner.log.unacked() >= inner.log.capacity() as u64 {
            inner = self
                .room
                .wait_timeout(inner, Duration::from_secs(1))
                .unwrap()
                .0;
        }
        inner.log.push(stream, data);
        drop(inner);
        self.changes.send_replace(());
    }
}

type StartLock = Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
pub struct Commands {
    all: Mutex<HashMap<(String, String), Arc<Command>>>,
    /// Per box and command id: held while that command starts (an execute is get-or-create).
    starting: Mutex<HashMap<(String, String), StartLock>>,
}

impl Commands {
    pub fn get(&self, box_id: &str, id: &str) -> Option<Arc<Command>> {
        self.all
            .lock()
            .unwrap()
            .get(&(box_id.to_string(), id.to_string()))
            .cloned()
    }

    /// The lock to hold while command `id` of box `box_id` is looked up and started.
    pub fn start_lock(&self, box_id: &str, id: &str) -> StartLock {
        let mut starting = self.starting.lock().unwrap();
        starting.retain(|_, lock| Arc::strong_count(lock) > 1);
        starting
            .entry((box_id.to_string(), id.to_string()))
            .or_default()
            .clone()
    }

    /// Registers a command the backend started.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &self,
        box_id: &str,
        id: &str,
        running: &dyn Running,
        argv: Vec<String>,
        user: Option<String>,
        cwd: Option<String>,
        options: Options,
        capacity: usize,
    ) -> Arc<Command> {
        let command = Arc::new(Command {
            id: id.to_string(),
            box_id: box_id.to_string(),
            pid: running.pid(),
            argv,
            user,
            cwd,
            started: Instant::now(),
            started_ms: now_ms(),
            options,
            control: running.control(),
            inner: Mutex::new(Inner {
                log: OutputLog::new(capacity),
                ending: None,
                attached: 0,
                detached_since: Some(Instant::now()),
                finished_at: None,
                released: false,
                timed_out: false,
            }),
            room: Condvar::new(),
            changes: watch::channel(()).0,
        });
        self.all
            .lock()
            .unwrap()
            .insert((box_id.to_string(), id.to_string()), command.clone());
        command
    }

    pub fn running(&self) -> usize {
        self.all
            .lock()
            .unwrap()
            .values()
            .filter(|c| c.running())
            .count()
    }

    /// Whether any client is attached to a command of box `box_id`, or any of them runs.
    pub fn busy(&self, box_id: &str) -> bool {
        let all = self.all.lock().unwrap();
        all.values()
            .filter(|c| c.box_id == box_id)
            .any(|c| c.running() || c.inner.lock().unwrap().attached > 0)
    }

    /// Kills and forgets every command of box `box_id` (it is being deleted or stopped).
    pub fn remove_box(&self, box_id: &str) {
        let mut all = self.all.lock().unwrap();
        let gone: Vec<Arc<Command>> = all
            .values()
            .filter(|c| c.box_id == box_id)
            .cloned()
            .collect();
        all.retain(|(b, _), _| b != box_id);
        drop(all);
        for command in gone.iter().filter(|c| c.running()) {
            command.kill();
        }
    }

    /// Kills the commands past their timeout or idle too long, and forgets expired ones (and
    /// the oldest finished ones of a box over [`MAX_FINISHED_PER_BOX`]).
    pub fn reap(&self) {
        let now = Instant::now();
        let commands: Vec<Arc<Command>> = self.all.lock().unwrap().values().cloned().collect();
        let mut expired: Vec<(String, String)> = commands
            .iter()
            .filter(|c| c.reap(now))
            .map(|c| (c.box_id.clone(), c.id.clone()))
            .collect();
        let mut finished: HashMap<&str, Vec<(Instant, &str)>> = HashMap::new();
        for c in &commands {
            if let Some(at) = c.inner.lock().unwrap().finished_at {
                finished.entry(&c.box_id).or_default().push((at, &c.id));
            }
        }
        for (box_id, mut ended) in finished {
            ended.sort();
            let over = ended.len().saturating_sub(MAX_FINISHED_PER_BOX);
            expired.extend(
                ended[..over]
                    .iter()
                    .map(|(_, id)| (box_id.to_string(), id.to_string())),
            );
        }
        let mut all = self.all.lock().unwrap();
        for key in expired {
            all.remove(&key);
        }
    }
}

/// Pumps `running`'s output into `command` on a thread of its own until it ends, then records
/// the ending in the box's trace.
pub fn pump(state: Shared, command: Arc<Command>, running: Box<dyn Running>) {
    let spawned = std::thread::Builder::new()
        .name(format!("exec-{}", command.pid))
        .spawn({
            let command = command.clone();
            let state = state.clone();
            move || {
                let ending = match running.wait(&*command) {
                    Ok(Exit::Code(code)) => Ending::Exit(code),
                    Ok(Exit::Signal(signal)) => Ending::Exit(128 + signal),
                    Err(e) => Ending::Failed(e.to_string()),
                };
                state.events.record(&command.box_id, command.event(&ending));
                command.finish(ending);
                state.boxes.touch(&command.box_id);
            }
        });
    if let Err(e) = spawned {
        command.kill();
        command.finish(Ending::Failed(format!(
            "cannot start a thread to read the command's output: {e}"
        )));
    }
}
