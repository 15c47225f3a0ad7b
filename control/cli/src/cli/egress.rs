//! Egress on the command line: `ember run --detach --proxy-config FILE --allow-net HOST...`
//! made into the sandbox's `proxy_config`; `ember egress NAME`, its audit events, and with
//! the same flags, a new policy for it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use egress::config::{AccessControl, ProxyConfig};
use sandbox::Store;

/// The egress flags of `ember run --detach` and `ember egress`. Without either a sandbox has
/// no egress at all.
#[derive(Args, Debug, Default)]
pub struct EgressFlags {
    /// Give the sandbox egress through a proxy on this host, under this proxy_config (JSON, the
    /// LangSmith SDK's: rules, access_control with an allow_list or a deny_list)
    #[arg(long, value_name = "FILE.json")]
    pub proxy_config: Option<PathBuf>,
    /// Let the sandbox reach HOST (a name, *.glob, IP, CIDR, ~regex or HOST:PORT) through its
    /// proxy: added to the proxy_config's allow_list, made one if it has none (repeatable;
    /// comma-separated lists too)
    #[arg(long = "allow-net", value_name = "HOST", num_args = 1.., value_delimiter = ',')]
    pub allow_net: Vec<String>,
}

impl EgressFlags {
    pub fn given(&self) -> bool {
        self.proxy_config.is_some() || !self.allow_net.is_empty()
    }

    /// The sandbox's `proxy_config`, if the flags ask for egress.
    pub fn proxy_config(&self) -> anyhow::Result<Option<ProxyConfig>> {
        let file = match &self.proxy_config {
            Some(path) => Some(read_config(path)?),
            None => None,
        };
        merge(file, &self.allow_net).map_err(anyhow::Error::msg)
    }
}

fn read_config(path: &Path) -> anyhow::Result<ProxyConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the proxy config {}", path.display()))?;
    ProxyConfig::from_json(&text).with_context(|| format!("the proxy config {}", path.display()))
}

/// `file`'s config with `allow` added to its allow list; `allow` alone is an allow list.
fn merge(file: Option<ProxyConfig>, allow: &[String]) -> Result<Option<ProxyConfig>, String> {
    let allow: Vec<String> = allow.iter().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect();
    if allow.is_empty() {
        return Ok(file);
    }
    let mut config = file.unwrap_or_default();
    let access = config.access_control.get_or_insert_with(AccessControl::default);
    if access.deny_list.is_some() {
        return Err("--allow-net makes an allow list, and the proxy config has a deny_list: give one or the other".into());
    }
    access.allow_list.get_or_insert_with(Vec::new).extend(allow);
    Ok(Some(config))
}

/// `ember egress NAME`: the sandbox's egress audit events, as its proxy wrote them; with
/// `--allow-net`/`--proxy-config`, its policy replaced instead (egress given if it had none).
#[derive(Args)]
pub struct EgressArgs {
    name: String,
    #[command(flatten)]
    set: EgressFlags,
}

pub fn egress(args: EgressArgs, store: &Store) -> anyhow::Result<()> {
    match args.set.proxy_config()? {
        // New connections are decided by it; those under way keep the policy they began with.
        Some(config) => Ok(store.set_egress(&args.name, &config).map(drop)?),
        None => show(&args.name, store),
    }
}

fn show(name: &str, store: &Store) -> anyhow::Result<()> {
    let path = store.egress_audit(name)?;
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mut out = std::io::stdout().lock();
            match out.write_all(&bytes).and_then(|()| out.flush()) {
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(128 + libc::SIGPIPE),
                r => r.context("cannot write to stdout")?,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if store.egress_policy(name)?.is_none() {
                bail!("sandbox {name} has no egress (ember egress {name} --allow-net HOST or --proxy-config FILE gives it some)");
            }
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_list(config: &ProxyConfig) -> Vec<String> {
        config.access_control.as_ref().and_then(|a| a.allow_list.clone()).unwrap_or_default()
    }

    #[test]
    fn allow_net_makes_an_allow_list_or_adds_to_the_files() {
        assert_eq!(merge(None, &[]).unwrap(), None, "no flags, no egress");
        let hosts = ["pypi.org".to_string(), "*.github.com".to_string(), " ".to_string()];
        let made = merge(None, &hosts).unwrap().unwrap();
        assert_eq!(allow_list(&made), ["pypi.org", "*.github.com"]);
        assert!(made.rules.is_none());

        let file = ProxyConfig::from_json(r#"{"rules": [{"name": "r", "match_hosts": ["api.x.com"]}], "access_control": {"allow_list": ["api.x.com"]}}"#).unwrap();
        let merged = merge(Some(file.clone()), &hosts[..1]).unwrap().unwrap();
        assert_eq!(allow_list(&merged), ["api.x.com", "pypi.org"]);
        assert_eq!(merged.rules, file.rules, "the file's rules are kept");
        assert_eq!(merge(Some(file.clone()), &[]).unwrap(), Some(file), "the file alone, as written");

        let deny = ProxyConfig::from_json(r#"{"access_control": {"deny_list": ["evil.com"]}}"#).unwrap();
        assert!(merge(Some(deny), &hosts).unwrap_err().contains("deny_list"));
    }
}
