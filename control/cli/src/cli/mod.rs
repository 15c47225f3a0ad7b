//! The `ember` commands that talk to a sandbox's guest agent (exec, cp, tunnel), `expose` (through `ember serve`), those on
//! templates and images, and egress (the run flags, `ember egress`, the proxy process).

pub mod cp;
pub mod egress;
pub mod egress_proxy;
pub mod exec;
pub mod expose;
pub mod image;
pub mod serve;
pub mod start;
pub mod template;
pub mod tunnel;
mod terminal;

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use sandbox::Store;

/// Exit status for ember's own failures in `exec` and `cp`, as distinct from a command's.
pub const EXIT_EMBER_ERROR: u8 = 125;

/// An error and its causes on one line, `what: why: ...`, each cause left out when the text so
/// far already says it: many errors put their cause in their own message as well as in their
/// chain, and `{:#}` would print it twice (`... (os error 2): ... (os error 2)`).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if line.is_empty() {
            line = cause;
        } else if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}

/// `42s`, `5m`, `3h`, `2d`: the largest unit that fits.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// Seconds since `unix_secs`, none for a time to come.
pub fn secs_since(unix_secs: u64) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    now.saturating_sub(unix_secs)
}

/// Where a command reaches the guest agent: a sandbox by name, or a VM's vsock socket.
pub fn agent_socket(store: &Store, name: Option<&str>, uds: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    match (uds, name) {
        (Some(uds), _) => Ok(uds.clone()),
        (None, Some(name)) => Ok(store.vsock_socket(name)?),
        (None, None) => anyhow::bail!("name a sandbox or pass --uds"),
    }
}

pub fn connect(socket: &std::path::Path, port: u32) -> anyhow::Result<UnixStream> {
    Ok(agent_client::connect(socket, port, Duration::from_secs(10))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_the_message_already_says_is_not_said_again() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let shown = io.to_string();
        let said = anyhow::Error::new(sandbox::SandboxError::NotRunning("sb".into()));
        assert_eq!(error_line(&said), said.to_string());
        // A message that carries its cause (as its source too), in a context that does not.
        let carries = sandbox::SandboxError::Io { what: "cannot read", path: "python".into(), source: io };
        let e = anyhow::Error::new(carries).context("the image");
        assert_eq!(format!("{e:#}"), format!("the image: cannot read python: {shown}: {shown}"), "what is avoided");
        assert_eq!(error_line(&e), format!("the image: cannot read python: {shown}"));
        assert_eq!(error_line(&anyhow::anyhow!("plain")), "plain");
    }

    #[test]
    fn ages_use_the_largest_unit_that_fits() {
        let shown: Vec<String> = [0, 59, 60, 3599, 3600, 86399, 86400 * 3].into_iter().map(age).collect();
        assert_eq!(shown, ["0s", "59s", "1m", "59m", "1h", "23h", "3d"]);
    }
}
