//! Native tests of the agent, run as root on the host (see common/mod.rs): exec: exit
//! codes, signals, streams, stdin, timeouts, concurrency, ptys, users.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use agent_protocol::{write_frame, ErrorKind, ExecRequest, PtySize, ReplyBody, Request, RequestBody};
use rustix::process::{kill_process, Pid, Signal};

use common::*;

#[test]
fn exit_codes_and_signals() {
    let mut c = Client::new();
    let (out, err, end) = c.exec(1, cmd(&["echo", "hello"]));
    assert_eq!(
        (out.as_slice(), err.as_slice(), end),
        (&b"hello\n"[..], &b""[..], ReplyBody::Exit { code: 0 })
    );
    assert_eq!(c.exec(2, sh("exit 3")).2, ReplyBody::Exit { code: 3 });
    assert_eq!(
        c.exec(3, sh("kill -9 $$")).2,
        ReplyBody::Killed { signal: 9 }
    );
    // env and cwd
    let mut r = sh("echo $FOO; pwd");
    r.env = vec![("FOO".into(), "bar".into())];
    r.cwd = Some("/".into());
    assert_eq!(c.exec(4, r).0, b"bar\n/\n");
    // signal a running exec
    c.send(5, RequestBody::Exec(cmd(&["sleep", "100"])));
    assert!(matches!(c.recv().body, ReplyBody::Started { .. }));
    c.send(5, RequestBody::Signal { signal: 15, group: false });
    // The signal may end the process, and its end be reported, before the Ok is written.
    let mut replies = [c.recv(), c.recv()].map(|r| {
        assert_eq!(r.id, 5, "{r:?}");
        r.body
    });
    replies.sort_by_key(|b| matches!(b, ReplyBody::Ok));
    assert_eq!(replies, [ReplyBody::Killed { signal: 15 }, ReplyBody::Ok]);
}

#[test]
fn stdout_and_stderr_apart() {
    let mut c = Client::new();
    let (out, err, end) = c.exec(1, sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2"));
    assert_eq!(out, b"out1\nout2\n");
    assert_eq!(err, b"err1\nerr2\n");
    assert_eq!(end, ReplyBody::Exit { code: 0 });
}

#[test]
fn stdin_piped_through() {
    let mut c = Client::new();
    let data = pseudo_random(1 << 20, 7);
    let mut r = cmd(&["cat"]);
    r.stdin = true;
    c.send(1, RequestBody::Exec(r));
    // Write stdin from another thread while reading output here (the pipe buffers would
    // otherwise fill up both ways).
    let mut w = c.s.try_clone().unwrap();
    let chunks = data.clone();
    let writer = std::thread::spawn(move || {
        for ch in chunks.chunks(100_000) {
            write_frame(
                &mut w,
                &Request {
                    id: 1,
                    body: RequestBody::Stdin { data: ch.to_vec() },
                },
            )
            .unwrap();
        }
        write_frame(
            &mut w,
            &Request {
                id: 1,
                body: RequestBody::StdinClose,
            },
        )
        .unwrap();
    });
    let (out, _, end) = c.collect(1);
    writer.join().unwrap();
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert_eq!(fnv(&out), fnv(&data));
    assert_eq!(out.len(), data.len());
}

#[test]
fn timeout_kills_process_tree() {
    let mut c = Client::new();
    let mut r = sh("sleep 100 & echo $!; sleep 100");
    r.timeout_ms = Some(300);
    let t = Instant::now();
    let (out, _, end) = c.exec(1, r);
    assert_eq!(end, ReplyBody::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(5));
    let grandchild: u32 = String::from_utf8(out).unwrap().trim().parse().unwrap();
    let t = Instant::now();
    while alive(grandchild) {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "grandchild {grandchild} still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn fifty_concurrent_execs() {
    let mut c = Client::new();
    for i in 1..=50u64 {
        c.send(
            i,
            RequestBody::Exec(sh(&format!("sleep 0.2; echo {i}; exit {}", i % 7))),
        );
    }
    let mut outs: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut done = HashMap::new();
    while done.len() < 50 {
        let r = c.recv();
        match r.body {
            ReplyBody::Stdout { data } => outs.entry(r.id).or_default().extend(data),
            ReplyBody::Started { .. } => {}
            b if is_terminal(&b) => {
                assert!(done.insert(r.id, b).is_none());
            }
            b => panic!("{b:?}"),
        }
    }
    for i in 1..=50u64 {
        assert_eq!(
            done[&i],
            ReplyBody::Exit {
                code: (i % 7) as i32
            }
        );
        assert_eq!(outs[&i], format!("{i}\n").into_bytes());
    }
}

#[test]
fn endless_output_does_not_starve_other_execs() {
    let mut c = Client::new();
    c.send(1, RequestBody::Exec(cmd(&["yes"])));
    c.send(2, RequestBody::Exec(sh("sleep 0.1; echo done")));
    let mut flooded = 0usize;
    let mut out2 = Vec::new();
    loop {
        let r = c.recv();
        match (r.id, r.body) {
            (1, ReplyBody::Stdout { data }) => flooded += data.len(),
            (1, ReplyBody::Started { .. }) | (2, ReplyBody::Started { .. }) => {}
            (2, ReplyBody::Stdout { data }) => out2.extend(data),
            (2, ReplyBody::Exit { code: 0 }) => break,
            (id, b) => panic!("{id} {b:?}"),
        }
    }
    assert_eq!(out2, b"done\n");
    assert!(flooded > 0);
    c.send(
        1,
        RequestBody::Signal {
            signal: 9,
            group: true,
        },
    );
    loop {
        match c.recv().body {
            ReplyBody::Killed { signal: 9 } => break,
            ReplyBody::Stdout { .. } | ReplyBody::Ok => {}
            b => panic!("{b:?}"),
        }
    }
}

#[test]
fn detached_process_outlives_request() {
    let mut c = Client::new();
    let mut r = cmd(&["sleep", "30"]);
    r.detach = true;
    let pid = match c.call(1, RequestBody::Exec(r)) {
        ReplyBody::Started { pid } => pid,
        b => panic!("{b:?}"),
    };
    assert!(matches!(
        c.call(2, RequestBody::Health),
        ReplyBody::Health { .. }
    ));
    assert_eq!(c.exec(3, cmd(&["true"])).2, ReplyBody::Exit { code: 0 });
    assert!(alive(pid));
    // Even the connection closing leaves it running.
    drop(c);
    std::thread::sleep(Duration::from_millis(50));
    assert!(alive(pid));
    let pid = Pid::from_raw(pid as i32).unwrap();
    let _ = kill_process(pid, Signal::KILL);
}

#[test]
fn ten_mib_of_output() {
    let d = tmpdir("out");
    let data = pseudo_random(10 << 20, 42);
    let f = d.join("data");
    std::fs::write(&f, &data).unwrap();
    let mut c = Client::new();
    let (out, err, end) = c.exec(1, cmd(&["cat", f.to_str().unwrap()]));
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert!(err.is_empty());
    assert_eq!(out.len(), data.len());
    assert_eq!(fnv(&out), fnv(&data));
    std::fs::remove_dir_all(d).unwrap();
}

fn pty_cmd(argv: &[&str], rows: u16, cols: u16) -> ExecRequest {
    let mut r = cmd(argv);
    r.pty = Some(PtySize { rows, cols });
    r
}

#[test]
fn pty_is_the_controlling_terminal() {
    let mut c = Client::new();
    let (out, err, end) = c.exec(
        1,
        pty_cmd(
            &[
                "sh",
                "-c",
                "tty; stty size; echo to-stderr >&2; test -t 0 -a -t 1 -a -t 2 && echo all-ttys; \
                 ps -o tty= -p $$",
            ],
            33,
            101,
        ),
    );
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    assert!(err.is_empty(), "stderr goes through the pty: {err:?}");
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{out:?}");
    assert_eq!(lines[1], "33 101", "{out:?}");
    assert_eq!(&lines[2..4], ["to-stderr", "all-ttys"], "{out:?}");
    // ps names the controlling terminal: the same pts as `tty`.
    assert_eq!(format!("/dev/{}", lines[4].trim()), lines[0], "{out:?}");
}

#[test]
fn pty_stdin_resize_and_eof() {
    let mut c = Client::new();
    c.send(
        1,
        RequestBody::Exec(pty_cmd(
            &["sh", "-c", "read x; echo got:$x; stty size; exec cat"],
            24,
            80,
        )),
    );
    assert!(matches!(c.recv().body, ReplyBody::Started { .. }));
    // Processed in order by the agent: the size is set before the line reaches `read`.
    c.send(
        1,
        RequestBody::Resize(PtySize {
            rows: 50,
            cols: 120,
        }),
    );
    c.send(
        1,
        RequestBody::Stdin {
            data: b"hello\n".to_vec(),
        },
    );
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("50 120\r\n") {
        match c.recv().body {
            ReplyBody::Stdout { data } => out.extend(data),
            b => panic!("{b:?} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
    // Sent only now, so that its echo cannot land in the middle of the lines above.
    c.send(
        1,
        RequestBody::Stdin {
            data: b"for cat\n".to_vec(),
        },
    );
    c.send(1, RequestBody::StdinClose);
    let (rest, _, end) = c.collect(1);
    assert_eq!(end, ReplyBody::Exit { code: 0 });
    out.extend(rest);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("got:hello\r\n50 120\r\n"), "{out:?}");
    // The terminal echoes the line and cat prints it again; ^D then ends cat.
    assert_eq!(out.matches("for cat").count(), 2, "{out:?}");
    // Resizing an exec without a pty is refused.
    c.send(2, RequestBody::Exec(cmd(&["sleep", "5"])));
    assert!(matches!(c.recv().body, ReplyBody::Started { .. }));
    assert!(matches!(
        c.call(2, RequestBody::Resize(PtySize { rows: 1, cols: 1 })),
        ReplyBody::Error {
            kind: ErrorKind::InvalidRequest,
            ..
        }
    ));
    assert_eq!(
        c.call(
            2,
            RequestBody::Signal {
                signal: 9,
                group: true
            }
        ),
        ReplyBody::Ok
    );
    assert_eq!(c.collect(2).2, ReplyBody::Killed { signal: 9 });
}

fn refusal(end: ReplyBody) -> (ErrorKind, String) {
    match end {
        ReplyBody::Error { kind, message } => (kind, message),
        other => panic!("not a refusal: {other:?}"),
    }
}

#[test]
fn not_found_and_cannot_execute_say_so_as_a_shell_does() {
    let mut c = Client::new();
    assert_eq!(
        refusal(c.exec(1, cmd(&["/nonexistent/command"])).2),
        (ErrorKind::NotFound, "/nonexistent/command: No such file or directory".into())
    );
    assert_eq!(
        refusal(c.exec(2, cmd(&["no-such-command-ember"])).2),
        (ErrorKind::NotFound, "no-such-command-ember: command not found".into())
    );
    let d = tmpdir("noexec");
    let f = d.join("script");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let shown = f.to_str().unwrap();
    assert_eq!(
        refusal(c.exec(3, cmd(&[shown])).2),
        (ErrorKind::CannotExecute, format!("{shown}: Permission denied"))
    );
    // Found on the command's PATH, but its interpreter is missing: not "command not found".
    std::fs::write(&f, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut r = cmd(&["script"]);
    r.env = vec![("PATH".into(), d.to_str().unwrap().into())];
    assert_eq!(refusal(c.exec(4, r).2), (ErrorKind::NotFound, "script: No such file or directory".into()));
    std::fs::remove_dir_all(d).unwrap();
    assert!(matches!(refusal(c.exec(5, cmd(&[])).2), (ErrorKind::InvalidRequest, _)));
}

#[test]
fn a_working_directory_or_user_the_sandbox_lacks_is_named() {
    let mut c = Client::new();
    let mut r = cmd(&["true"]);
    r.cwd = Some("/nonexistent-ember-dir".into());
    assert_eq!(
        refusal(c.exec(1, r).2),
        (ErrorKind::InvalidRequest, "no directory /nonexistent-ember-dir in the sandbox".into())
    );
    let mut r = cmd(&["true"]);
    r.cwd = Some("/etc/hostname".into());
    assert_eq!(refusal(c.exec(2, r).2), (ErrorKind::InvalidRequest, "/etc/hostname in the sandbox is not a directory".into()));
    let mut r = cmd(&["true"]);
    r.user = Some(agent_protocol::User::Name("no-such-user-ember".into()));
    assert_eq!(refusal(c.exec(3, r).2), (ErrorKind::InvalidRequest, "no user no-such-user-ember in the sandbox".into()));
}

#[test]
fn run_as_user() {
    let mut c = Client::new();
    let mut r = cmd(&["id", "-u"]);
    r.user = Some(agent_protocol::User::Id {
        uid: 65534,
        gid: 65534,
    });
    let (out, _, end) = c.exec(1, r);
    assert_eq!(
        (out, end),
        (b"65534\n".to_vec(), ReplyBody::Exit { code: 0 })
    );
    let mut r = cmd(&["id", "-u"]);
    r.user = Some(agent_protocol::User::Name("root".into()));
    assert_eq!(c.exec(2, r).0, b"0\n");
}
