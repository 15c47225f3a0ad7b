//! Exec: spawn, supervise (stream output, timeout, exit status).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStderr, ChildStdout, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::server::{spawn_thread, ExecHandle, Execs, Out, RUNNING_EXECS};
use crate::sys::{self, Reaper};
use crate::{ErrorKind, ExecRequest, ReplyBody, User, CHUNK};

/// How long after the process exits its pipes are still drained: descendants that escaped
/// the process group (or were started with `&` and keep running) may hold them open; their
/// later output is not reported.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
const STDIN_QUEUE: usize = 8;

fn spawn_error_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) | Some(libc::ENOTDIR)
        | Some(libc::ETXTBSY) | Some(libc::ELIBBAD) => ErrorKind::CannotExecute,
        Some(libc::EPERM) => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    }
}

pub(crate) fn start(id: u64, req: ExecRequest, out: &Arc<Out>, execs: &Execs) {
    if req.argv.is_empty() {
        out.error(id, ErrorKind::InvalidRequest, "empty argv");
        return;
    }
    if execs.lock().unwrap().contains_key(&id) {
        out.error(
            id,
            ErrorKind::InvalidRequest,
            "an exec with this id is running",
        );
        return;
    }
    let user = match &req.user {
        None => None,
        Some(User::Id { uid, gid }) => Some((*uid, *gid, vec![*gid])),
        Some(User::Name(name)) => match sys::lookup_user(name) {
            Ok(u) => Some(u),
            Err(e) => {
                out.error(id, ErrorKind::InvalidRequest, format!("user {name:?}: {e}"));
                return;
            }
        },
    };
    if let Some(cwd) = &req.cwd {
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                out.error(
                    id,
                    ErrorKind::InvalidRequest,
                    format!("cwd {cwd}: not a directory"),
                );
                return;
            }
            Err(e) => {
                out.error(id, ErrorKind::InvalidRequest, format!("cwd {cwd}: {e}"));
                return;
            }
        }
    }

    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..]);
    if req.clear_env {
        cmd.env_clear();
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let piped = |yes: bool| if yes { Stdio::piped() } else { Stdio::null() };
    cmd.stdin(piped(req.stdin && !req.detach));
    cmd.stdout(piped(!req.detach));
    cmd.stderr(piped(!req.detach));
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group: a timeout or a dropped connection kills the
            // whole tree with one killpg, and a detached process survives the agent's group.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid, groups)) = &user {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }

    let guard = Reaper::get().spawn_locked();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(guard);
            out.error(id, spawn_error_kind(&e), format!("{}: {e}", req.argv[0]));
            return;
        }
    };
    let pid = child.id();
    if req.detach {
        guard.forget();
        out.send(id, ReplyBody::Started { pid });
        return;
    }
    let status_rx = guard.register(pid);
    RUNNING_EXECS.fetch_add(1, Ordering::Relaxed);
    let pidfd = sys::pidfd_open(pid);

    let stdin_tx = child.stdin.take().and_then(|mut stdin| {
        let (tx, rx) = sync_channel::<Vec<u8>>(STDIN_QUEUE);
        let r = spawn_thread("exec-stdin", 64 << 10, move || {
            for data in rx {
                if stdin.write_all(&data).is_err() {
                    break; // child closed its stdin; later data is dropped
                }
            }
        });
        r.ok().map(|()| tx)
    });
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    drop(child);
    out.send(id, ReplyBody::Started { pid });
    execs.lock().unwrap().insert(
        id,
        ExecHandle {
            pid,
            stdin: stdin_tx,
        },
    );

    let timeout = req.timeout_ms.map(Duration::from_millis);
    let (out2, execs2) = (out.clone(), execs.clone());
    let r = spawn_thread("exec", 128 << 10, move || {
        supervise(
            id, pid, pidfd, status_rx, stdout, stderr, timeout, &out2, &execs2,
        )
    });
    if let Err(e) = r {
        // Without a supervisor nobody would report or reap it: kill it and say so.
        let _ = sys::kill(pid, true, libc::SIGKILL);
        execs.lock().unwrap().remove(&id);
        RUNNING_EXECS.fetch_sub(1, Ordering::Relaxed);
        out.io_error(id, "spawn supervisor thread", &e);
    }
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    id: u64,
    pid: u32,
    pidfd: Option<OwnedFd>,
    status_rx: Receiver<libc::c_int>,
    mut stdout: ChildStdout,
    mut stderr: ChildStderr,
    timeout: Option<Duration>,
    out: &Out,
    execs: &Execs,
) {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut buf = vec![0u8; CHUNK];
    let mut open = [true, true];
    let mut status: Option<libc::c_int> = None;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    loop {
        if status.is_none() {
            if let Ok(s) = status_rx.try_recv() {
                status = Some(s);
            }
        }
        if status.is_some() && exited_at.is_none() {
            exited_at = Some(Instant::now());
            // Reaped: the pid may be reused, so signals must no longer reach it.
            execs.lock().unwrap().remove(&id);
        }
        if status.is_some() && !open[0] && !open[1] {
            break;
        }
        let now = Instant::now();
        if let (Some(d), None, false) = (deadline, status, timed_out) {
            if now >= d {
                let _ = sys::kill(pid, true, libc::SIGKILL);
                timed_out = true;
            }
        }
        // How long to poll.
        let mut wait: Option<Duration> = None;
        if let Some(t) = exited_at {
            let left = (t + DRAIN_GRACE).saturating_duration_since(now);
            if left.is_zero() {
                break;
            }
            wait = Some(left);
        } else {
            if pidfd.is_none() || timed_out {
                // No pidfd to wake on (old kernel), or the kill was sent and the reaper is
                // about to deliver the status: poll it.
                wait = Some(Duration::from_millis(10));
            }
            if let (Some(d), false) = (deadline, timed_out) {
                let left = d.saturating_duration_since(now);
                wait = Some(wait.map_or(left, |w| w.min(left)));
            }
        }
        let mut fds = Vec::with_capacity(3);
        let mut which = Vec::with_capacity(3);
        for (i, fd) in [stdout.as_raw_fd(), stderr.as_raw_fd()].into_iter().enumerate() {
            if open[i] {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
                which.push(i);
            }
        }
        if let (Some(p), None) = (&pidfd, status) {
            fds.push(libc::pollfd {
                fd: p.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            which.push(2);
        }
        let ms = wait.map_or(-1, |w| {
            w.as_millis().clamp(1, i32::MAX as u128) as libc::c_int
        });
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::warn!("exec {id}: poll: {e}");
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        for (pfd, &w) in fds.iter().zip(&which) {
            if pfd.revents == 0 {
                continue;
            }
            match w {
                0 | 1 => {
                    let r = if w == 0 {
                        stdout.read(&mut buf)
                    } else {
                        stderr.read(&mut buf)
                    };
                    match r {
                        Ok(0) => open[w] = false,
                        Ok(n) => {
                            let data = buf[..n].to_vec();
                            let body = if w == 0 {
                                ReplyBody::Stdout { data }
                            } else {
                                ReplyBody::Stderr { data }
                            };
                            // Blocks while the host is slow; that is the backpressure.
                            out.send(id, body);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => open[w] = false,
                    }
                }
                _ => {
                    // The process exited; the reaper delivers its status momentarily.
                    if let Ok(s) = status_rx.recv() {
                        status = Some(s);
                    }
                }
            }
        }
    }
    RUNNING_EXECS.fetch_sub(1, Ordering::Relaxed);
    let s = status.unwrap_or(0);
    let body = if timed_out {
        ReplyBody::TimedOut
    } else if libc::WIFSIGNALED(s) {
        ReplyBody::Killed {
            signal: libc::WTERMSIG(s),
        }
    } else {
        ReplyBody::Exit {
            code: libc::WEXITSTATUS(s),
        }
    };
    out.send(id, body);
}
