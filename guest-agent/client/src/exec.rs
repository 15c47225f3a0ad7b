//! Running commands: output streamed to the caller's writers as it arrives, stdin copied from a
//! local reader, signals and pty resizes while the command runs.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use agent_protocol::{encode, ExecRequest, PtySize, ReplyBody, Request, RequestBody, CHUNK};

use super::{next_id, recv, send, ClientError};

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Exit(i32),
    Killed(i32),
    TimedOut,
}

/// A started command. Its replies are read by [`Exec::wait`]; [`Exec::control`] gives a handle
/// that other threads can use meanwhile.
pub struct Exec {
    stream: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    id: u64,
    pid: u32,
    buf: Vec<u8>,
}

/// Sends signals and window sizes to a running command; cheap to clone, usable from any
/// thread (a SIGWINCH or Ctrl-C handler's thread, say). Errors the agent reports about these
/// (the command has just ended, it has no pty) arrive among the command's replies and are
/// logged there, not returned.
#[derive(Clone)]
pub struct ExecControl {
    writer: Arc<Mutex<UnixStream>>,
    id: u64,
}

impl ExecControl {
    /// Sends `signal` to the command's process, or with `group` to its whole process group.
    pub fn signal(&self, signal: i32, group: bool) -> Result<(), ClientError> {
        self.send(RequestBody::Signal { signal, group })
    }

    /// Sets the size of the command's pty (it gets SIGWINCH).
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.send(RequestBody::Resize(PtySize { rows, cols }))
    }

    fn send(&self, body: RequestBody) -> Result<(), ClientError> {
        send_frame(&self.writer, self.id, body)
    }
}

impl Exec {
    /// Sends `request` on `stream` and waits for the command to start. With `stdin`, a thread
    /// copies the reader to the command's stdin (64 KiB frames, then `StdinClose` at end of
    /// file; through the pty with `request.pty`); it is not waited for, so a reader that never
    /// ends (a terminal) does not hold the command's end back. Without `stdin` the command's
    /// stdin is /dev/null (or a pty nobody types into).
    pub fn start(
        stream: UnixStream,
        mut request: ExecRequest,
        stdin: Option<Box<dyn Read + Send>>,
    ) -> Result<Exec, ClientError> {
        request.stdin = stdin.is_some();
        let wait = Exec::send_request(stream, request)?;
        if let Some(reader) = stdin {
            let writer = wait.writer.clone();
            let id = wait.id;
            std::thread::Builder::new()
                .name("exec-stdin".into())
                .spawn(move || copy_stdin(reader, &writer, id))
                .map_err(|source| ClientError::Local { what: "thread spawn", source })?;
        }
        Ok(wait)
    }

    fn send_request(mut stream: UnixStream, request: ExecRequest) -> Result<Exec, ClientError> {
        let id = next_id();
        send(&mut stream, id, RequestBody::Exec(request))?;
        let mut buf = Vec::new();
        let pid = match recv(&mut stream, &mut buf, id)? {
            ReplyBody::Started { pid } => pid,
            ReplyBody::Error { kind, message } => return Err(ClientError::Refused { kind, message }),
            other => return Err(ClientError::unexpected(&other)),
        };
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        Ok(Exec { stream, writer, id, pid, buf })
    }

    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn control(&self) -> ExecControl {
        ExecControl { writer: self.writer.clone(), id: self.id }
    }

    /// Copies the command's stdout and stderr to `out` and `err` as they arrive (each chunk
    /// flushed) until it ends. The connection is then shut down, which also ends a stdin copy
    /// still waiting for input.
    pub fn wait(mut self, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, ClientError> {
        let result = self.pump(out, err);
        let _ = self.stream.shutdown(Shutdown::Both);
        result
    }

    fn pump(&mut self, out: &mut dyn Write, err: &mut dyn Write) -> Result<Outcome, ClientError> {
        let local = |source| ClientError::Local { what: "output write", source };
        loop {
            match recv(&mut self.stream, &mut self.buf, self.id)? {
                ReplyBody::Stdout { data } => {
                    out.write_all(&data).and_then(|()| out.flush()).map_err(local)?;
                }
                ReplyBody::Stderr { data } => {
                    err.write_all(&data).and_then(|()| err.flush()).map_err(local)?;
                }
                ReplyBody::Exit { code } => return Ok(Outcome::Exit(code)),
                ReplyBody::Killed { signal } => return Ok(Outcome::Killed(signal)),
                ReplyBody::TimedOut => return Ok(Outcome::TimedOut),
                // Answers to `ExecControl` requests and stdin frames.
                ReplyBody::Ok => {}
                ReplyBody::Error { kind, message } => {
                    tracing::debug!("exec {}: a follow-up request failed ({kind:?}): {message}", self.id)
                }
                other => return Err(ClientError::unexpected(&other)),
            }
        }
    }
}

/// Runs `request` and copies its stdout and stderr to `out` and `err` as they arrive; its
/// stdin is /dev/null.
pub fn exec(
    stream: UnixStream,
    request: ExecRequest,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<Outcome, ClientError> {
    Exec::start(stream, request, None)?.wait(out, err)
}

/// Starts `request` detached (stdio on /dev/null, outliving the connection) and returns its pid.
pub fn spawn_detached(mut stream: UnixStream, mut request: ExecRequest) -> Result<u32, ClientError> {
    request.detach = true;
    request.stdin = false;
    let id = next_id();
    send(&mut stream, id, RequestBody::Exec(request))?;
    match recv(&mut stream, &mut Vec::new(), id)? {
        ReplyBody::Started { pid } => Ok(pid),
        ReplyBody::Error { kind, message } => Err(ClientError::Refused { kind, message }),
        other => Err(ClientError::unexpected(&other)),
    }
}

fn copy_stdin(mut reader: Box<dyn Read + Send>, writer: &Mutex<UnixStream>, id: u64) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // The command sees end of file, as it would if the local input ended.
                tracing::warn!("reading local stdin: {e}");
                break;
            }
        };
        let body = RequestBody::Stdin { data: buf[..n].to_vec() };
        if send_frame(writer, id, body).is_err() {
            return; // the command ended and the connection was shut down
        }
    }
    let _ = send_frame(writer, id, RequestBody::StdinClose);
}

/// One whole frame under the lock, so that frames from several threads never interleave.
fn send_frame(writer: &Mutex<UnixStream>, id: u64, body: RequestBody) -> Result<(), ClientError> {
    let frame = encode(&Request { id, body })?;
    writer.lock().unwrap().write_all(&frame)?;
    Ok(())
}
