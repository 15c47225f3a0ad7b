//! The agent's server loop over one connection: frames as a host sends them (arriving in
//! pieces of a size the input picks), through the frame reader, the decoder, the error
//! replies for malformed, oversized and truncated frames, and the handling of every request
//! that leaves the system alone: `Hello`, `Health`, the follow-ups to execs and writes
//! (`Stdin`, `StdinClose`, `Resize`, `Signal`, `FileData`, `FileEnd`) and `PowerOff` (refused:
//! the agent is not init here). Every reply must be a well-formed frame.
//!
//! The agent runs what it is asked (processes, files, the clock, the hostname) with no seam to
//! put a fake behind, so a stream in which any frame decodes to such a request is not served.

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_protocol::{decode, read_frame, FrameError, Reply, Request, RequestBody, MAX_DISCARD};
use ember_agent::server::{serve, Config};
use ember_agent::Connection;

use crate::agent_protocol::Trickle;

/// A connection whose peer sent `input`, read `step` bytes at a time, and keeps what the
/// agent writes.
#[derive(Clone)]
pub struct FakeConn {
    input: Arc<Mutex<(Vec<u8>, usize)>>,
    step: usize,
    pub output: Arc<Mutex<Vec<u8>>>,
}

impl FakeConn {
    pub fn new(input: Vec<u8>, step: usize) -> Self {
        Self { input: Arc::new(Mutex::new((input, 0))), step: step.max(1), output: Arc::default() }
    }
}

impl Read for FakeConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut input = self.input.lock().unwrap();
        let (data, at) = &mut *input;
        let n = buf.len().min(self.step).min(data.len() - *at);
        buf[..n].copy_from_slice(&data[*at..*at + n]);
        *at += n;
        Ok(n)
    }
}

impl Write for FakeConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for FakeConn {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(self.clone())
    }
    fn shutdown(&self) {}
    fn shutdown_write(&self) {}
    fn set_read_timeout(&self, _: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn set_nonblocking(&self, _: bool) -> io::Result<()> {
        Ok(())
    }
}

/// Whether the agent may handle `body` here: it touches nothing outside the connection.
pub fn harmless(body: &RequestBody) -> bool {
    matches!(
        body,
        RequestBody::Hello { .. }
            | RequestBody::Health
            | RequestBody::Stdin { .. }
            | RequestBody::StdinClose
            | RequestBody::Resize(_)
            | RequestBody::Signal { .. }
            | RequestBody::FileData { .. }
            | RequestBody::FileEnd
            | RequestBody::PowerOff
    )
}

/// Whether every request in `stream` is harmless, reading it as the server does: the same
/// frame reader over the same bytes, stopping where the server stops.
pub fn only_harmless(stream: &[u8]) -> bool {
    let mut r = Trickle { data: stream, step: usize::MAX };
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut r, &mut buf) {
            Ok(()) => match decode::<Request>(&buf) {
                Ok(req) if !harmless(&req.body) => return false,
                _ => {}
            },
            Err(FrameError::TooLarge(n)) if n <= MAX_DISCARD => {}
            Err(_) => return true,
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&step, stream)) = data.split_first() else { return };
    if !only_harmless(stream) {
        return;
    }
    let conn = FakeConn::new(stream.to_vec(), usize::from(step % 64) + 1);
    let output = conn.output.clone();
    let config = Config { allow_power_off: false, ..Config::default() };
    let _ = serve(conn, &config);
    let out = output.lock().unwrap();
    let mut r = Trickle { data: &out, step: usize::MAX };
    let mut buf = Vec::new();
    loop {
        match read_frame(&mut r, &mut buf) {
            Ok(()) => {
                if let Err(e) = decode::<Reply>(&buf) {
                    panic!("the agent sent a reply that does not decode: {e}");
                }
            }
            Err(FrameError::Closed) => break,
            Err(e) => panic!("the agent's output is not a sequence of frames: {e}"),
        }
    }
}
