//! The guest kernel command line: ember's defaults, then what the user appends.

use linux_loader::cmdline::Cmdline;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// What the minimal guest kernel needs on an ember VM:
/// - `reboot=k`: reboot through the i8042 reset line, which the VMM catches to end the VM;
/// - `panic=-1`: a panic reboots at once rather than hanging, and the VMM reports it;
/// - `8250.nr_uarts=1`, `pci=off`, `i8042.*`, `io_delay=none`, `no_timer_check`: skip probing
///   hardware that is not there; each probe is a trip out to the VMM;
/// - `quiet`: the boot log costs a VM exit per byte; `--cmdline loglevel=7` brings it back.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
    8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd io_delay=none no_timer_check quiet";

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes: {0}")]
    Invalid(linux_loader::cmdline::Error),
}

/// The default command line with `extra` appended; later kernel parameters override earlier ones.
pub fn build(extra: Option<&str>) -> Result<Cmdline, CmdlineError> {
    let mut cmdline = Cmdline::try_from(DEFAULT_CMDLINE, CMDLINE_MAX_SIZE).map_err(CmdlineError::Invalid)?;
    if let Some(extra) = extra.map(str::trim).filter(|s| !s.is_empty()) {
        cmdline.insert_str(extra).map_err(CmdlineError::Invalid)?;
    }
    Ok(cmdline)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(c: &Cmdline) -> String {
        c.as_cstring().unwrap().into_string().unwrap()
    }

    #[test]
    fn defaults_then_user_parameters() {
        let c = build(Some("  init=/bin/sh loglevel=7 ")).unwrap();
        let s = text(&c);
        assert!(s.starts_with("console=ttyS0 reboot=k panic=-1"));
        assert!(s.ends_with(" init=/bin/sh loglevel=7"), "{s}");
        assert_eq!(text(&build(None).unwrap()), DEFAULT_CMDLINE);
        assert_eq!(text(&build(Some("")).unwrap()), DEFAULT_CMDLINE);
    }

    #[test]
    fn too_long_is_an_error() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let err = build(Some(&long)).unwrap_err().to_string();
        assert!(err.contains("longer than 4096"), "{err}");
    }
}
