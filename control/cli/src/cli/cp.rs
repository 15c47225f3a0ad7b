//! `ember cp`: copy a file between this host and a sandbox, streamed in constant memory.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use agent_client::{self, ClientError};
use sandbox::Store;

use super::{agent_socket, connect, EXIT_EMBER_ERROR};

#[derive(Args)]
pub struct CpArgs {
    /// LOCAL, NAME:PATH or - (stdin)
    source: String,
    /// NAME:PATH, LOCAL or - (stdout)
    destination: String,
    /// Instead of sandbox NAME's: a VM's vsock socket (the uds= of `ember run --vsock`); NAME
    /// is then only a placeholder
    #[arg(long)]
    uds: Option<PathBuf>,
}

/// `NAME:PATH` names a file in sandbox NAME; anything else (including paths with a `/` before
/// the first `:`) is local.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (!name.is_empty() && !name.contains('/') && !path.is_empty()).then_some((name, path))
}

fn file_name(path: &str) -> Option<&str> {
    path.rsplit('/').find(|s| !s.is_empty())
}

pub fn cp(args: CpArgs, store: &Store) -> anyhow::Result<ExitCode> {
    match copy(&args, store) {
        Ok(bytes) => {
            tracing::info!("copied {bytes} bytes");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("ember: error: {}", super::error_line(&e));
            Ok(ExitCode::from(EXIT_EMBER_ERROR))
        }
    }
}

fn agent(store: &Store, name: &str, args: &CpArgs) -> anyhow::Result<std::os::unix::net::UnixStream> {
    let socket = agent_socket(store, Some(name), args.uds.as_ref())?;
    connect(&socket, agent_protocol::DEFAULT_PORT)
}

fn copy(args: &CpArgs, store: &Store) -> anyhow::Result<u64> {
    match (remote(&args.source), remote(&args.destination)) {
        (None, Some((name, path))) => {
            let mut stream = agent(store, name, args)?;
            let (reader, mode, local_name): (Box<dyn std::io::Read + Send>, u32, Option<String>) = if args.source == "-" {
                (Box::new(std::io::stdin()), 0o644, None)
            } else {
                let file = File::open(&args.source).with_context(|| format!("cannot open {}", args.source))?;
                let meta = file.metadata().with_context(|| format!("cannot stat {}", args.source))?;
                if meta.is_dir() {
                    bail!("{} is a directory; ember cp copies files", args.source);
                }
                (Box::new(file), meta.permissions().mode() & 0o7777, file_name(&args.source).map(str::to_string))
            };
            // Into a directory: keep the file's name, as cp does.
            let target = match (agent_client::stat(&mut stream, path), local_name) {
                (Ok(st), Some(n)) if st.kind == agent_protocol::FileKind::Dir => format!("{}/{n}", path.trim_end_matches('/')),
                _ => path.to_string(),
            };
            Ok(agent_client::upload(&mut stream, reader, &target, mode)?)
        }
        (Some((name, path)), None) => {
            let mut stream = agent(store, name, args)?;
            if args.destination == "-" {
                let mut out = std::io::stdout().lock();
                let n = agent_client::download(&mut stream, path, &mut out)?;
                out.flush()?;
                return Ok(n);
            }
            let mut local = PathBuf::from(&args.destination);
            if local.is_dir() {
                local.push(file_name(path).context("the guest path names no file")?);
            }
            download_to(&mut stream, path, &local)
        }
        (Some(_), Some(_)) => bail!("copying between two sandboxes is not supported; copy through the host"),
        (None, None) => bail!("one side must be NAME:PATH in a sandbox"),
    }
}

/// Downloads into a temporary file next to `local` and renames it into place, so a failed copy
/// leaves no half-written file. Errors name `local`: the temporary file is ember's business.
fn download_to(stream: &mut std::os::unix::net::UnixStream, path: &str, local: &Path) -> anyhow::Result<u64> {
    let parent = match local.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!("cannot write {}: there is no directory {} on this host", local.display(), parent.display());
    }
    let partial = local.with_file_name(format!(".{}.ember-partial", local.file_name().and_then(|n| n.to_str()).unwrap_or("download")));
    let mut file = File::create(&partial).map_err(|e| write_error(local, e))?;
    let result = agent_client::download(stream, path, &mut file).map_err(|e: ClientError| anyhow::Error::new(e));
    let result = result.and_then(|n| {
        file.sync_all().map_err(|e| write_error(local, e))?;
        std::fs::rename(&partial, local).map_err(|e| write_error(local, e))?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// `cannot write out.txt: Permission denied`.
fn write_error(local: &Path, e: std::io::Error) -> anyhow::Error {
    let text = e.to_string();
    let reason = text.rfind(" (os error ").map_or(text.as_str(), |at| &text[..at]);
    anyhow::anyhow!("cannot write {}: {reason}", local.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_and_local_arguments() {
        assert_eq!(remote("sb:/tmp/x"), Some(("sb", "/tmp/x")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/abs/path"), None);
        assert_eq!(remote(":x"), None);
        assert_eq!(remote("sb:"), None);
        assert_eq!(file_name("/a/b/"), Some("b"));
    }
}
