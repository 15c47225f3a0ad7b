//! Native tests of the agent, run as root on the host (see common/mod.rs): the identity
//! hooks a restored sandbox gets (clock, entropy, hostname).

mod common;

use std::os::unix::net::UnixStream;

use ember_agent::server::{serve, Config};
use agent_protocol::{read_message, ErrorKind, Reply, ReplyBody, RequestBody};
use rustix::thread::{unshare_unsafe, UnshareFlags};

use common::*;

#[test]
fn identity_hooks() {
    // sethostname inside a private UTS namespace: unshare on the thread that serves, so the
    // host's name is untouched and the execs it spawns see the new one.
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        // SAFETY: NEWUTS leaves the fd table shared with the other threads, which is all
        // that unshare's contract is about.
        if unsafe { unshare_unsafe(UnshareFlags::NEWUTS) }.is_ok() {
            let _ = serve(b, &Config::default());
        }
    });
    let mut c = Client::over(a);
    c.send(
        1,
        RequestBody::SetHostname {
            name: "ember-test-host".into(),
        },
    );
    let reply: Result<Reply, _> = read_message(&mut c.s);
    match reply {
        Ok(r) => {
            assert_eq!(r.body, ReplyBody::Ok);
            assert_eq!(
                c.exec(2, cmd(&["cat", "/proc/sys/kernel/hostname"])).0,
                b"ember-test-host\n"
            );
            let data = pseudo_random(64, 1);
            assert_eq!(
                c.call(
                    3,
                    RequestBody::AddEntropy {
                        data,
                        entropy_bits: 256
                    }
                ),
                ReplyBody::Ok
            );
            // The clock is the host's: only the argument check is exercised here.
            assert!(matches!(
                c.call(
                    4,
                    RequestBody::SetClock {
                        secs: 0,
                        nanos: 2_000_000_000
                    }
                ),
                ReplyBody::Error { .. }
            ));
            assert!(matches!(
                c.call(5, RequestBody::PowerOff),
                ReplyBody::Error {
                    kind: ErrorKind::Unsupported,
                    ..
                }
            ));
        }
        Err(_) => eprintln!("skipped: cannot unshare the UTS namespace here"),
    }
}
