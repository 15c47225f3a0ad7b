//! ember's own output to a reader that went away.

use std::process::{Command, Stdio};

#[test]
fn a_closed_stdout_ends_ember_quietly_as_sigpipe_would() {
    let state = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember"))
        .arg("ls")
        .env("EMBER_STATE", state.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes before ember writes its first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(128 + libc::SIGPIPE), "{stderr}");
}
