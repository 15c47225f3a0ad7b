//! Each sandbox's guest made a machine of its own. A guest restored from a snapshot resumes
//! with the snapshotted guest's kernel RNG state, wall clock and hostname: every copy of one
//! snapshot would draw the same random numbers (keys, nonces, Python's `random` seed), live at
//! the moment the snapshot was taken, and carry its name. So once its agent answers, a sandbox
//! gets fresh entropy from the host, the host's time and its own name; after a cold boot too,
//! so that every sandbox's hostname is its name.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::paths::VSOCK_SOCKET;
use super::{SandboxError, Store};

/// Enough for the guest kernel to reseed its CRNG from this alone (256 bits, credited in full:
/// they come from the host's own CRNG).
const ENTROPY_BYTES: usize = 32;

/// How long the agent has to answer each step; it answers at once unless the guest is stuck.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Fills `buf` from the host kernel's CRNG.
pub(super) fn host_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most the given length into the rest of the buffer.
        let n = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        filled += n as usize;
    }
    Ok(())
}

impl Store {
    /// Gives the guest of sandbox `name`, whose agent answers, its own identity: reseeds its
    /// kernel RNG with fresh host entropy, sets its wall clock to the host's, and its hostname
    /// to `name`. Every start does this; a sandbox made some other way (a fork) calls it
    /// before it is handed out.
    pub fn fix_identity(&self, name: &str) -> Result<(), SandboxError> {
        self.ready_record(name)?;
        let uds = self.dir(name).join(VSOCK_SOCKET);
        let mut agent = agent_client::connect(&uds, agent_protocol::DEFAULT_PORT, STEP_TIMEOUT)
            .map_err(|source| SandboxError::Identity { name: name.to_string(), source })?;
        fix(&mut agent, name)
    }
}

/// [`Store::fix_identity`] over a connection to the agent already open.
pub(super) fn fix(agent: &mut UnixStream, name: &str) -> Result<(), SandboxError> {
    let failed = |source| SandboxError::Identity { name: name.to_string(), source };
    agent.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| failed(e.into()))?;
    let mut seed = [0u8; ENTROPY_BYTES];
    host_random(&mut seed).map_err(SandboxError::HostRandom)?;
    let identity = agent_client::Identity { entropy: &seed, entropy_bits: 8 * ENTROPY_BYTES as u32, hostname: name };
    agent_client::set_identity(agent, &identity).map_err(failed)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::time::{SystemTime, UNIX_EPOCH};

    use agent_protocol::{decode, read_frame, write_frame, ErrorKind, Reply, ReplyBody, Request, RequestBody};

    use super::*;
    use crate::paths::RECORD;
    use crate::record::Record;

    /// A sandbox `name` in `store` whose vsock socket leads to an agent that answers every
    /// request with `answer(request)` and reports each request to the returned channel. (The
    /// real agent would set this host's clock.)
    fn scripted_sandbox(
        store: &Store,
        name: &str,
        answer: fn(&RequestBody) -> ReplyBody,
    ) -> std::sync::mpsc::Receiver<RequestBody> {
        let dir = store.dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let record =
            Record {
            name: name.into(),
            pid: i32::MAX,
            cid: 3,
            image: "/i".into(),
            mem_mib: 256,
            vcpus: 1,
            created: 1,
            vmm_socket: None,
            jail: None,
            cgroup: None,
            disk_dirs: Vec::new(),
            phase: crate::record::Phase::Ready,
            starter: None,
            lifetime: None,
            origin: None,
            egress: None,
        };
        std::fs::write(dir.join(RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        let listener = UnixListener::bind(dir.join(VSOCK_SOCKET)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 1024\n");
            s.write_all(b"OK 1073741824\n").unwrap();
            let mut buf = Vec::new();
            while read_frame(&mut s, &mut buf).is_ok() {
                let request: Request = decode(&buf).unwrap();
                let reply = Reply { id: request.id, body: answer(&request.body) };
                // Reported before it is answered, so the caller sees it once its call returns.
                tx.send(request.body).unwrap();
                // The client stops reading at the first refusal and may be gone already.
                if write_frame(&mut s, &reply).is_err() {
                    break;
                }
            }
        });
        rx
    }

    #[test]
    fn a_guest_gets_fresh_entropy_then_the_hosts_time_then_its_name() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-identity-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        let seen = scripted_sandbox(&store, "sb-1", |_| ReplyBody::Ok);
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        store.fix_identity("sb-1").unwrap();
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let seen: Vec<RequestBody> = seen.try_iter().collect();
        let [
            RequestBody::AddEntropy { data, entropy_bits: 256 },
            RequestBody::SetClock { secs, nanos },
            RequestBody::SetHostname { name },
        ] = &seen[..]
        else {
            panic!("{seen:?}")
        };
        assert!(data.len() == 32 && data.iter().any(|&b| b != 0), "{data:?}");
        let set = Duration::new(*secs as u64, *nanos);
        assert!(before <= set && set <= after, "{set:?} not within {before:?}..{after:?}");
        assert_eq!(name, "sb-1");
        // Two sandboxes never get the same bytes.
        let other = scripted_sandbox(&store, "sb-2", |_| ReplyBody::Ok);
        store.fix_identity("sb-2").unwrap();
        assert!(matches!(other.try_iter().next(), Some(RequestBody::AddEntropy { data: d, .. }) if d != *data));
    }

    #[test]
    fn a_refusal_is_an_error_naming_the_sandbox_and_the_step() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-identity-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        let seen = scripted_sandbox(&store, "sb-1", |r| match r {
            RequestBody::SetClock { .. } => {
                ReplyBody::Error { kind: ErrorKind::PermissionDenied, message: "clock_settime: denied".into() }
            }
            _ => ReplyBody::Ok,
        });
        let err = store.fix_identity("sb-1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "sandbox sb-1: cannot give the guest its own identity: the agent could not set the clock: \
             clock_settime: denied"
        );
        // Sent together, in one round trip; the start fails all the same. The client returns at
        // the refusal, so the fake agent may not have read the last request yet: wait for it.
        let seen: Vec<RequestBody> =
            (0..3).map(|_| seen.recv_timeout(Duration::from_secs(10)).expect("all three requests sent")).collect();
        assert!(matches!(seen[2], RequestBody::SetHostname { .. }), "{seen:?}");
        assert!(matches!(store.fix_identity("sb-9"), Err(SandboxError::NotFound(_))));
    }
}
