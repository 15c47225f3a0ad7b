//! Exec: spawn (on pipes or a pty), supervise (stream output, timeout, exit status).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::egress::ExecEnv;
use crate::server::{plain, spawn_thread, ExecHandle, Execs, Out, RUNNING_EXECS};
use crate::sys::{self, Reaper};
use agent_protocol::{ErrorKind, ExecRequest, ReplyBody, User, CHUNK};
use rustix::event::{poll, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::process::{setsid, Gid, Signal, Uid, WaitStatus};
use rustix::thread::{set_thread_gid, set_thread_groups, set_thread_uid};
use rustix::time::Timespec;

/// How long after the process exits its pipes are still drained: descendants that escaped
/// the process group (or were started with `&` and keep running) may hold them open; their
/// later output is not reported.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
const STDIN_QUEUE: usize = 8;

fn spawn_error_kind(e: &io::Error) -> ErrorKind {
    match Errno::from_io_error(e) {
        Some(Errno::NOENT) => ErrorKind::NotFound,
        Some(Errno::ACCESS) | Some(Errno::NOEXEC) | Some(Errno::ISDIR) | Some(Errno::NOTDIR)
        | Some(Errno::TXTBSY) | Some(Errno::LIBBAD) => ErrorKind::CannotExecute,
        Some(Errno::PERM) => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    }
}

/// Why `req`'s command did not start, as a shell says it: `NAME: command not found` for a
/// bare name found nowhere on the command's PATH, else the program and the reason.
fn spawn_error_message(req: &ExecRequest, e: &io::Error) -> String {
    let program = &req.argv[0];
    if e.kind() == io::ErrorKind::NotFound && !program.contains('/') && !on_path(req, program) {
        return format!("{program}: command not found");
    }
    format!("{program}: {}", plain(e))
}

/// Whether `program` is a file in a directory of the command's PATH (its request's, else the
/// agent's): if it is, ENOENT came from elsewhere (a `#!` interpreter that is missing).
fn on_path(req: &ExecRequest, program: &str) -> bool {
    let inherited = if req.clear_env { None } else { std::env::var_os("PATH") };
    let path = req.env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.into()).or(inherited);
    path.is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Starts exec `id`; `egress` is what egress adds to its environment (under its own `env`).
pub(crate) fn start(id: u64, req: ExecRequest, out: &Arc<Out>, execs: &Execs, egress: &ExecEnv) {
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
        Some(User::Id { uid, gid }) => {
            // Unchecked: an id of -1 goes to the kernel, which refuses it, instead of
            // tripping `from_raw`'s debug assertion.
            let gid = Gid::from_raw_unchecked(*gid);
            Some((Uid::from_raw_unchecked(*uid), gid, vec![gid]))
        }
        Some(User::Name(name)) => match sys::lookup_user(name) {
            Ok(u) => Some(u),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                out.error(id, ErrorKind::InvalidRequest, format!("no user {name} in the sandbox"));
                return;
            }
            Err(e) => {
                out.error(id, ErrorKind::InvalidRequest, format!("user {name}: {}", plain(&e)));
                return;
            }
        },
    };
    if let Some(cwd) = &req.cwd {
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                out.error(id, ErrorKind::InvalidRequest, format!("{cwd} in the sandbox is not a directory"));
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                out.error(id, ErrorKind::InvalidRequest, format!("no directory {cwd} in the sandbox"));
                return;
            }
            Err(e) => {
                let message = format!("cannot use {cwd} in the sandbox as the working directory: {}", plain(&e));
                out.error(id, ErrorKind::InvalidRequest, message);
                return;
            }
        }
    }

    let pty = match req.pty.filter(|_| !req.detach) {
        None => None,
        Some(size) => match sys::open_pty(size) {
            Ok(p) => Some(p),
            Err(e) => {
                out.io_error(id, "open a pty", &e);
                return;
            }
        },
    };

    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..]);
    if req.clear_env {
        cmd.env_clear();
    }
    // Even with `clear_env`: the way out is the proxy whatever else an exec drops.
    egress.apply(&mut cmd, &req.env);
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    if let Some((_, slave)) = &pty {
        let stdio = || slave.try_clone().map(Stdio::from);
        match (stdio(), stdio(), stdio()) {
            (Ok(i), Ok(o), Ok(e)) => {
                cmd.stdin(i).stdout(o).stderr(e);
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                out.io_error(id, "dup the pty", &e);
                return;
            }
        }
    } else {
        let piped = |yes: bool| if yes { Stdio::piped() } else { Stdio::null() };
        cmd.stdin(piped(req.stdin && !req.detach));
        cmd.stdout(piped(!req.detach));
        cmd.stderr(piped(!req.detach));
    }
    let controlling_tty = pty.is_some();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // work is allowed: it makes raw system calls through rustix and nothing else (no
    // allocation, no locks; an error becomes an io::Error without allocating), on data
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session and process group: a timeout or a dropped connection kills the
            // whole tree with one killpg, and a detached process survives the agent's group.
            setsid()?;
            // std has put the slave on fds 0-2 by now.
            if controlling_tty {
                sys::make_controlling_tty()?;
            }
            // The child of a fork has one thread, so the thread's credentials are the
            // process's: libc's broadcast of them to other threads has nothing to do.
            if let Some((uid, gid, groups)) = &user {
                set_thread_groups(groups)?;
                set_thread_gid(*gid)?;
                set_thread_uid(*uid)?;
            }
            Ok(())
        });
    }

    let guard = Reaper::get().spawn_locked();
    let spawned = cmd.spawn();
    // The command holds copies of the slave: the master reads EOF (EIO) only once every copy
    // outside the child's tree is closed.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            drop(guard);
            out.error(id, spawn_error_kind(&e), spawn_error_message(&req, &e));
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

    let (sources, stdin, pty_master, eof) = match pty {
        Some((master, slave)) => {
            drop(slave);
            let eof = sys::eof_char(&master);
            let dup = |m: &OwnedFd| m.try_clone().map_err(|e| tracing::warn!("exec {id}: dup pty master: {e}")).ok();
            let stdin = dup(&master).map(File::from);
            let handle = dup(&master);
            (vec![(File::from(master), Channel::Stdout)], stdin, handle, Some(eof))
        }
        None => {
            let mut sources = Vec::with_capacity(2);
            if let Some(o) = child.stdout.take() {
                sources.push((File::from(OwnedFd::from(o)), Channel::Stdout));
            }
            if let Some(e) = child.stderr.take() {
                sources.push((File::from(OwnedFd::from(e)), Channel::Stderr));
            }
            let stdin = child.stdin.take().map(|s| File::from(OwnedFd::from(s)));
            (sources, stdin, None, None)
        }
    };
    drop(child);

    let stdin_tx = stdin.and_then(|mut stdin| {
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
    // Registered before `Started` goes out, so that a follow-up frame the host sends as soon
    // as it sees `Started` finds the exec.
    execs.lock().unwrap().insert(
        id,
        ExecHandle {
            pid,
            stdin: stdin_tx,
            pty: pty_master,
            eof,
        },
    );

    let timeout = req.timeout_ms.map(Duration::from_millis);
    let (out2, execs2) = (out.clone(), execs.clone());
    let r = spawn_thread("exec", 128 << 10, move || {
        // Sent by the supervisor, so that the host sees `Started` before any output and a
        // failure to start the supervisor is reported as the exec's only reply.
        out2.send(id, ReplyBody::Started { pid });
        supervise(id, pid, pidfd, status_rx, sources, timeout, &out2, &execs2)
    });
    if let Err(e) = r {
        // Without a supervisor nobody would report or reap it: kill it and say so.
        let _ = sys::kill(pid, true, Signal::KILL.as_raw());
        execs.lock().unwrap().remove(&id);
        RUNNING_EXECS.fetch_sub(1, Ordering::Relaxed);
        out.io_error(id, "spawn supervisor thread", &e);
    }
}

/// Where the bytes read from one of the child's output fds go.
#[derive(Clone, Copy)]
enum Channel {
    Stdout,
    Stderr,
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    id: u64,
    pid: u32,
    pidfd: Option<OwnedFd>,
    status_rx: Receiver<WaitStatus>,
    sources: Vec<(File, Channel)>,
    timeout: Option<Duration>,
    out: &Out,
    execs: &Execs,
) {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut buf = vec![0u8; CHUNK];
    let mut open = vec![true; sources.len()];
    let mut status: Option<WaitStatus> = None;
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
        if status.is_some() && !open.contains(&true) {
            break;
        }
        let now = Instant::now();
        if let (Some(d), None, false) = (deadline, status, timed_out) {
            if now >= d {
                let _ = sys::kill(pid, true, Signal::KILL.as_raw());
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
        for (i, (f, _)) in sources.iter().enumerate() {
            if open[i] {
                fds.push(PollFd::new(f, PollFlags::IN));
                which.push(Some(i));
            }
        }
        if let (Some(p), None) = (&pidfd, status) {
            fds.push(PollFd::new(p, PollFlags::IN));
            which.push(None);
        }
        // Every wait fits a timespec: the longest is a u64 of milliseconds.
        let timeout = wait.and_then(|w| Timespec::try_from(w).ok());
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(e) => {
                tracing::warn!("exec {id}: poll: {}", io::Error::from(e));
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        for (pfd, &w) in fds.iter().zip(&which) {
            if pfd.revents().is_empty() {
                continue;
            }
            match w {
                Some(i) => {
                    // Through a shared borrow (`&File` reads too): `fds` still borrows them.
                    let (mut f, channel) = (&sources[i].0, sources[i].1);
                    match f.read(&mut buf) {
                        Ok(0) => open[i] = false,
                        Ok(n) => {
                            let data = buf[..n].to_vec();
                            let body = match channel {
                                Channel::Stdout => ReplyBody::Stdout { data },
                                Channel::Stderr => ReplyBody::Stderr { data },
                            };
                            // Blocks while the host is slow; that is the backpressure.
                            out.send(id, body);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        // EIO is a pty master's EOF: every slave fd is closed.
                        Err(_) => open[i] = false,
                    }
                }
                None => {
                    // The process exited; the reaper delivers its status momentarily.
                    if let Ok(s) = status_rx.recv() {
                        status = Some(s);
                    }
                }
            }
        }
    }
    RUNNING_EXECS.fetch_sub(1, Ordering::Relaxed);
    let body = if timed_out {
        ReplyBody::TimedOut
    } else if let Some(signal) = status.and_then(WaitStatus::terminating_signal) {
        ReplyBody::Killed { signal }
    } else {
        ReplyBody::Exit {
            code: status.and_then(WaitStatus::exit_status).unwrap_or(0),
        }
    };
    out.send(id, body);
}
