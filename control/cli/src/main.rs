//! The `ember` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use vmm::config::VmConfig;
use vmm::vstate::vcpu::GuestExit;

/// `println!` for ember's own output: a reader that went away (`ember ls --json | grep -q x`)
/// ends ember quietly, with the status a shell gives a filter that SIGPIPE killed, where
/// `println!` panics. (Rust ignores SIGPIPE so that a write to a closed socket fails with
/// EPIPE rather than killing ember; stdout then needs this.)
macro_rules! outln {
    ($($arg:tt)*) => { $crate::stdout_line(format_args!($($arg)*), true) };
}

/// `print!` to match `outln!`.
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout_line(format_args!($($arg)*), false) };
}

mod cli;

fn stdout_line(args: std::fmt::Arguments, newline: bool) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out.write_fmt(args).and_then(|()| if newline { out.write_all(b"\n") } else { Ok(()) }).and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(128 + libc::SIGPIPE),
        Err(e) => {
            eprintln!("ember: error: cannot write to stdout: {e}");
            std::process::exit(1)
        }
    }
}

/// Exit status when the guest kernel panicked (ember's own failures exit 1; a VMM that made a
/// system call its seccomp filter forbids exits 159, `seccomp::EXIT_STATUS`).
const EXIT_GUEST_PANIC: u8 = 2;

#[derive(Parser)]
#[command(name = "ember", version, about = "A microVM sandbox for running untrusted code")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM, with its console on this terminal, until the guest reboots;
    /// or, with --detach, start a sandbox in the background and return once it is ready.
    Run(RunArgs),
    /// List sandboxes.
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Stop sandboxes and delete them with their overlays.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Be one VM's VMM process, configured and started through the Firecracker-style HTTP API
    /// served on --api-sock (what `ember run --detach` and control planes use). Internal: not
    /// in --help.
    #[command(hide = true)]
    Vmm(VmmArgs),
    /// Run a command in a running VM through its guest agent, streaming its output; exits with
    /// the command's status (128+N if killed by signal N, 124 on timeout, 125 for ember's own
    /// errors, 126/127 when the command cannot run / is not found)
    Exec(cli::exec::ExecArgs),
    /// Copy a file into or out of a sandbox: `ember cp LOCAL NAME:PATH` or `ember cp NAME:PATH
    /// LOCAL` (`-` for stdin/stdout)
    Cp(cli::cp::CpArgs),
    /// Forward a local TCP port to a port inside a sandbox: listens on --local (default
    /// 127.0.0.1:REMOTE_PORT, or an ephemeral port when that is taken), prints the address it
    /// listens on, and forwards each connection until interrupted
    Tunnel(cli::tunnel::TunnelArgs),
    /// Print a service URL for PORT in the sandbox: authenticated HTTP through this user's
    /// running `ember serve` (the URL's token expires after --ttl seconds).
    Expose(cli::expose::ExposeArgs),
    /// Revoke the sandbox's service URLs (of PORT only, if given).
    Unexpose(cli::expose::UnexposeArgs),
    /// Snapshot a sandbox into DIR (VM state, memory, and a frozen copy of its disk); the
    /// sandbox is paused meanwhile and runs on after. Start copies with
    /// `ember run --detach --from-snapshot DIR`.
    Snapshot { name: String, dir: PathBuf },
    /// Print a sandbox's VM exits so far (they measure its work whatever the host's speed).
    Stats {
        name: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Fork a running sandbox into N children that go on from its exact state (memory, disk,
    /// processes) while it runs on; they share its memory and disk copy-on-write. Prints the
    /// children's names (NAME-1, NAME-2, ...).
    Fork {
        name: String,
        /// How many children
        #[arg(short = 'n', long = "count", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        count: u16,
        /// Seconds each child's guest agent has to answer
        #[arg(long, default_value_t = 120)]
        ready_timeout: u64,
        /// Print the children's records as JSON instead of their names
        #[arg(long)]
        json: bool,
    },
    /// Templates: snapshots of freshly booted sandboxes that new sandboxes are restored from.
    #[command(subcommand)]
    Template(cli::template::TemplateCommand),
    /// Base images made from OCI and Docker images (`run --detach --image NAME` boots them).
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
    /// Serve the LangSmith Sandboxes API (the `langsmith` SDK's) over this host's sandboxes.
    Serve(cli::serve::ServeArgs),
    /// Copy-on-write disk images: qcow2 overlays over a shared read-only base.
    #[command(subcommand)]
    Disk(DiskCommand),
    /// Print a completion script for SHELL, e.g. `ember completion bash > /etc/bash_completion.d/ember`,
    /// or `source <(ember completion bash)`
    Completion {
        shell: clap_complete::Shell,
    },
    /// Print a sandbox's egress audit events (JSON lines): every connection its proxy refused
    /// or tunnelled and every request it forwarded or intercepted. With --allow-net or
    /// --proxy-config: replace its egress policy (new connections get it) or give it egress.
    #[command(alias = "events")]
    Egress(cli::egress::EgressArgs),
    /// Be one sandbox's egress proxy (what `ember run --detach` with egress starts).
    #[command(hide = true)]
    EgressProxy(cli::egress_proxy::EgressProxyArgs),
}

/// How `ember disk` and `ember run` learn a file's format and where backing files may lie.
#[derive(Args)]
struct DiskOptions {
    /// Format of the image named (raw or qcow2) [default: from its name: .qcow2, or .raw, .img,
    /// .ext4 for raw; any other name needs --format]. Never guessed from the content
    #[arg(long, value_name = "FORMAT")]
    format: Option<disk::Format>,
    /// A directory backing files of qcow2 layers may lie under, besides the named image's own
    /// directory, $EMBER_HOME/images and $EMBER_STATE (repeatable)
    #[arg(long = "disk-dir", value_name = "DIR")]
    disk_dirs: Vec<PathBuf>,
}

impl DiskOptions {
    /// The format of IMAGE: --format, or its name's.
    fn format_of(&self, image: &std::path::Path) -> anyhow::Result<disk::Format> {
        match self.format.or_else(|| disk::Format::from_extension(image)) {
            Some(f) => Ok(f),
            None => bail!("cannot tell the format of {} from its name: pass --format raw or --format qcow2", image.display()),
        }
    }
}

/// Where the backing files of the chains of NAMED may lie for a command run by hand: each named
/// file's directory, the images directory, the state directory, and DIRS.
fn command_policy(named: &[&std::path::Path], dirs: &[PathBuf]) -> anyhow::Result<disk::BackingPolicy> {
    let mut policy = disk::BackingPolicy::new(dirs)?;
    let parent = |p: &std::path::Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let images = std::env::var_os("EMBER_HOME").map(|h| PathBuf::from(h).join("images"));
    let state = sandbox::Store::default_root().parent().map(PathBuf::from);
    for dir in named.iter().map(|p| parent(p)).chain(images).chain(state) {
        // Where they do not exist, nothing lies there anyway.
        if dir.is_dir() {
            policy.allow(&dir)?;
        }
    }
    Ok(policy)
}

#[derive(Subcommand)]
enum DiskCommand {
    /// Create a qcow2 overlay of BASE (raw or qcow2); BASE is recorded by absolute path, with
    /// its format, and is never written. Refuses to overwrite OVERLAY.
    Create {
        /// The image the overlay starts as (a raw base or a frozen overlay); --format gives its format
        #[arg(long)]
        base: PathBuf,
        overlay: PathBuf,
        #[command(flatten)]
        options: DiskOptions,
    },
    /// Show the backing chain of an image, top layer first.
    Info {
        image: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        options: DiskOptions,
    },
    /// Write the content of an image's whole chain to OUT, a standalone sparse raw image. OUT
    /// is raw whatever its first bytes look like: name it .raw or .img, or open it with
    /// format raw.
    Flatten {
        image: PathBuf,
        out: PathBuf,
        #[command(flatten)]
        options: DiskOptions,
    },
}

fn disk(cmd: DiskCommand) -> anyhow::Result<ExitCode> {
    use disk::overlay;
    match cmd {
        DiskCommand::Create { base, overlay: path, options } => {
            let policy = command_policy(&[&base], &options.disk_dirs)?;
            let format = options.format_of(&base)?;
            overlay::create(overlay::Base { path: &base, format, policy: &policy }, &path)?;
        }
        DiskCommand::Info { image, json, options } => {
            let policy = command_policy(&[&image], &options.disk_dirs)?;
            out!("{}", overlay::render_info(&overlay::info(&image, options.format_of(&image)?, &policy)?, json));
        }
        DiskCommand::Flatten { image, out, options } => {
            let policy = command_policy(&[&image], &options.disk_dirs)?;
            let stats = overlay::flatten(&image, options.format_of(&image)?, &policy, &out)?;
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
struct VmmArgs {
    /// Unix socket to serve the API on (must not exist yet)
    #[arg(long)]
    api_sock: PathBuf,
    /// The instance id `GET /` reports
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Jail the VMM in DIR once its API socket is bound: DIR becomes its `/` in new mount,
    /// ipc, uts and network namespaces, and it runs as --jail-uid/--jail-gid with no
    /// capabilities (needs root; what control planes started as root do)
    #[arg(long, value_name = "DIR", requires_all = ["jail_uid", "jail_gid"])]
    jail: Option<PathBuf>,
    #[arg(long, value_name = "UID")]
    jail_uid: Option<u32>,
    #[arg(long, value_name = "GID")]
    jail_gid: Option<u32>,
    /// A host file or directory the jailed VMM sees read-only at the same path (repeatable)
    #[arg(long, value_name = "PATH")]
    jail_ro: Vec<PathBuf>,
    /// The largest file the jailed VMM may write, in bytes
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 40)]
    jail_max_file_size: u64,
    /// The VMM was started in a user namespace of its own whose root is --jail-uid outside
    /// (how a caller who is not root jails it): it keeps that uid and drops its capabilities
    #[arg(long, requires = "jail")]
    jail_userns: bool,
    /// A directory the backing files of the drives' qcow2 layers may lie under (repeatable);
    /// with none, a drive whose qcow2 layer has a backing file is refused
    #[arg(long = "disk-dir", value_name = "DIR")]
    disk_dirs: Vec<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Start a sandbox in the background (its own VMM process, API socket, vsock socket, overlay
    /// and logs in a state directory) and return once its guest agent answers. It is restored
    /// from the automatic template for its settings, made on first use (see --cold)
    #[arg(long, short = 'd')]
    detach: bool,
    /// Name of the sandbox (with --detach) [default: generated]
    #[arg(long, requires = "detach")]
    name: Option<String>,
    /// Base image of the sandbox (with --detach): `default` ($EMBER_HOME/images/default.ext4),
    /// the name of an image `ember image import` made, or a path; the sandbox writes only to its
    /// own overlay on it
    #[arg(long, requires = "detach", default_value = "default")]
    image: String,
    /// Start the sandbox (with --detach) from a snapshot `ember snapshot` wrote into DIR,
    /// instead of booting: it continues where the snapshotted sandbox was, on its own disk
    #[arg(long, value_name = "DIR", requires = "detach", conflicts_with_all = ["image", "kernel", "initrd", "cmdline", "mem_mib", "vcpus"])]
    from_snapshot: Option<PathBuf>,
    /// Start the sandbox (with --detach) from template NAME (`ember template create`)
    #[arg(
        long,
        value_name = "NAME",
        requires = "detach",
        conflicts_with_all = ["from_snapshot", "image", "kernel", "initrd", "cmdline", "mem_mib", "vcpus"]
    )]
    template: Option<String>,
    /// Boot the sandbox (with --detach) instead of restoring it from the automatic template
    #[arg(long, requires = "detach", conflicts_with_all = ["from_snapshot", "template"])]
    cold: bool,
    /// Lifetime of the sandbox (with --detach) in seconds: then its VMM ends it, whatever the
    /// guest does, and its state is removed (see --on-ttl)
    #[arg(long, value_name = "SECONDS", requires = "detach", value_parser = clap::value_parser!(u64).range(1..))]
    ttl: Option<u64>,
    /// What becomes of the sandbox's state (its disk) once its --ttl is over: removed, or kept
    /// for `ember ls` to show as Expired until `ember rm`
    #[arg(long, value_enum, requires = "ttl", default_value = "remove")]
    on_ttl: OnTtl,
    /// Seconds the guest agent has to answer after a detached sandbox starts
    #[arg(long, requires = "detach", default_value_t = 120)]
    ready_timeout: u64,
    /// Print the sandbox's record as JSON instead of its name (with --detach)
    #[arg(long, requires = "detach")]
    json: bool,
    /// Once the sandbox (with --detach) is ready, start its image's Entrypoint and Cmd as a
    /// background exec, with the image's Env, WorkingDir and User (implied by -- COMMAND)
    #[arg(long, requires = "detach")]
    start: bool,
    /// With --detach: the command to start in the background, after the image's Entrypoint and
    /// in place of its Cmd (as `docker run IMAGE COMMAND`)
    #[arg(last = true, value_name = "COMMAND", requires = "detach")]
    command: Vec<String>,
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
    #[arg(long, default_value_t = 256, value_parser = mem_mib)]
    mem_mib: u64,
    /// Number of vCPUs
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// Size of the sandbox's disk (with --detach) when larger than its image: the guest's root
    /// file system fills it, and writes past it fail in the guest (ENOSPC) [default: the image's size]
    #[arg(long, value_name = "GIB", requires = "detach", conflicts_with_all = ["from_snapshot", "template"])]
    disk_gib: Option<u64>,
    /// A virtio-blk disk: path=FILE[,ro=on|off][,root=on][,format=raw|qcow2]; repeatable, the
    /// guest sees them as /dev/vda, /dev/vdb, ... in order; the root=on one is mounted as /
    /// (rw unless ro=on). Without format=, FILE's name says it (.qcow2, or .raw, .img, .ext4)
    #[arg(long = "drive", value_name = "OPTIONS", conflicts_with = "detach")]
    drives: Vec<vmm::config::DriveConfig>,
    /// A directory backing files of the drives' qcow2 layers may lie under, besides each
    /// drive's own directory, $EMBER_HOME/images and $EMBER_STATE (repeatable)
    #[arg(long = "disk-dir", value_name = "DIR", conflicts_with = "detach")]
    disk_dirs: Vec<PathBuf>,
    /// A virtio-vsock device: cid=N,uds=PATH. Host programs connect to PATH and write
    /// "CONNECT <port>\n"; guest connections to host port P reach PATH_P
    #[arg(long, value_name = "OPTIONS", conflicts_with = "detach")]
    vsock: Option<vmm::config::VsockConfig>,
    /// On exit, print VM exits by reason and boot timings to stderr
    #[arg(long)]
    stats: bool,
    #[command(flatten)]
    egress: cli::egress::EgressFlags,
}

/// `--mem-mib`: a positive multiple of 2 MiB, checked before anything is looked at or made
/// (the host's bound is checked when a sandbox is started).
pub(crate) fn mem_mib(arg: &str) -> Result<u64, String> {
    let mib: u64 = arg.parse().map_err(|_| format!("{arg} is not a number of MiB"))?;
    sandbox::check_memory_step(mib)?;
    Ok(mib)
}

fn ember_home(what: &str) -> anyhow::Result<PathBuf> {
    match std::env::var_os("EMBER_HOME") {
        Some(home) => Ok(PathBuf::from(home)),
        None => bail!("no {what} given: pass it, or set EMBER_HOME to a directory holding vmlinux and images/"),
    }
}

fn store() -> anyhow::Result<sandbox::Store> {
    let exe = std::env::current_exe().context("cannot find the ember binary")?;
    let spares = std::env::var("EMBER_SPARE_VMMS")
        .map_or(Ok(1), |v| v.parse())
        .context("EMBER_SPARE_VMMS must be a number of spare VMMs")?;
    // Every VMM sees the installation's kernel and images (read-only): spares are started
    // before anyone knows which they will need.
    let installed: Vec<PathBuf> = std::env::var_os("EMBER_HOME")
        .map(PathBuf::from)
        .into_iter()
        .flat_map(|home| [home.join("vmlinux"), home.join("images")])
        .filter(|p| p.exists())
        .filter_map(|p| std::path::absolute(p).ok())
        .collect();
    let jail = sandbox::jails::JailSettings::from_env(installed);
    // Sandboxes' disks may be backed by files in the images directory and the directories
    // EMBER_DISK_DIRS lists (colon-separated), besides $EMBER_STATE and the files named.
    let mut disk_dirs: Vec<PathBuf> = std::env::var_os("EMBER_HOME").map(|h| PathBuf::from(h).join("images")).into_iter().collect();
    if let Some(dirs) = std::env::var_os("EMBER_DISK_DIRS") {
        disk_dirs.extend(std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()));
    }
    let store = sandbox::Store::new(sandbox::Store::default_root(), exe)
        .with_spare_vmms(spares)
        .with_disk_dirs(disk_dirs)
        .with_jail(jail)
        .with_egress(egress_settings());
    store.check_state_dir()?;
    Ok(match mem_cap_mib()? {
        Some(cap) => store.with_mem_cap(cap),
        None => store,
    })
}

/// What sandboxes' egress proxies are given: `EMBER_EGRESS_SECRETS`, the host's secret file;
/// `EMBER_EGRESS_UPSTREAM_CA`, PEM files (colon-separated) of CAs trusted for upstreams;
/// `EMBER_EGRESS_ALLOW_INTERNAL=1`, internal addresses reachable (tests on loopback only).
fn egress_settings() -> sandbox::egress::EgressSettings {
    let paths = |var| std::env::var_os(var).map(|v| std::env::split_paths(&v).filter(|p| !p.as_os_str().is_empty()).collect::<Vec<_>>());
    sandbox::egress::EgressSettings {
        secrets: paths("EMBER_EGRESS_SECRETS").and_then(|p| p.into_iter().next()),
        upstream_cas: paths("EMBER_EGRESS_UPSTREAM_CA").unwrap_or_default(),
        allow_internal: std::env::var("EMBER_EGRESS_ALLOW_INTERNAL").is_ok_and(|v| v == "1"),
        ..Default::default()
    }
}

/// `EMBER_MAX_MEM_MIB`: the most guest memory a VM may have, when less than the host's RAM.
fn mem_cap_mib() -> anyhow::Result<Option<u64>> {
    std::env::var("EMBER_MAX_MEM_MIB")
        .ok()
        .map(|cap| cap.parse().context("EMBER_MAX_MEM_MIB must be a number of MiB"))
        .transpose()
}

/// What to boot a sandbox from; `image` is `default`, an imported image's name or a path.
fn sandbox_spec(
    name: Option<String>,
    kernel: Option<PathBuf>,
    image: &str,
    mem_mib: u64,
    vcpus: u8,
    boot_args: Option<String>,
    ready_timeout_secs: u64,
) -> anyhow::Result<sandbox::SandboxSpec> {
    let kernel = match kernel {
        Some(k) => k,
        None => ember_home("--kernel")?.join("vmlinux"),
    };
    let image = match image {
        "default" => ember_home("--image")?.join("images/default.ext4"),
        name_or_path => image_path(name_or_path, cli::image::resolve(name_or_path))?,
    };
    let ready_timeout = Duration::from_secs(ready_timeout_secs);
    Ok(sandbox::SandboxSpec { name, kernel, image, mem_mib, vcpus, boot_args, disk_gib: None, ready_timeout })
}

/// The file `--image ARG` names: the image `ember image` made by that name (`found`), else a
/// file at that path.
fn image_path(arg: &str, found: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match found {
        Some(path) => Ok(path),
        None if std::path::Path::new(arg).exists() => Ok(PathBuf::from(arg)),
        None => bail!(
            "there is no image {arg}: give --image default, an image's NAME:TAG (`ember image ls` lists them) or the path of an image file"
        ),
    }
}

fn run_detached(args: RunArgs) -> anyhow::Result<ExitCode> {
    vmm::vstate::kvm::check_host()?;
    let store = store()?;
    // Checked before anything starts: a policy that cannot work fails the command at once.
    let egress = args.egress.proxy_config()?;
    if let Some(config) = &egress {
        store.check_egress(config)?;
    }
    let timeout = Duration::from_secs(args.ready_timeout);
    let record = if let Some(dir) = &args.from_snapshot {
        store.start_from_snapshot(args.name, dir, timeout)?
    } else if let Some(template) = &args.template {
        store.start_from_template(template, args.name, timeout)?
    } else {
        if args.initrd.is_some() {
            bail!("--initrd does not go with --detach: a sandbox boots its image's /sbin/ember-init");
        }
        let (kernel, image, boot_args) = (args.kernel, &args.image, args.cmdline);
        let spec = sandbox::SandboxSpec {
            disk_gib: args.disk_gib,
            ..sandbox_spec(args.name, kernel, image, args.mem_mib, args.vcpus, boot_args, args.ready_timeout)?
        };
        if args.cold {
            store.start(&spec)?
        } else {
            store.start_auto(&spec, |name| {
                eprintln!("ember: making template {name} for these settings (once)");
                if let Some(hint) = vmm::vstate::memory::huge_page_hint() {
                    eprintln!("ember: {hint}");
                }
            })?
        }
    };
    if let Some(secs) = args.ttl {
        let keep = args.on_ttl == OnTtl::Keep;
        // A sandbox that could not be given its lifetime is not left to run for ever.
        if let Err(e) = store.set_lifetime(&record.name, Duration::from_secs(secs), keep) {
            let _ = store.remove(&record.name);
            return Err(e.into());
        }
    }
    if let Some(config) = &egress {
        // Before its command starts, which may need it; a sandbox is not left without the
        // egress it was asked for.
        if let Err(e) = store.set_egress(&record.name, config) {
            let _ = store.remove(&record.name);
            return Err(anyhow::Error::new(e).context(format!("sandbox {} removed", record.name)));
        }
    }
    if args.start || !args.command.is_empty() {
        // A sandbox whose command did not start is not left running without it.
        match cli::start::start_background(&store, &record.name, &args.command) {
            Ok((argv, pid)) => eprintln!("ember: started {argv:?} in {} (pid {pid} in the guest)", record.name),
            Err(e) => {
                let _ = store.remove(&record.name);
                return Err(e.context(format!("sandbox {} removed", record.name)));
            }
        }
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        outln!("{}", record.name);
    }
    Ok(ExitCode::SUCCESS)
}

/// What becomes of a sandbox's state when its lifetime (--ttl) is over.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnTtl {
    Remove,
    Keep,
}

fn ls(json: bool) -> anyhow::Result<ExitCode> {
    let sandboxes = store()?.list()?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&sandboxes)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{:<20} {:<12} {:>8} {:>8} {:>8} {:>5}  IMAGE", "NAME", "STATE", "AGE", "PID", "MEM_MIB", "VCPUS");
    for s in sandboxes {
        let r = &s.record;
        let age = cli::age(cli::secs_since(r.created));
        outln!("{:<20} {:<12} {:>8} {:>8} {:>8} {:>5}  {}", r.name, s.state, age, r.pid, r.mem_mib, r.vcpus, r.image.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn rm(names: Vec<String>) -> anyhow::Result<ExitCode> {
    let store = store()?;
    let mut failed = false;
    for name in names {
        if let Err(e) = store.remove(&name) {
            eprintln!("ember: error: {}", cli::error_line(&anyhow::Error::from(e)));
            failed = true;
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn snapshot_sandbox(name: &str, dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    store()?.snapshot(name, dir)?;
    Ok(ExitCode::SUCCESS)
}

fn fork(name: &str, count: u16, ready_timeout: u64, json: bool) -> anyhow::Result<ExitCode> {
    let children = store()?.fork(name, count.into(), std::time::Duration::from_secs(ready_timeout))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&children)?);
        return Ok(ExitCode::SUCCESS);
    }
    for child in children {
        outln!("{}", child.name);
    }
    Ok(ExitCode::SUCCESS)
}

fn stats(name: &str, json: bool) -> anyhow::Result<ExitCode> {
    let exits = store()?.vm_exits(name)?;
    if json {
        outln!("{}", serde_json::json!({ "name": name, "vm_exits": exits }));
    } else {
        outln!("vm exits: {exits}");
    }
    Ok(ExitCode::SUCCESS)
}

fn vmm_process(args: VmmArgs, started: Instant) -> anyhow::Result<ExitCode> {
    // One malloc arena rather than one per thread: the VMM's threads seldom allocate at once,
    // and each arena's touched pages would be resident for the VM's whole life.
    // SAFETY: mallopt only tunes the allocator; called before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    vmm::vstate::kvm::check_host()?;
    let (sender, channel) = api::channel().context("cannot set up the API channel")?;
    let listener = api::server::bind(&args.api_sock, &sender)?;
    // Resolved on the host's view: inside a jail the same paths lead to what was linked in.
    let backing = disk::BackingPolicy::new(&args.disk_dirs)?;
    if let Some(root) = args.jail {
        let jail = jail::Jail {
            root,
            uid: args.jail_uid.unwrap_or_default(),
            gid: args.jail_gid.unwrap_or_default(),
            read_only: args.jail_ro,
            max_file_size: args.jail_max_file_size,
            user_namespace: args.jail_userns,
        };
        jail.enter()?;
    }
    api::server::spawn(listener, sender)?;
    let outcome = vmm::controller::serve(channel, args.id, started, backing, Box::new(std::io::stdout()));
    let _ = std::fs::remove_file(&args.api_sock);
    let exit = outcome?.exit;
    // A sandbox's VMM runs detached: its log is the only place that says why its guest ended.
    match &exit {
        GuestExit::Reset => eprintln!("ember: the guest reset itself (a reboot or power-off)"),
        GuestExit::TripleFault => eprintln!("ember: the guest triple-faulted (KVM_EXIT_SHUTDOWN)"),
        GuestExit::SystemEvent(kind) => eprintln!("ember: the guest ended with KVM system event {kind}"),
        GuestExit::Deadline => eprintln!("ember: the VM's deadline passed (the sandbox's --ttl): the VMM ended it"),
        GuestExit::Panic(_) | GuestExit::Failure(_) => {}
    }
    exit_status(exit)
}

fn exit_status(exit: GuestExit) -> anyhow::Result<ExitCode> {
    Ok(match exit {
        GuestExit::Reset | GuestExit::TripleFault | GuestExit::SystemEvent(_) | GuestExit::Deadline => ExitCode::SUCCESS,
        GuestExit::Panic(line) => {
            eprintln!("ember: the guest kernel panicked: {line}");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        GuestExit::Failure(reason) => bail!("the VM failed: {reason}"),
    })
}

fn run(args: RunArgs, started: Instant) -> anyhow::Result<ExitCode> {
    if args.detach {
        return run_detached(args);
    }
    if args.egress.given() {
        bail!("--allow-net and --proxy-config give a sandbox egress: they go with --detach");
    }
    vmm::vstate::kvm::check_host()?;
    // vCPUs beyond the host's CPUs are fine for a VM on this terminal (boot tests use them);
    // KVM's own limit is checked when the VM is made.
    let limits = sandbox::HostLimits::of_host();
    match mem_cap_mib()? {
        Some(cap) => limits.with_mem_cap(cap),
        None => limits,
    }
    .check_memory(args.mem_mib)?;
    let cfg = VmConfig {
        kernel: match args.kernel {
            Some(k) => k,
            None => ember_home("--kernel")?.join("vmlinux"),
        },
        initrd: args.initrd,
        cmdline: args.cmdline,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        backing: command_policy(&args.drives.iter().map(|d| d.path.as_path()).collect::<Vec<_>>(), &args.disk_dirs)?,
        drives: args.drives,
        vsock: args.vsock,
    };
    let vm = vmm::builder::build(&cfg, Box::new(std::io::stdout())).context("cannot build the VM")?;
    let outcome = vmm::runtime::run(vm, started, true).context("cannot run the VM")?;
    if args.stats {
        eprint!("{}", outcome.stats.report());
    }
    exit_status(outcome.exit)
}

fn main() -> ExitCode {
    let started = Instant::now();
    // Whatever the caller's umask: sandboxes, sockets, snapshots and logs are this user's
    // alone (0700 directories, 0600 files and sockets).
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let cli = parse();
    // A sandbox's VMM and egress proxy log to its vmm.log and egress.log, the one record of
    // what went on when a start or a connection goes wrong: they say more by default than a
    // command on a terminal.
    let default_level = if matches!(cli.command, Command::Vmm(_) | Command::EgressProxy(_)) { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| default_level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    tracing::debug!("started");
    let result = match cli.command {
        Command::Run(args) => run(args, started),
        Command::Exec(args) => store().and_then(|s| cli::exec::exec(args, &s)),
        Command::Cp(args) => store().and_then(|s| cli::cp::cp(args, &s)),
        Command::Tunnel(args) => store().and_then(|s| cli::tunnel::tunnel(args, &s)).map(|()| ExitCode::SUCCESS),
        Command::Expose(args) => cli::serve::state_dir().and_then(|d| cli::expose::expose(args, d)).map(|()| ExitCode::SUCCESS),
        Command::Unexpose(args) => cli::serve::state_dir().and_then(|d| cli::expose::unexpose(args, d)).map(|()| ExitCode::SUCCESS),
        Command::Ls { json } => ls(json),
        Command::Rm { names } => rm(names),
        Command::Vmm(args) => vmm_process(args, started),
        Command::Snapshot { name, dir } => snapshot_sandbox(&name, &dir),
        Command::Stats { name, json } => stats(&name, json),
        Command::Fork { name, count, ready_timeout, json } => fork(&name, count, ready_timeout, json),
        Command::Template(cmd) => store().and_then(|s| cli::template::template(cmd, &s)),
        Command::Disk(cmd) => disk(cmd),
        Command::Serve(args) => cli::serve::serve(args),
        Command::Image(cmd) => cli::image::image(cmd),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut completion_command(), "ember", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Egress(args) => store().and_then(|s| cli::egress::egress(args, &s)).map(|()| ExitCode::SUCCESS),
        Command::EgressProxy(args) => cli::egress_proxy::egress_proxy(args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ember: error: {}", cli::error_line(&e));
        ExitCode::FAILURE
    })
}

/// ember's command line as completions offer it: without the internal commands that --help
/// hides (clap_complete would offer them).
fn completion_command() -> clap::Command {
    let full = <Cli as clap::CommandFactory>::command();
    let shown = full.get_subcommands().filter(|c| !c.is_hide_set()).cloned();
    clap::Command::new("ember").version(env!("CARGO_PKG_VERSION")).subcommands(shown)
}

/// The command line, or the end of ember with clap's message: a usage error exits 2, as
/// clap's do, except in `exec` and `cp`, whose 1 and 2 could be the command's own: there it is
/// ember's own failure, 125.
fn parse() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let own_status = matches!(std::env::args().nth(1).as_deref(), Some("exec" | "cp"));
        if own_status && e.use_stderr() {
            let _ = e.print();
            std::process::exit(cli::EXIT_EMBER_ERROR.into());
        }
        e.exit()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_that_is_neither_a_known_name_nor_a_file_says_what_is_accepted() {
        let err = image_path("python", None).unwrap_err();
        assert_eq!(
            cli::error_line(&err),
            "there is no image python: give --image default, an image's NAME:TAG (`ember image ls` lists them) or the path of an image file"
        );
        assert_eq!(image_path("/etc/hostname", None).unwrap(), PathBuf::from("/etc/hostname"));
        let found = PathBuf::from("/images/oci/app.ext4");
        assert_eq!(image_path("app:1", Some(found.clone())).unwrap(), found);
    }

    #[test]
    fn mem_mib_is_a_positive_multiple_of_2() {
        assert_eq!(mem_mib("256"), Ok(256));
        assert_eq!(mem_mib("255").unwrap_err(), "255 is not a multiple of 2 MiB: give 254 or 256");
        assert_eq!(mem_mib("lots").unwrap_err(), "lots is not a number of MiB");
    }

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        match Cli::try_parse_from(["ember", "run"].iter().chain(args))?.command {
            Command::Run(run) => Ok(run),
            _ => unreachable!("ember run parses as run"),
        }
    }

    #[test]
    fn egress_flags_go_with_detach_and_allow_net_repeats_and_splits() {
        let run = run_args(&["--detach", "--allow-net", "pypi.org,files.pythonhosted.org", "--allow-net", "*.github.com"]).unwrap();
        assert_eq!(run.egress.allow_net, ["pypi.org", "files.pythonhosted.org", "*.github.com"]);
        let config = run.egress.proxy_config().unwrap().unwrap();
        assert_eq!(config.access_control.unwrap().allow_list.unwrap().len(), 3);
        assert!(run_args(&["--detach"]).unwrap().egress.proxy_config().unwrap().is_none(), "no flag, no egress");
        assert!(run_args(&["--allow-net", "pypi.org"]).unwrap().egress.given(), "refused by `run` without --detach");
        let err = run_args(&["--detach", "--proxy-config", "/nonexistent/p.json"]).unwrap().egress.proxy_config().unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/p.json"), "{err:#}");
        assert!(matches!(Cli::try_parse_from(["ember", "events", "s"]).unwrap().command, Command::Egress(_)));
        assert!(matches!(Cli::try_parse_from(["ember", "egress", "s", "--allow-net", "a.com"]).unwrap().command, Command::Egress(_)));
    }
}
