//! `ember egress-proxy` (hidden): one sandbox's egress proxy process, as the control plane
//! starts it (`sandbox::egress`). It serves `egress::proxy` on the Unix socket the sandbox's
//! VMM connects the guest's egress to, under the policy file's `proxy_config`; reads that file
//! again on SIGHUP (new connections get the new policy; a file that does not compile keeps the
//! old one, and says so in the log); and ends on SIGTERM or SIGINT, or once the sandbox's VMM
//! is gone, removing its socket.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use egress::audit::JsonLines;
use egress::ca::Ca;
use egress::config::ProxyConfig;
use egress::policy::{Options, Policy};
use egress::proxy::{Limits, Proxy};
use egress::secrets::SecretStore;
use egress::upstream::{self, Upstream};
use tokio::signal::unix::{signal, SignalKind};

/// How long an upstream has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the proxy looks whether its sandbox's VMM still runs.
const VMM_CHECK: Duration = Duration::from_secs(1);

#[derive(Args)]
pub struct EgressProxyArgs {
    /// The Unix socket to serve (replaced if a stale one is there)
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The sandbox's proxy_config (JSON), read at the start and on SIGHUP
    #[arg(long, value_name = "FILE")]
    policy: PathBuf,
    /// Where audit events are appended, one JSON object a line
    #[arg(long, value_name = "FILE")]
    audit: PathBuf,
    /// The deployment's CA (ca.key, ca.pem), made there if missing [default: $EMBER_STATE/egress-ca]
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// The host's secrets (a JSON object of names to values, mode 0600), read with the policy
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
    /// A PEM file of CA certificates trusted for upstreams besides Mozilla's roots (repeatable)
    #[arg(long, value_name = "FILE")]
    upstream_ca: Vec<PathBuf>,
    /// Let the sandbox reach internal addresses (loopback, private networks): for tests only
    #[arg(long)]
    allow_internal: bool,
    /// Give the socket this group, writable by it (a jailed VMM that runs as another user)
    #[arg(long, value_name = "GID")]
    socket_group: Option<u32>,
    /// The sandbox's VMM process: the proxy ends once it is gone
    #[arg(long, value_name = "PID")]
    vmm_pid: i32,
    /// The API socket the VMM was started with (on its command line: how it is recognised)
    #[arg(long, value_name = "PATH")]
    vmm_socket: PathBuf,
}

pub fn egress_proxy(args: EgressProxyArgs) -> anyhow::Result<()> {
    let policy = load_policy(&args)?;
    let ca_dir = match &args.ca_dir {
        Some(dir) => dir.clone(),
        None => sandbox::Store::new(sandbox::Store::default_root(), PathBuf::new()).egress_ca_dir(),
    };
    let ca = Arc::new(Ca::load_or_create(&ca_dir)?);
    let mut roots = Vec::new();
    for path in &args.upstream_ca {
        roots.extend(upstream::read_certificates(path).map_err(anyhow::Error::msg)?);
    }
    let upstream = Upstream::new(&roots, CONNECT_TIMEOUT).context("cannot trust the upstream CAs")?;
    let audit = JsonLines::open(&args.audit).with_context(|| format!("cannot open the audit log {}", args.audit.display()))?;
    let proxy = Proxy::new(policy, ca, upstream, Arc::new(audit), Limits::default());
    // Two workers: one sandbox's connections, many per process would be idle threads.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(&args, proxy))
}

fn load_policy(args: &EgressProxyArgs) -> anyhow::Result<Policy> {
    let shown = args.policy.display();
    let text = std::fs::read_to_string(&args.policy).with_context(|| format!("cannot read the policy {shown}"))?;
    let config = ProxyConfig::from_json(&text).with_context(|| format!("the policy {shown}"))?;
    let secrets = match &args.secrets {
        Some(path) => SecretStore::from_file(path)?,
        None => SecretStore::default(),
    };
    let options = Options { allow_internal: args.allow_internal };
    Policy::compile(&config, &secrets, options).with_context(|| format!("the policy {shown}"))
}

async fn serve(args: &EgressProxyArgs, proxy: Proxy) -> anyhow::Result<()> {
    // Before the socket exists: the control plane sends SIGHUP only to a proxy that listens,
    // and one that came before its handler would end the process.
    let mut hangups = signal(SignalKind::hangup())?;
    let mut terms = signal(SignalKind::terminate())?;
    let mut interrupts = signal(SignalKind::interrupt())?;
    let (listener, inode) = bind(&args.socket, args.socket_group)?;
    tracing::info!("serving {}", args.socket.display());
    let serving = proxy.clone();
    let mut served = tokio::spawn(async move { serving.serve(listener).await });
    let mut check = tokio::time::interval(VMM_CHECK);
    let ended = loop {
        tokio::select! {
            _ = hangups.recv() => match load_policy(args) {
                Ok(policy) => {
                    proxy.set_policy(policy);
                    tracing::info!("policy reloaded: new connections are decided by it");
                }
                Err(e) => tracing::error!("policy not reloaded, the one before stays: {e:#}"),
            },
            _ = terms.recv() => break Ok(()),
            _ = interrupts.recv() => break Ok(()),
            _ = check.tick() => if !sandbox::record::vmm_serves(args.vmm_pid, &args.vmm_socket) {
                tracing::info!("the sandbox's VMM (pid {}) is gone: ending", args.vmm_pid);
                break Ok(());
            },
            result = &mut served => break match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("cannot accept connections")),
                Err(e) => Err(anyhow::Error::new(e).context("the proxy failed")),
            },
        }
    };
    // Only the socket this process bound: a later proxy's is left alone.
    if std::fs::symlink_metadata(&args.socket).is_ok_and(|m| m.ino() == inode) {
        let _ = std::fs::remove_file(&args.socket);
    }
    ended
}

/// Binds `path`, owner-only or, with `group`, writable by that group too. Bound under a
/// temporary name and renamed into place with its mode set: the VMM finds it complete or not
/// at all. Returns its inode.
fn bind(path: &Path, group: Option<u32>) -> anyhow::Result<(tokio::net::UnixListener, u64)> {
    let name = path.file_name().context("the socket path has no file name")?.to_string_lossy();
    let staged = path.with_file_name(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let listener = std::os::unix::net::UnixListener::bind(&staged).with_context(|| format!("cannot bind {}", staged.display()))?;
    let placed = (|| -> anyhow::Result<u64> {
        let mode = match group {
            Some(gid) => {
                std::os::unix::fs::lchown(&staged, None, Some(gid))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                bail!("{} exists and is not a socket", path.display())
            }
            _ => {}
        }
        std::fs::rename(&staged, path)?;
        Ok(std::fs::symlink_metadata(path)?.ino())
    })();
    let inode = placed.inspect_err(|_| {
        let _ = std::fs::remove_file(&staged);
    })?;
    listener.set_nonblocking(true)?;
    Ok((tokio::net::UnixListener::from_std(listener)?, inode))
}
