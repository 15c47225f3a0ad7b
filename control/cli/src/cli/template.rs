//! `ember template create|ls|rm`: named snapshots of freshly booted sandboxes, which
//! `ember run --detach --template NAME` restores new sandboxes from.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Subcommand};
use sandbox::Store;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Boot a sandbox, wait for its guest agent, and keep a snapshot of it as template NAME;
    /// the sandbox itself is removed. Refuses a NAME that exists.
    Create(CreateArgs),
    /// List templates, the automatic ones (auto-...) that `ember run --detach` makes included.
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Delete templates; refused for one that a sandbox's disk is still stacked on.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// Base image: `default` ($EMBER_HOME/images/default.ext4), an imported image's name, or a path
    #[arg(long, default_value = "default")]
    image: String,
    /// ELF vmlinux to boot [default: $EMBER_HOME/vmlinux]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Kernel parameters appended to ember's defaults
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB (a multiple of 2)
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// Size of the disk of the template's sandboxes when larger than the image (their root
    /// file system fills it) [default: the image's size]
    #[arg(long, value_name = "GIB")]
    disk_gib: Option<u64>,
    /// Seconds the guest agent has to answer after the sandbox boots
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
}

pub fn template(cmd: TemplateCommand, store: &Store) -> anyhow::Result<ExitCode> {
    match cmd {
        TemplateCommand::Create(args) => {
            vmm::vstate::kvm::check_host()?;
            let (kernel, image) = (args.kernel, &args.image);
            let spec = sandbox::SandboxSpec {
                disk_gib: args.disk_gib,
                ..crate::sandbox_spec(None, kernel, image, args.mem_mib, args.vcpus, args.cmdline, args.ready_timeout)?
            };
            store.create_template(&args.name, &spec)?;
        }
        TemplateCommand::Ls { json } => ls(store, json)?,
        TemplateCommand::Rm { names } => {
            let mut failed = false;
            for name in names {
                if let Err(e) = store.remove_template(&name) {
                    eprintln!("ember: error: {e}");
                    failed = true;
                }
            }
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn ls(store: &Store, json: bool) -> anyhow::Result<()> {
    let list = store.templates()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs();
    outln!("{:<22} {:>8} {:>8} {:>5}  IMAGE", "NAME", "AGE", "MEM_MIB", "VCPUS");
    for t in list {
        let age = age(now.saturating_sub(t.created));
        outln!("{:<22} {:>8} {:>8} {:>5}  {}", t.name, age, t.mem_mib, t.vcpus, t.image.display());
    }
    Ok(())
}

/// `42s`, `5m`, `3h`, `2d`: the largest unit that fits.
fn age(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_use_the_largest_unit_that_fits() {
        let shown: Vec<String> = [0, 59, 60, 3599, 3600, 86399, 86400 * 3].into_iter().map(super::age).collect();
        assert_eq!(shown, ["0s", "59s", "1m", "59m", "1h", "23h", "3d"]);
    }
}
