//! The server: one reader thread per connection decodes requests and dispatches them; replies
//! from any thread go through one shared writer, a frame at a time.
//!
//! Threads: the connection's reader (this is where `serve` runs), one supervisor per running
//! exec (polls the child's stdout/stderr or pty master and a pidfd, enforces the timeout, sends
//! `Started` and the final status), one stdin writer per exec started with `stdin: true` or a
//! pty, one thread per `ReadFile`, and the process-wide reaper. Stacks are small (64–256 KiB
//! reserved, a few pages touched).
//!
//! Backpressure: a chunk is read from a child's pipe only once the previous one has been
//! written to the connection, so at most one 64 KiB chunk per exec (and per file read) is in
//! memory; a host that reads slowly blocks those writers, and the blocked child then blocks in
//! its own `write`. Writers take the connection lock one frame at a time, so a slow or chatty
//! exec delays the others' frames by at most one frame each turn and never starves them. The
//! reader never waits for the connection's write side except to send its own short replies.
//! There is no per-stream credit: a host must keep reading the connection (demultiplexing into
//! its own per-stream buffers), or every stream stalls.
//! Stdin: each exec has a queue of 8 frames; when a child does not read its stdin and the
//! queue is full, the reader waits, which delays the next requests on that connection (not
//! other connections) until the child reads or exits. A host that sends large stdin should
//! use its own connection for it.
//!
//! Bounds: at most `Config::max_connections` connections are served at once (each has its
//! thread); one past that gets a `TooManyConnections` error and is closed. A frame's buffer
//! grows as its bytes arrive (see `read_frame`), and a frame that has begun must be complete
//! within `Config::frame_timeout`, or its connection is closed: a peer cannot hold a slot, or
//! a megabyte, by announcing a frame and stalling. A connection idle between frames may stay.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::egress::Egress;
use crate::sys::{self, error_kind};
use crate::workers::{Full, Workers};
use crate::Connection;
use agent_protocol::{
    decode, encode, leading_id, read_frame, ErrorKind, FrameError, Reply, ReplyBody, Request,
    RequestBody, CHUNK, CONNECTION_ID, MAX_DISCARD, PROTOCOL_VERSION,
};
use rustix::process::Signal;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Connections served at once by default: more than any host use needs (a sandbox's control
/// plane opens a few), few enough that their threads and buffers fit a small guest.
pub const MAX_CONNECTIONS: usize = 64;
/// How long the rest of a frame may take to arrive, once its first byte has, by default.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection's frame buffer is kept between frames up to this size (a stdin or file chunk
/// frame fits); a larger one is given back after its frame.
const KEPT_BUFFER: usize = 2 * CHUNK;
/// Bytes a connection reads from its socket at once, ahead of the frame reader.
const READ_AHEAD: usize = 4096;
/// Connection threads' stacks, which the deepest request (an exec's set-up) fits in.
const CONNECTION_STACK: usize = 256 << 10;

#[derive(Debug, Clone)]
pub struct Config {
    /// Honour `PowerOff` (only when the agent is the guest's init).
    pub allow_power_off: bool,
    /// Connections served at once ([`Server`]); more are refused.
    pub max_connections: usize,
    /// How long a frame whose first byte arrived may take to be complete.
    pub frame_timeout: Duration,
    /// The guest's egress, which every connection may enable and every exec gets.
    pub egress: Egress,
}

impl Default for Config {
    fn default() -> Self {
        Config { allow_power_off: false, max_connections: MAX_CONNECTIONS, frame_timeout: FRAME_TIMEOUT, egress: Egress::default() }
    }
}

/// Serves the connections an accept loop hands it, each on a thread of its own, at most
/// `config.max_connections` at once.
pub struct Server<S> {
    workers: Workers<S>,
    max_connections: usize,
}

impl<S: Connection> Server<S> {
    pub fn new(config: Config) -> Self {
        let max_connections = config.max_connections;
        let workers = Workers::new(CONNECTION_STACK, max_connections, move |s| {
            if let Err(e) = serve(s, &config) {
                warn!("connection: {e}");
            }
        });
        Server { workers, max_connections }
    }

    /// Serves `conn`, or refuses it when as many connections as allowed are open.
    pub fn accept(&self, conn: S) {
        if let Err(Full { conn, open }) = self.workers.dispatch(conn) {
            refuse(conn, open, self.max_connections);
        }
    }
}

/// Tells the peer why it is not served and closes the connection, on the accepting thread:
/// the error is written without waiting (a fresh socket has room for it; a peer that left
/// none gets the connection closed only), so that no peer can hold up the accept loop.
fn refuse<S: Connection>(mut conn: S, open: usize, limit: usize) {
    warn!("refusing a connection: {open} open, the limit is {limit}");
    let reply = Reply {
        id: CONNECTION_ID,
        body: ReplyBody::Error {
            kind: ErrorKind::TooManyConnections,
            message: format!("too many connections: {open} open, the limit is {limit}"),
        },
    };
    if let Ok(frame) = encode(&reply) {
        if conn.set_nonblocking(true).is_ok() {
            let _ = conn.write(&frame);
        }
    }
    conn.shutdown();
}

/// A connection's read side: it reads ahead (a small request costs one read), and once a
/// frame has begun, the rest of it must arrive within the frame timeout; between frames it
/// waits as long as the peer likes.
struct Incoming<S> {
    stream: S,
    ahead: Box<[u8]>,
    start: usize,
    end: usize,
    timeout: Duration,
    /// Bytes of the frame being read have been handed out since the last one ended.
    in_frame: bool,
    /// When the frame being read must be complete: set when it first needs more bytes.
    deadline: Option<Instant>,
    /// Whether the socket has a receive timeout set now.
    timed: bool,
}

impl<S: Connection> Incoming<S> {
    fn new(stream: S, timeout: Duration) -> Self {
        let ahead = vec![0; READ_AHEAD].into_boxed_slice();
        Incoming { stream, ahead, start: 0, end: 0, timeout, in_frame: false, deadline: None, timed: false }
    }

    /// The frame being read is complete (or discarded): the next one has a deadline once
    /// it has begun.
    fn frame_done(&mut self) {
        self.in_frame = false;
        self.deadline = None;
    }

    /// Sets the socket's receive timeout to what is left of the frame's time, or clears it
    /// between frames.
    fn arm(&mut self) -> io::Result<()> {
        if self.in_frame && self.deadline.is_none() {
            self.deadline = Some(Instant::now() + self.timeout);
        }
        match self.deadline {
            None if self.timed => {
                self.stream.set_read_timeout(None)?;
                self.timed = false;
            }
            None => {}
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.stalled());
                }
                self.stream.set_read_timeout(Some(left))?;
                self.timed = true;
            }
        }
        Ok(())
    }

    /// The stream, with its receive timeout cleared, and the bytes read ahead of the frames
    /// handed out so far (a `Dial`'s first raw bytes, when the host sent them at once).
    fn into_parts(self) -> io::Result<(S, Vec<u8>)> {
        self.stream.set_read_timeout(None)?;
        Ok((self.stream, self.ahead[self.start..self.end].to_vec()))
    }

    fn stalled(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the rest of a frame did not arrive within {:?}", self.timeout),
        )
    }

    /// Reads from the socket into `out`, or into the read-ahead buffer (`None`); a read
    /// that the frame's deadline ended is the stall error.
    fn read_stream(&mut self, out: Option<&mut [u8]>) -> io::Result<usize> {
        let buf = out.unwrap_or(&mut self.ahead[..]);
        match self.stream.read(buf) {
            Err(e) if self.deadline.is_some() && matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                Err(self.stalled())
            }
            r => r,
        }
    }
}

impl<S: Connection> Read for Incoming<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            self.arm()?;
            // A read as large as the read-ahead buffer gains nothing from it.
            if out.len() >= self.ahead.len() {
                let n = self.read_stream(Some(out))?;
                self.in_frame |= n > 0;
                return Ok(n);
            }
            self.end = self.read_stream(None)?;
            self.start = 0;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.ahead[self.start..self.start + n]);
        self.start += n;
        self.in_frame |= n > 0;
        Ok(n)
    }
}

pub(crate) static RUNNING_EXECS: AtomicU32 = AtomicU32::new(0);

pub(crate) fn start_time() -> Instant {
    static T: OnceLock<Instant> = OnceLock::new();
    *T.get_or_init(Instant::now)
}

/// The write side of a connection, shared by every thread that replies.
pub(crate) struct Out {
    w: Mutex<Box<dyn Write + Send>>,
}

impl Out {
    /// Sends one reply; false when the connection is gone.
    pub(crate) fn send(&self, id: u64, body: ReplyBody) -> bool {
        let frame = match encode(&Reply { id, body }) {
            Ok(f) => f,
            Err(e) => {
                warn!("cannot encode reply to {id}: {e}");
                return false;
            }
        };
        let mut w = self.w.lock().unwrap();
        w.write_all(&frame).is_ok()
    }

    pub(crate) fn error(&self, id: u64, kind: ErrorKind, message: impl Into<String>) -> bool {
        self.send(
            id,
            ReplyBody::Error {
                kind,
                message: message.into(),
            },
        )
    }

    pub(crate) fn io_error(&self, id: u64, what: &str, e: &io::Error) -> bool {
        self.error(id, error_kind(e), format!("{what}: {}", plain(e)))
    }
}

/// An I/O error as a shell words it: `Permission denied`, without Rust's `(os error 13)`.
pub(crate) fn plain(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// A running (not detached) exec, as the reader sees it.
pub(crate) struct ExecHandle {
    pub pid: u32,
    pub stdin: Option<SyncSender<Vec<u8>>>,
    /// The pty master, for `Resize`.
    pub pty: Option<OwnedFd>,
    /// With a pty, `StdinClose` sends this (the terminal's EOF character) instead of closing.
    pub eof: Option<u8>,
}

pub(crate) type Execs = Arc<Mutex<HashMap<u64, ExecHandle>>>;

pub(crate) fn spawn_thread(
    name: &str,
    stack: usize,
    f: impl FnOnce() + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(stack)
        .spawn(f)
        .map(drop)
}

/// Serves one connection until the peer closes it (or it fails). Running execs started on
/// it are killed (their process groups, SIGKILL) when it ends; detached ones are not.
pub fn serve<S: Connection>(stream: S, config: &Config) -> io::Result<()> {
    start_time();
    let out = Arc::new(Out {
        w: Mutex::new(Box::new(stream.try_clone()?)),
    });
    let execs: Execs = Arc::default();
    let mut writes = crate::files::Writes::default();
    let mut buf = Vec::new();
    let mut incoming = Incoming::new(stream, config.frame_timeout);
    // Whether a `Dial` may still take the connection over: nothing else it started may write.
    let mut may_dial = true;
    let result = loop {
        let frame = read_frame(&mut incoming, &mut buf);
        incoming.frame_done();
        match frame {
            Ok(()) => {}
            Err(FrameError::Closed) => break Ok(()),
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::TimedOut => {
                // No error reply: a peer that stalls may not read either, and a write to it
                // could hold this thread as long as the stall would have.
                warn!("closing a connection: {e}");
                break Ok(());
            }
            Err(FrameError::TooLarge(n)) => {
                out.error(
                    CONNECTION_ID,
                    ErrorKind::FrameTooLarge,
                    format!("frame of {n} bytes"),
                );
                if n > MAX_DISCARD {
                    break Ok(());
                }
                continue;
            }
            Err(FrameError::Truncated) => {
                // The host may have shut down only its write side: tell it why we stop.
                out.error(
                    CONNECTION_ID,
                    ErrorKind::MalformedFrame,
                    "the stream ended in the middle of a frame",
                );
                break Ok(());
            }
            Err(FrameError::Io(e)) => break Err(e),
            Err(FrameError::Malformed(m)) => break Err(io::Error::other(m)),
        }
        let req: Request = match decode(&buf) {
            Ok(r) => r,
            Err(e) => {
                debug!("malformed frame: {e}");
                // A request from a newer host (an unknown variant) is answered under its own
                // id, so that the host is not left waiting; garbage gets the connection's id.
                let id = leading_id(&buf).unwrap_or(CONNECTION_ID);
                out.error(id, ErrorKind::MalformedFrame, e.to_string());
                continue;
            }
        };
        // An idle connection holds a small buffer only, not what a large frame grew.
        if buf.capacity() > KEPT_BUFFER {
            buf = Vec::new();
        }
        if let (RequestBody::Dial { port }, true) = (&req.body, req.id != CONNECTION_ID) {
            if !may_dial {
                out.error(req.id, ErrorKind::InvalidRequest, "Dial must be the first request on its connection (after Hello or Health only)");
                continue;
            }
            match crate::dial::connect(*port) {
                Ok(service) => {
                    if !out.send(req.id, ReplyBody::Ok) {
                        break Ok(());
                    }
                    drop(out);
                    let (host, early) = incoming.into_parts()?;
                    return crate::dial::splice(host, &early, service);
                }
                Err(e) => {
                    out.error(req.id, ErrorKind::DialFailed, e.to_string());
                    continue;
                }
            }
        }
        may_dial &= matches!(req.body, RequestBody::Hello { .. } | RequestBody::Health);
        handle(req, &out, &execs, &mut writes, config);
    };
    // The peer is gone: stop what it started.
    let running: Vec<_> = execs.lock().unwrap().drain().collect();
    for (_, h) in running {
        let _ = sys::kill(h.pid, true, Signal::KILL.as_raw());
    }
    incoming.stream.shutdown();
    result
}

fn handle(
    req: Request,
    out: &Arc<Out>,
    execs: &Execs,
    writes: &mut crate::files::Writes,
    config: &Config,
) {
    let id = req.id;
    if id == CONNECTION_ID {
        out.error(id, ErrorKind::InvalidRequest, "request id 0 is reserved");
        return;
    }
    match req.body {
        RequestBody::Hello { protocol_version } => {
            if protocol_version != PROTOCOL_VERSION {
                out.error(
                    id,
                    ErrorKind::VersionMismatch,
                    format!("agent speaks protocol {PROTOCOL_VERSION}, host {protocol_version}"),
                );
            } else {
                out.send(
                    id,
                    ReplyBody::Hello {
                        protocol_version: PROTOCOL_VERSION,
                        agent_version: AGENT_VERSION.into(),
                    },
                );
            }
        }
        RequestBody::Health => {
            out.send(
                id,
                ReplyBody::Health {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: AGENT_VERSION.into(),
                    uptime_ms: start_time().elapsed().as_millis() as u64,
                    running_execs: RUNNING_EXECS.load(Ordering::Relaxed),
                },
            );
        }
        RequestBody::Exec(e) => crate::exec::start(id, e, out, execs, &config.egress.exec_env()),
        RequestBody::Stdin { data } => {
            let tx = execs.lock().unwrap().get(&id).map(|h| h.stdin.clone());
            match tx {
                Some(Some(tx)) => {
                    // Blocks while the child's stdin queue is full (see the module docs); an
                    // error means the child closed its stdin: the data is dropped.
                    let _ = tx.send(data);
                }
                Some(None) => {
                    out.error(id, ErrorKind::InvalidRequest, "stdin is not open");
                }
                None => {
                    out.error(id, ErrorKind::UnknownId, "no running exec with this id");
                }
            }
        }
        RequestBody::StdinClose => {
            let mut map = execs.lock().unwrap();
            match map.get_mut(&id) {
                Some(h) => {
                    let tx = h.stdin.take();
                    let eof = h.eof;
                    drop(map);
                    // A pty cannot be closed without hanging up the child: it gets the
                    // terminal's EOF character, as a user typing ^D would send.
                    if let (Some(tx), Some(eof)) = (tx, eof) {
                        let _ = tx.send(vec![eof]);
                    }
                }
                None => {
                    drop(map);
                    out.error(id, ErrorKind::UnknownId, "no running exec with this id");
                }
            }
        }
        RequestBody::Resize(size) => {
            let map = execs.lock().unwrap();
            let r = map.get(&id).map(|h| h.pty.as_ref().map(|m| sys::set_pty_size(m, size)));
            drop(map);
            match r {
                Some(Some(Ok(()))) => {}
                Some(Some(Err(e))) => {
                    out.io_error(id, "resize the pty", &e);
                }
                Some(None) => {
                    out.error(id, ErrorKind::InvalidRequest, "the exec has no pty");
                }
                None => {
                    out.error(id, ErrorKind::UnknownId, "no running exec with this id");
                }
            }
        }
        RequestBody::Signal { signal, group } => {
            let pid = execs.lock().unwrap().get(&id).map(|h| h.pid);
            match pid {
                Some(pid) => {
                    if let Err(e) = sys::kill(pid, group, signal) {
                        out.io_error(id, "kill", &e);
                    } else {
                        out.send(id, ReplyBody::Ok);
                    }
                }
                None => {
                    out.error(id, ErrorKind::UnknownId, "no running exec with this id");
                }
            }
        }
        RequestBody::WriteFile {
            path,
            mode,
            create_parents,
        } => writes.open(id, &path, mode, create_parents, out),
        RequestBody::FileData { data } => writes.data(id, &data, out),
        RequestBody::FileEnd => writes.end(id, out),
        RequestBody::ReadFile { path } => crate::files::read(id, path, out),
        RequestBody::ListDir { path } => crate::files::list(id, &path, out),
        RequestBody::Stat { path } => match crate::files::stat(&path) {
            Ok(s) => {
                out.send(id, ReplyBody::Stat(s));
            }
            Err(e) => {
                out.io_error(id, &path, &e);
            }
        },
        RequestBody::Mkdir {
            path,
            mode,
            parents,
        } => reply_unit(id, out, &path, crate::files::mkdir(&path, mode, parents)),
        RequestBody::Remove { path, recursive } => {
            reply_unit(id, out, &path, crate::files::remove(&path, recursive))
        }
        RequestBody::SetClock { secs, nanos } => {
            reply_unit(id, out, "clock_settime", sys::set_clock(secs, nanos))
        }
        RequestBody::AddEntropy { data, entropy_bits } => reply_unit(
            id,
            out,
            "add entropy",
            sys::add_entropy(&data, entropy_bits),
        ),
        RequestBody::SetHostname { name } => {
            reply_unit(id, out, "sethostname", sys::set_hostname(&name))
        }
        // Taken over by `serve` (it takes the connection) unless its id is the reserved one.
        RequestBody::Dial { .. } => {}
        RequestBody::EnableEgress(egress) => match config.egress.enable(&egress) {
            Ok(()) => {
                out.send(id, ReplyBody::Ok);
            }
            Err((kind, message)) => {
                out.error(id, kind, message);
            }
        },
        RequestBody::PowerOff => {
            if !config.allow_power_off {
                out.error(
                    id,
                    ErrorKind::Unsupported,
                    "power off is only done by an agent running as init",
                );
            } else {
                out.send(id, ReplyBody::Ok);
                if let Err(e) = sys::power_off() {
                    warn!("power off: {e}");
                }
            }
        }
    }
}

fn reply_unit(id: u64, out: &Out, what: &str, r: io::Result<()>) {
    match r {
        Ok(()) => out.send(id, ReplyBody::Ok),
        Err(e) => out.io_error(id, what, &e),
    };
}
