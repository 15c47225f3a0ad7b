//! The `ember` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use vmm::config::VmConfig;
use vmm::vstate::vcpu::GuestExit;

/// Exit status when the guest kernel panicked (ember's own failures exit 1).
const EXIT_GUEST_PANIC: u8 = 2;

#[derive(Parser)]
#[command(name = "ember", version, about = "A microVM sandbox for running untrusted code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM, with its console on this terminal, until the guest reboots.
    Run(RunArgs),
    /// Copy-on-write disk images: qcow2 overlays over a shared read-only base.
    #[command(subcommand)]
    Disk(DiskCommand),
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a qcow2 overlay of BASE (raw or qcow2); BASE is recorded by absolute path and
    /// is never written. Refuses to overwrite OVERLAY.
    Create {
        /// The image the overlay starts as (a raw base or a frozen overlay)
        #[arg(long)]
        base: PathBuf,
        overlay: PathBuf,
    },
    /// Show the backing chain of an image, top layer first.
    Info {
        image: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Write the content of an image's whole chain to OUT, a standalone sparse raw image.
    Flatten { image: PathBuf, out: PathBuf },
}

fn disk(cmd: DiskCommand) -> anyhow::Result<ExitCode> {
    use vmm::disk::overlay;
    match cmd {
        DiskCommand::Create { base, overlay: path } => {
            overlay::create(&base, &path)?;
        }
        DiskCommand::Info { image, json } => {
            print!("{}", overlay::render_info(&overlay::info(&image)?, json));
        }
        DiskCommand::Flatten { image, out } => {
            let stats = overlay::flatten(&image, &out)?;
            eprintln!(
                "ember: wrote {} ({} of data in a {} disk)",
                out.display(),
                overlay::human_size(stats.data_bytes),
                overlay::human_size(stats.size)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct RunArgs {
    /// ELF vmlinux to boot [default: $EMBER_HOME/vmlinux]
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs (cpio, optionally compressed) for the kernel to unpack
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel parameters appended to ember's defaults
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB (a multiple of 2)
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// A virtio-blk disk: path=FILE[,ro=on|off][,root=on]; repeatable, the guest sees them
    /// as /dev/vda, /dev/vdb, ... in order; the root=on one is mounted as / (rw unless ro=on)
    #[arg(long = "drive", value_name = "OPTIONS")]
    drives: Vec<vmm::config::DriveConfig>,
    /// On exit, print VM exits by reason and boot timings to stderr
    #[arg(long)]
    stats: bool,
}

fn default_kernel() -> anyhow::Result<PathBuf> {
    match std::env::var_os("EMBER_HOME") {
        Some(home) => Ok(PathBuf::from(home).join("vmlinux")),
        None => bail!("no kernel given: pass --kernel PATH or set EMBER_HOME to a directory holding vmlinux"),
    }
}

fn run(args: RunArgs, started: Instant) -> anyhow::Result<ExitCode> {
    vmm::vstate::kvm::check_host()?;
    let cfg = VmConfig {
        kernel: match args.kernel {
            Some(k) => k,
            None => default_kernel()?,
        },
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        drives: args.drives,
    };
    let vm = vmm::builder::build(&cfg, Box::new(std::io::stdout())).context("cannot build the VM")?;
    let outcome = vmm::runtime::run(vm, started, true).context("cannot run the VM")?;
    if args.stats {
        eprint!("{}", outcome.stats.report());
    }
    Ok(match outcome.exit {
        GuestExit::Reset | GuestExit::TripleFault | GuestExit::SystemEvent(_) => ExitCode::SUCCESS,
        GuestExit::Panic(line) => {
            eprintln!("ember: the guest kernel panicked: {line}");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        GuestExit::Failure(reason) => bail!("the VM failed: {reason}"),
    })
}

fn main() -> ExitCode {
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args, started),
        Command::Disk(cmd) => disk(cmd),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ember: error: {e:#}");
        ExitCode::FAILURE
    })
}
