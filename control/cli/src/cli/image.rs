//! `ember image pull|import|ls|rm`: OCI and Docker images made into base images that
//! `ember run --detach --image NAME` boots, their Env, WorkingDir and User the defaults of
//! every exec in sandboxes made from them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Pull an image for linux/amd64 from a registry and make a base image of it; layers the
    /// cache has are not fetched again. Progress on stderr
    Pull(PullArgs),
    /// Make a base image from an OCI image layout directory or a `docker save` archive (which
    /// needs root: the image's files keep their owners)
    Import(ImportArgs),
    /// List the images made from OCI images
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Forget images by name; an image's file goes with its last name (refused while a
    /// template or sandbox has its disk on it)
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(Args)]
pub struct BuildArgs {
    /// Name the image is known by (name:tag) [default: the tag the image carries]
    #[arg(long)]
    name: Option<String>,
    /// Size of its disk (ext4, sparse): bytes, or with K, M, G (also KB, MB, GB, KiB, ...)
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    capacity: u64,
    /// Print the image's entry as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct PullArgs {
    /// [REGISTRY/]REPOSITORY[:TAG|@DIGEST]
    reference: String,
    /// Credentials for the registry [default: docker's config.json, else none]
    #[arg(long, value_name = "USER:PASS", value_parser = parse_auth)]
    registry_auth: Option<(String, String)>,
    /// Plain HTTP to a registry not on loopback (loopback registries always may)
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    build: BuildArgs,
}

fn parse_auth(s: &str) -> Result<(String, String), String> {
    s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())).ok_or_else(|| "expected USER:PASS".to_string())
}

#[derive(Args)]
pub struct ImportArgs {
    /// An OCI image layout directory, or a `docker save` archive (tar)
    path: PathBuf,
    /// Which image of the layout or archive, by its tag, when it holds several
    #[arg(long)]
    tag: Option<String>,
    #[command(flatten)]
    build: BuildArgs,
}

/// `4gb`, `512M`, `2GiB`, `1048576`: binary units, as disk sizes go.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let shift = match &lower[digits.len()..] {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        unit => return Err(format!("unknown unit {unit:?} in {s:?}: use K, M, G or T")),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift).filter(|&b| b >= 16 << 20).ok_or_else(|| format!("{s:?}: a disk of 16 MiB to 16 EiB"))
}

/// The image store: `$EMBER_HOME/images/oci` (where every VMM's jail sees the images), the
/// layers pulls fetch in `$EMBER_STATE/blobs`.
pub fn image_store() -> anyhow::Result<image::Store> {
    let home = std::env::var_os("EMBER_HOME").context("set EMBER_HOME: imported images go into $EMBER_HOME/images/oci")?;
    let state = sandbox::Store::default_root();
    let state = state.parent().unwrap_or(&state).to_path_buf();
    Ok(image::Store::new(PathBuf::from(home).join("images/oci"), state.join("blobs")))
}

/// The file of image `name` when the store has one by that name.
pub fn resolve(name: &str) -> Option<PathBuf> {
    let store = image_store().ok()?;
    store.find(name).ok().map(|e| store.path(&e))
}

pub fn image(cmd: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = image_store()?;
    match cmd {
        ImageCommand::Pull(args) => {
            let opts = image::PullOptions { auth: args.registry_auth, insecure: args.insecure, credentials: None };
            let (resolved, stats) = image::pull(&store, &args.reference, &opts, &mut |line| eprintln!("ember: {line}"))?;
            let scratch = image::ScratchDir::new(store.dir())?;
            build(&store, resolved, args.build, scratch.path(), Some(stats))
        }
        ImageCommand::Import(args) => {
            let shown = args.path.display().to_string();
            let scratch = image::ScratchDir::new(store.dir())?;
            let resolved = if args.path.is_dir() {
                image::from_layout(&args.path, &shown, args.tag.as_deref())?
            } else {
                image::from_docker_archive(&args.path, scratch.path(), &shown, args.tag.as_deref())?
            };
            build(&store, resolved, args.build, scratch.path(), None)
        }
        ImageCommand::Ls { json } => {
            let list = store.list()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                outln!("{:<40} {:<19} {:>9}  FILE", "NAME", "DIGEST", "CAPACITY");
                for e in list {
                    let short = e.digest.get(..19).unwrap_or(&e.digest);
                    outln!("{:<40} {short:<19} {:>7}Mi  {}", e.name, e.capacity >> 20, store.path(&e).display());
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ImageCommand::Rm { names } => {
            let mut failed = false;
            for name in names {
                if let Err(e) = in_use(&store, &name).and_then(|()| Ok(store.remove(&name)?)) {
                    eprintln!("ember: error: {e}");
                    failed = true;
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

/// Refuses to remove the last name of an image a template or sandbox has its disk on.
fn in_use(store: &image::Store, name: &str) -> anyhow::Result<()> {
    let entry = store.find(name)?;
    if store.list()?.iter().any(|e| e.file == entry.file && e.name != entry.name) {
        return Ok(());
    }
    let file = store.path(&entry).canonicalize().unwrap_or_else(|_| store.path(&entry));
    let same = |p: &Path| p.canonicalize().is_ok_and(|p| p == file);
    let sandboxes = crate::store()?;
    if let Some(t) = sandboxes.templates()?.into_iter().find(|t| same(&t.image)) {
        bail!("image {} is the disk of template {}: `ember template rm {}` first", entry.name, t.name, t.name);
    }
    if let Some(s) = sandboxes.list()?.into_iter().find(|s| same(&s.record.image)) {
        bail!("image {} is the disk of sandbox {}: `ember rm {}` first", entry.name, s.record.name, s.record.name);
    }
    Ok(())
}

/// Builds a resolved image into the store and prints its entry; the JSON has where the time
/// went, the pull's (`pull` given) and the build's.
pub fn build(store: &image::Store, resolved: image::Resolved, args: BuildArgs, scratch: &Path, pull: Option<image::PullStats>) -> anyhow::Result<ExitCode> {
    let Some(name) = args.name.or_else(|| resolved.tag.clone()) else {
        bail!("{} carries no tag to name it by: pass --name NAME:TAG", resolved.image);
    };
    let agent = image::find_agent(scratch)?;
    let opts = image::BuildOptions { name: image::normalize(&name)?, capacity: args.capacity, agent };
    let (entry, times) = image::build(store, resolved, &opts, &mut |line| eprintln!("ember: {line}"))?;
    if args.json {
        let mut v = serde_json::to_value(&entry)?;
        v["path"] = serde_json::json!(store.path(&entry));
        v["timings"] = timings(pull, times);
        outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        outln!("{} {} {}", entry.name, entry.digest, store.path(&entry).display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Seconds of each step, for `--json`: fetch (null for an import), unpack, mkfs and fsck (0
/// when the image was built before and only named again).
fn timings(pull: Option<image::PullStats>, times: image::BuildTimes) -> serde_json::Value {
    let s = |d: std::time::Duration| d.as_secs_f64();
    serde_json::json!({
        "fetch_s": pull.map(|p| s(p.elapsed)),
        "blobs_fetched": pull.map(|p| p.fetched),
        "blobs_cached": pull.map(|p| p.cached),
        "bytes_fetched": pull.map(|p| p.bytes),
        "unpack_s": s(times.unpack),
        "mkfs_s": s(times.mkfs),
        "fsck_s": s(times.fsck),
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_size, timings};

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4gb"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("33554432"), Ok(32 << 20));
        assert!(parse_size("1k").is_err(), "too small for a disk");
        assert!(parse_size("4xb").is_err());
    }

    #[test]
    fn timings_name_each_step_in_seconds() {
        use std::time::Duration;
        let pull = image::PullStats { fetched: 2, cached: 1, bytes: 3 << 20, elapsed: Duration::from_millis(1500) };
        let times = image::BuildTimes { unpack: Duration::from_millis(250), mkfs: Duration::from_secs(2), fsck: Duration::from_millis(500) };
        let v = timings(Some(pull), times);
        assert_eq!(v["fetch_s"], 1.5);
        assert_eq!((v["blobs_fetched"].as_u64(), v["blobs_cached"].as_u64(), v["bytes_fetched"].as_u64()), (Some(2), Some(1), Some(3 << 20)));
        assert_eq!((v["unpack_s"].as_f64(), v["mkfs_s"].as_f64(), v["fsck_s"].as_f64()), (Some(0.25), Some(2.0), Some(0.5)));
        assert!(timings(None, times)["fetch_s"].is_null(), "an import fetched nothing");
    }
}
