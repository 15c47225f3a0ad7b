//! Sandbox names: what a user may call a sandbox, hidden names, generated names.

use std::time::SystemTime;

use crate::{identity, SandboxError};

pub(crate) fn check_name(name: &str) -> Result<(), SandboxError> {
    let ok = (1..=63).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok { Ok(()) } else { Err(SandboxError::BadName(name.to_string())) }
}

/// A name as `check_name` takes it, or the same with a leading '.' (a hidden sandbox).
pub(crate) fn check_existing_name(name: &str) -> Result<(), SandboxError> {
    check_name(name.strip_prefix('.').unwrap_or(name)).map_err(|_| SandboxError::BadName(name.to_string()))
}

pub(crate) fn is_hidden(name: &str) -> bool {
    name.starts_with('.')
}

/// Eight hex digits, for names that must not collide.
pub(crate) fn random_hex() -> String {
    let mut bytes = [0u8; 4];
    if identity::host_random(&mut bytes).is_err() {
        let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        bytes = (nanos ^ std::process::id()).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn random_name() -> String {
    format!("sb-{}", random_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "sb-01", "web.server_2", &"x".repeat(63)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "a b", "../up", &"x".repeat(64)] {
            assert!(matches!(check_name(bad), Err(SandboxError::BadName(_))), "{bad}");
        }
        let n = random_name();
        assert!(check_name(&n).is_ok() && n.len() == 11, "{n}");
    }
}
