//! `ember serve`: the LangSmith Sandboxes API over this host's sandboxes (`control/server`),
//! for the unmodified `langsmith` SDK. It runs until SIGINT or SIGTERM, and leaves the
//! sandboxes as they are when it ends.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use server::backend::sandbox::SandboxBackend;
use server::tenants::Tenants;

/// Bytes of a command's output that may go to disk while no client reads it.
const SPILL_PER_COMMAND: u64 = 1 << 30;

#[derive(Args)]
pub struct ServeArgs {
    /// Address to listen on (without --keys, a loopback one only)
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// API keys, one `TENANT KEY [max_boxes=N]` a line (`#` comments); each key's tenant sees
    /// only its own sandboxes and snapshots. Without: one tenant, no key asked
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// The URL clients reach this server at, for the data plane URLs it hands out
    /// [default: http:// and the Host each request came with]
    #[arg(long, value_name = "URL")]
    public_url: Option<String>,
    /// Also serve each service URL at the root of a host of its own, `PORT-BOXID.DOMAIN`
    /// (e.g. `localhost`, which browsers resolve to loopback; else a wildcard DNS name)
    #[arg(long, value_name = "DOMAIN")]
    service_domain: Option<String>,
    /// Guest memory in MiB of a sandbox from the default image whose request names none
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// vCPUs of a sandbox from the default image whose request names none
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    vcpus: u8,
    /// Seconds a sandbox has to become ready when it starts, is restored or forked
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Seconds without use after which a sandbox whose create names no `idle_ttl_seconds` is
    /// stopped (0: never)
    #[arg(long, value_name = "SECONDS", default_value_t = 600)]
    idle_ttl: u64,
    /// Seconds after it stopped that a sandbox whose create names no
    /// `delete_after_stop_seconds` is deleted [default: never]
    #[arg(long, value_name = "SECONDS")]
    delete_after_stop: Option<u64>,
    /// Keep N sandboxes of SNAPSHOT (`default`, or a template's name) restored and idle, so
    /// that a create of it takes one at once; refilled as creates take them (repeatable)
    #[arg(long = "pool", value_name = "SNAPSHOT=N", value_parser = server::pool::PoolSpec::parse)]
    pools: Vec<server::pool::PoolSpec>,
    /// Registry credentials for the snapshots built from Docker images, a docker config.json
    /// (`{"auths": {"REGISTRY": {"auth": base64("USER:PASS")}}}`; 0600) [default: this
    /// host's docker config.json, $DOCKER_CONFIG or ~/.docker]. Requests never carry any
    #[arg(long, value_name = "FILE")]
    registry_auth: Option<PathBuf>,
}

/// The server's records, traces and `local.json`: `server` beside the sandboxes' directory.
pub fn state_dir() -> anyhow::Result<PathBuf> {
    sandbox::Store::default_root()
        .parent()
        .map(|p| p.join("server"))
        .context("the state directory has no parent")
}

fn tenants(keys: Option<&PathBuf>) -> anyhow::Result<Tenants> {
    let Some(path) = keys else {
        return Ok(Tenants::open());
    };
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!("ember serve: warning: {} is readable by other users; its keys run code in your sandboxes (chmod 600 it)", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Tenants::parse(&text).with_context(|| format!("keys file {}", path.display()))
}

/// The `--registry-auth` file's credentials, read whole now: a broken file is an error at
/// start, not at a tenant's first build.
fn registry_credentials(path: Option<&PathBuf>) -> anyhow::Result<Option<image::Credentials>> {
    let Some(path) = path else { return Ok(None) };
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!("ember serve: warning: {} is readable by other users; it holds registry passwords (chmod 600 it)", path.display());
    }
    Ok(Some(image::Credentials::load(path)?))
}

pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    vmm::vstate::kvm::check_host()?;
    let tenants = tenants(args.keys.as_ref())?;
    let credentials = registry_credentials(args.registry_auth.as_ref())?;
    server::check_listen(&args.listen, &tenants).map_err(anyhow::Error::msg)?;
    let store = crate::store()?;
    let boot = crate::sandbox_spec(
        None,
        None,
        "default",
        args.mem_mib,
        args.vcpus,
        None,
        args.ready_timeout,
    )?;
    let state_dir = state_dir()?;
    let events_dir = state_dir.join("events");
    std::fs::create_dir_all(&events_dir)
        .with_context(|| format!("cannot create {}", events_dir.display()))?;
    let spill_dir = state_dir.join("spill");
    std::fs::create_dir_all(&spill_dir)
        .with_context(|| format!("cannot create {}", spill_dir.display()))?;
    // Its records and traces are its owner's alone, whatever the umask.
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", state_dir.display()))?;
    let mut config = server::Config::new(tenants);
    config.public_url = args.public_url;
    if let Some(domain) = &args.service_domain {
        let fits = !domain.is_empty()
            && !domain.starts_with(['.', '-'])
            && domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        anyhow::ensure!(fits, "--service-domain {domain:?} is not a DNS name (letters, digits, '-' and '.'; e.g. localhost)");
    }
    config.service_domain = args.service_domain;
    config.events_dir = Some(events_dir);
    config.spill = Some((spill_dir, SPILL_PER_COMMAND));
    config.ready_timeout = std::time::Duration::from_secs(args.ready_timeout);
    config.default_idle_ttl_seconds = args.idle_ttl;
    config.default_delete_after_stop_seconds = args.delete_after_stop;
    let templates = store.templates()?;
    for pool in &args.pools {
        if let server::backend::Source::Template(name) = &pool.source {
            if !templates.iter().any(|t| &t.name == name) {
                anyhow::bail!("--pool {name}={}: there is no template named {name} (see `ember template ls`, or use `default`)", pool.floor);
            }
        }
    }
    config.pools = args.pools;
    let local_key = server::local::new_key();
    config.local_key = Some(local_key.clone());
    let registry = server::registry::Registry::new(state_dir.join("registry.json"));
    let mut backend = SandboxBackend::new(store, boot, state_dir.clone());
    if let Ok(images) = super::image::image_store() {
        backend = backend.with_images(images);
    }
    if let Some(c) = credentials {
        backend = backend.with_registry_credentials(c);
    }
    let state = server::AppState::restore(
        Arc::new(backend),
        config,
        registry,
    )?;
    let adopted = state.boxes.all().len();
    if adopted > 0 {
        eprintln!("ember serve: adopted {adopted} sandboxes from the last run");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the server's runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        eprintln!(
            "ember serve: listening on http://{}",
            listener.local_addr()?
        );
        // For `ember expose`: where this server is, and the key of its own user.
        let access = server::local::LocalAccess { url: server::local::url_of(listener.local_addr()?), key: local_key };
        access.write(&state_dir)?;
        let served = server::serve(listener, state, server::until_signalled()).await;
        access.remove_if_ours(&state_dir);
        served.context("the server failed")
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::registry_credentials;

    #[test]
    fn a_broken_registry_auth_file_stops_the_start_naming_it() {
        assert!(registry_credentials(None).unwrap().is_none(), "without: the host's docker config.json, read at each pull");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(&file, r#"{"auths": {"reg.example": {"auth": "!!"}}}"#).unwrap();
        let e = format!("{:#}", registry_credentials(Some(&file)).unwrap_err());
        assert!(e.contains("auth.json") && e.contains("reg.example"), "{e}");
        std::fs::write(&file, r#"{"auths": {"reg.example": {"auth": "dTpw"}}}"#).unwrap();
        assert_eq!(registry_credentials(Some(&file)).unwrap().unwrap().get("reg.example"), Some(("u".into(), "p".into())));
        assert!(registry_credentials(Some(&dir.path().join("none"))).is_err());
    }
}
