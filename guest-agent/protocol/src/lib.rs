//! The protocol between the host and ember's guest agent, shared by the agent and its client.
//!
//! The wire format is described in `guest-agent/PROTOCOL.md`. In short: each frame is a
//! `u32` little-endian payload length followed by the payload, a [`Request`] (host → agent)
//! or a [`Reply`] (agent → host) serialized with `postcard`.
//!
//! Why postcard: it is a well-known serde format with a stable, documented wire
//! specification (varint integers, length-prefixed byte strings), it is compact (a 64 KiB
//! output chunk costs 64 KiB + a few bytes, unlike JSON's text arrays of numbers), pulls in
//! almost no code (the agent must stay small in the guest), and decoding untrusted input
//! fails with an error rather than allocating what a hostile length announces.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of the protocol described in PROTOCOL.md. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest frame payload either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// An oversized frame announcing up to this many bytes is read and discarded (the connection
/// keeps being served); a larger length is taken as a desynchronized or hostile stream and
/// the connection is closed after the error reply.
pub const MAX_DISCARD: usize = 64 << 20;
/// How much of a frame's buffer [`read_frame`] allocates before any of its payload arrived;
/// the buffer then at most doubles what has arrived, up to the announced length.
pub const FIRST_STEP: usize = 4096;
/// Size of the stdout/stderr/file-read chunks the agent sends.
pub const CHUNK: usize = 64 << 10;
/// The request id the agent uses for replies about the connection itself (malformed or
/// oversized frames): hosts must not use it for requests.
pub const CONNECTION_ID: u64 = 0;
/// Default AF_VSOCK port the agent listens on.
pub const DEFAULT_PORT: u32 = 1024;

/// A frame from the host. `id` names the request or stream: every reply to it carries the
/// same id, and follow-up frames (stdin, file data, signals) name the exec or write by it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub body: RequestBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Version handshake; answered with [`ReplyBody::Hello`] (or `VersionMismatch`).
    Hello {
        protocol_version: u32,
    },
    /// Answered with [`ReplyBody::Health`].
    Health,
    /// Start a process. Replies: `Started`, then `Stdout`/`Stderr` chunks, then one of
    /// `Exit`/`Killed`/`TimedOut` (or a single `Error`). Detached: `Started` only.
    Exec(ExecRequest),
    /// Data for the stdin of exec `id` (which must have been started with `stdin: true`).
    Stdin {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close the stdin of exec `id`.
    StdinClose,
    /// Send `signal` to exec `id`'s process, or to its whole process group with `group`.
    Signal {
        signal: i32,
        group: bool,
    },
    /// Start writing a file; followed by `FileData` frames with the same id and `FileEnd`.
    /// Answered by `FileWritten` after `FileEnd` (or `Error` at the first failure).
    WriteFile {
        path: String,
        mode: u32,
        create_parents: bool,
    },
    FileData {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    FileEnd,
    /// Answered by `FileData` chunks and `FileEnd { size }`.
    ReadFile {
        path: String,
    },
    /// Answered by `DirEntries` frames, the last with `last: true`.
    ListDir {
        path: String,
    },
    /// Answered by `Stat` (of the path itself, symlinks not followed).
    Stat {
        path: String,
    },
    /// `mkdir` (`-p` with `parents`). Answered by `Ok`.
    Mkdir {
        path: String,
        mode: u32,
        parents: bool,
    },
    /// Remove a file, an empty directory, or (with `recursive`) a tree. Answered by `Ok`.
    Remove {
        path: String,
        recursive: bool,
    },
    /// clock_settime(CLOCK_REALTIME). Answered by `Ok`.
    SetClock {
        secs: i64,
        nanos: u32,
    },
    /// Mix `data` into the kernel RNG crediting `entropy_bits`, then reseed the CRNG.
    AddEntropy {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        entropy_bits: u32,
    },
    /// sethostname. Answered by `Ok`.
    SetHostname {
        name: String,
    },
    /// Sync and power off (only honoured by an agent running as init). Answered by `Ok`.
    PowerOff,
    /// Set the window size of exec `id`'s pty (TIOCSWINSZ; its foreground group gets
    /// SIGWINCH). No reply unless it fails.
    Resize(PtySize),
    /// Connect to `port` on the guest's loopback (127.0.0.1, else ::1). Answered by `Ok`, after
    /// which the connection carries the raw bytes of that TCP connection both ways (no more
    /// frames), or by `Error { DialFailed }` and the connection keeps serving frames. Must be
    /// the first request on its connection other than `Hello` and `Health`.
    Dial {
        port: u16,
    },
    /// Give the guest egress through the sandbox's proxy on the host: the agent listens on
    /// `127.0.0.1:listen_port` and splices each connection, bytes only, into a vsock stream
    /// to the host's port `host_port`; installs `ca_pem` in the guest's trust store; and
    /// gives every later exec the proxy variables. Idempotent (a restored copy of a guest
    /// that had it already listens: only the CA is installed again). Answered by `Ok`.
    EnableEgress(EgressConfig),
}

/// What [`RequestBody::EnableEgress`] sets up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressConfig {
    /// The port on the guest's loopback the proxy variables name.
    pub listen_port: u16,
    /// The vsock port on the host (CID 2) each connection goes to.
    pub host_port: u32,
    /// The certificate (PEM) of the CA the proxy intercepts TLS with.
    pub ca_pem: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    /// argv[0] is looked up in PATH (the child's PATH when `env` sets one).
    pub argv: Vec<String>,
    /// Variables set on top of the agent's environment (or of an empty one with `clear_env`).
    pub env: Vec<(String, String)>,
    pub clear_env: bool,
    pub cwd: Option<String>,
    pub user: Option<User>,
    /// Pipe stdin from `Stdin` frames; otherwise stdin is /dev/null.
    pub stdin: bool,
    /// Kill the process group with SIGKILL after this long and reply `TimedOut`.
    pub timeout_ms: Option<u64>,
    /// Start in its own session with stdio on /dev/null, reply `Started` and forget it; it
    /// outlives the request and the connection.
    pub detach: bool,
    /// Run on a new pty of this size: the child's stdin, stdout and stderr are its slave (and
    /// its controlling terminal), output comes back as `Stdout` only, `Stdin` frames go to the
    /// master whatever `stdin` says, and `StdinClose` sends the terminal's EOF character.
    pub pty: Option<PtySize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum User {
    Id {
        uid: u32,
        gid: u32,
    },
    /// Looked up in the guest's passwd database; supplementary groups from its group file.
    Name(String),
}

impl std::str::FromStr for User {
    type Err = String;

    /// `name`, `uid` (its group the same number) or `uid:gid`.
    fn from_str(spec: &str) -> Result<User, String> {
        let number = |s: &str| s.parse::<u32>().ok();
        match spec.split_once(':') {
            None if spec.is_empty() => Err("an empty user: give a name, a uid or uid:gid".into()),
            None => Ok(number(spec).map_or_else(|| User::Name(spec.into()), |uid| User::Id { uid, gid: uid })),
            Some((uid, gid)) => match (number(uid), number(gid)) {
                (Some(uid), Some(gid)) => Ok(User::Id { uid, gid }),
                _ => Err(format!("user '{spec}': give a name, a uid or uid:gid")),
            },
        }
    }
}

/// A frame from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub body: ReplyBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplyBody {
    Hello {
        protocol_version: u32,
        agent_version: String,
    },
    Health {
        protocol_version: u32,
        agent_version: String,
        uptime_ms: u64,
        running_execs: u32,
    },
    Ok,
    Error {
        kind: ErrorKind,
        message: String,
    },
    Started {
        pid: u32,
    },
    Stdout {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Stderr {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The process exited with `code`.
    Exit {
        code: i32,
    },
    /// The process was killed by `signal` (not by the agent's timeout).
    Killed {
        signal: i32,
    },
    /// The timeout expired; the process group was killed with SIGKILL.
    TimedOut,
    FileData {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    FileEnd {
        size: u64,
    },
    FileWritten {
        size: u64,
    },
    DirEntries {
        entries: Vec<DirEntry>,
        last: bool,
    },
    Stat(FileStat),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The command (or a path) does not exist (ENOENT): `ember exec` maps it to 127.
    NotFound,
    /// The command exists but cannot be executed (EACCES, ENOEXEC, ...): 126.
    CannotExecute,
    PermissionDenied,
    AlreadyExists,
    /// A frame that did not decode (reply id is [`CONNECTION_ID`]).
    MalformedFrame,
    /// A frame longer than [`MAX_FRAME`] (reply id is [`CONNECTION_ID`]).
    FrameTooLarge,
    /// A well-formed request that makes no sense (empty argv, duplicate id, ...).
    InvalidRequest,
    /// A follow-up frame for an id with no running exec or open write.
    UnknownId,
    VersionMismatch,
    Unsupported,
    Io,
    /// A file operation on a directory (EISDIR).
    IsADirectory,
    /// A path whose parent is not a directory (ENOTDIR).
    NotADirectory,
    /// The agent serves as many connections as it will (reply id is [`CONNECTION_ID`]); the
    /// connection is closed after this reply.
    TooManyConnections,
    /// A `Dial` found nothing accepting connections on the port (the message names it).
    DialFailed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (the low 12 bits of st_mode).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

/// Errors of the codec.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("the stream ended in the middle of a frame")]
    Truncated,
}

/// Serializes one message into a frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; 4];
    buf = postcard::to_extend(msg, buf).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(buf)
}

/// Decodes one payload; trailing bytes make it malformed.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(payload) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Writes one message as a frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf)?;
    Ok(())
}

/// Reads one frame's payload into `buf` (which then holds exactly the payload; its memory is
/// at most twice what has arrived plus [`FIRST_STEP`], whatever length the frame announces,
/// beyond what it held already). An oversized frame whose length is at most
/// [`MAX_DISCARD`] is consumed (discarded in bounded chunks) and reported as `TooLarge`, so
/// the stream stays in sync; a longer one is reported as `TooLarge` without consuming it
/// (the caller should close the connection). EOF before a frame starts is `Closed`.
pub fn read_frame<R: Read>(r: &mut R, buf: &mut Vec<u8>) -> Result<(), FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        if len <= MAX_DISCARD {
            let mut scratch = [0u8; 8192];
            let mut left = len;
            while left > 0 {
                let n = left.min(scratch.len());
                read_exact(r, &mut scratch[..n])?;
                left -= n;
            }
        }
        return Err(FrameError::TooLarge(len));
    }
    buf.clear();
    // The buffer grows with what arrives (doubling from FIRST_STEP), so that a peer that
    // announces a large frame and sends little of it makes the reader hold little; only
    // the room about to be read into is zeroed.
    let mut filled = 0;
    while filled < len {
        if filled == buf.len() {
            let step = filled.max(FIRST_STEP).min(len - filled);
            buf.reserve_exact(step);
            buf.resize(filled + step, 0);
        }
        match r.read(&mut buf[filled..]) {
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(FrameError::Truncated),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })
}

/// The request id at the start of a payload that did not decode as a whole (an unknown
/// variant from a newer host, say), so that the error reply can name the request.
pub fn leading_id(payload: &[u8]) -> Option<u64> {
    postcard::take_from_bytes::<u64>(payload).ok().map(|(id, _)| id)
}

/// Reads and decodes one message.
pub fn read_message<R: Read, T: for<'a> Deserialize<'a>>(r: &mut R) -> Result<T, FrameError> {
    let mut buf = Vec::new();
    read_frame(r, &mut buf)?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_names_uids_or_uid_gid_pairs() {
        assert_eq!("ada".parse(), Ok(User::Name("ada".into())));
        assert_eq!("1000".parse(), Ok(User::Id { uid: 1000, gid: 1000 }));
        assert_eq!("1000:50".parse(), Ok(User::Id { uid: 1000, gid: 50 }));
        for bad in ["", "ada:x", ":1", "1:"] {
            assert!(bad.parse::<User>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roundtrip() {
        let req = Request {
            id: 7,
            body: RequestBody::Exec(ExecRequest {
                argv: vec!["echo".into(), "hi".into()],
                timeout_ms: Some(5),
                ..Default::default()
            }),
        };
        let frame = encode(&req).unwrap();
        assert_eq!(
            u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize,
            frame.len() - 4
        );
        let back: Request = read_message(&mut &frame[..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn an_egress_request_round_trips_behind_the_older_variants() {
        let req = Request {
            id: 9,
            body: RequestBody::EnableEgress(EgressConfig {
                listen_port: 3128,
                host_port: 3128,
                ca_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            }),
        };
        let frame = encode(&req).unwrap();
        assert_eq!(read_message::<_, Request>(&mut &frame[..]).unwrap(), req);
        // Appended: every older request keeps its variant index (Dial is 19), so an agent
        // from before it reads the new one as an unknown variant under its own id.
        let payload = &frame[4..];
        assert_eq!(leading_id(payload), Some(9));
        assert_eq!(payload[1], 20, "EnableEgress is variant 20");
        let dial = encode(&Request { id: 9, body: RequestBody::Dial { port: 1 } }).unwrap();
        assert_eq!(dial[5], 19);
    }

    #[test]
    fn chunk_overhead_is_small() {
        let r = Reply {
            id: u64::MAX,
            body: ReplyBody::Stdout {
                data: vec![1; CHUNK],
            },
        };
        assert!(encode(&r).unwrap().len() < CHUNK + 32);
    }

    #[test]
    fn malformed_and_oversized() {
        assert!(matches!(
            decode::<Request>(&[0xff; 8]),
            Err(FrameError::Malformed(_))
        ));
        let mut frame = encode(&Request {
            id: 1,
            body: RequestBody::Health,
        })
        .unwrap();
        frame.push(0);
        frame[0] += 1;
        assert!(matches!(
            read_message::<_, Request>(&mut &frame[..]),
            Err(FrameError::Malformed(_))
        ));
        // An oversized frame is consumed, and the next frame reads fine.
        let mut s = ((MAX_FRAME + 10) as u32).to_le_bytes().to_vec();
        s.extend(vec![0u8; MAX_FRAME + 10]);
        s.extend(
            encode(&Request {
                id: 2,
                body: RequestBody::Health,
            })
            .unwrap(),
        );
        let mut r = &s[..];
        assert!(matches!(
            read_message::<_, Request>(&mut r),
            Err(FrameError::TooLarge(_))
        ));
        let next: Request = read_message(&mut r).unwrap();
        assert_eq!(next.id, 2);
        // An absurd length is not consumed.
        let s = u32::MAX.to_le_bytes();
        assert!(matches!(
            read_message::<_, Request>(&mut &s[..]),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            read_message::<_, Request>(&mut &[][..]),
            Err(FrameError::Closed)
        ));
        // A stream that ends inside the length or the payload.
        assert!(matches!(
            read_message::<_, Request>(&mut &[5, 0][..]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_message::<_, Request>(&mut &[5, 0, 0, 0, 1, 2][..]),
            Err(FrameError::Truncated)
        ));
    }

    /// A peer that hands over at most `step` bytes per read, then ends.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.step).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_frame_buffer_grows_with_what_arrives() {
        // 1 MiB announced, 10 bytes sent: the reader holds one small step, not the megabyte.
        let mut stream = (MAX_FRAME as u32).to_le_bytes().to_vec();
        stream.extend([7u8; 10]);
        let mut buf = Vec::new();
        let got = read_frame(&mut Trickle { data: &stream, step: 3 }, &mut buf);
        assert!(matches!(got, Err(FrameError::Truncated)), "{got:?}");
        assert!(buf.capacity() <= FIRST_STEP, "{} bytes held for 10 received", buf.capacity());
        // Half of it sent, in small reads: at most twice that is held.
        let half = MAX_FRAME / 2;
        stream.extend(vec![7u8; half - 10]);
        let got = read_frame(&mut Trickle { data: &stream, step: 1000 }, &mut buf);
        assert!(matches!(got, Err(FrameError::Truncated)), "{got:?}");
        assert!(buf.capacity() <= 2 * half + FIRST_STEP, "{} bytes held for {half} received", buf.capacity());
        // A whole frame, in reads of every size, comes out exact.
        let payload = postcard::to_stdvec(&Request { id: 9, body: RequestBody::FileData { data: vec![5; 300_000] } }).unwrap();
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend(&payload);
        for step in [1, 7, 4096, 65536, usize::MAX] {
            let mut buf = Vec::new();
            read_frame(&mut Trickle { data: &frame, step }, &mut buf).unwrap();
            assert_eq!(buf, payload, "in reads of {step} bytes");
        }
    }

    #[test]
    fn leading_id_of_an_unknown_variant() {
        let mut payload = postcard::to_stdvec(&300u64).unwrap();
        payload.extend([0xc8, 0x01]);
        assert!(decode::<Request>(&payload).is_err());
        assert_eq!(leading_id(&payload), Some(300));
        assert_eq!(leading_id(&[0xff]), None);
    }
}
