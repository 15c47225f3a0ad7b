//! `ember template create|ls|rm`: named snapshots of freshly booted sandboxes, which
//! `ember run --detach --template NAME` restores new sandboxes from.

use std::path::PathBuf;
use std::process::ExitCode;

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
    #[arg(long, default_value_t = 256, value_parser = crate::mem_mib)]
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
    /// Print the template's entry (as `template ls --json` shows it) when it is made
    #[arg(long)]
    json: bool,
}

pub fn template(cmd: TemplateCommand, store: &Store) -> anyhow::Result<ExitCode> {
    match cmd {
        TemplateCommand::Create(args) => {
            let (kernel, image) = (args.kernel, &args.image);
            let spec = sandbox::SandboxSpec {
                disk_gib: args.disk_gib,
                ..crate::sandbox_spec(None, kernel, image, args.mem_mib, args.vcpus, args.cmdline, args.ready_timeout)?
            };
            // After the arguments: a wrong one is named on any host.
            vmm::vstate::kvm::check_host()?;
            let made = store.create_template(&args.name, &spec)?;
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&made)?);
            }
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
    outln!("{:<22} {:>8} {:>8} {:>5}  IMAGE", "NAME", "AGE", "MEM_MIB", "VCPUS");
    for t in list {
        let age = super::age(super::secs_since(t.created));
        outln!("{:<22} {:>8} {:>8} {:>5}  {}", t.name, age, t.mem_mib, t.vcpus, t.image.display());
    }
    Ok(())
}
