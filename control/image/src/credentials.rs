//! Registry credentials in docker's `config.json` format (`{"auths": {"REGISTRY": {"auth":
//! base64("USER:PASS")}}}`): the host's own (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`), or a file `ember serve --registry-auth` names. Credential helpers
//! (`credsStore`, `credHelpers`) are not run; their registries need an `auth` entry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::error::ImageError;

/// USER and PASS by registry (`host[:port]`). Debug shows the registries only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, (String, String)>);

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Credentials").field(&self.0.keys().collect::<Vec<_>>()).finish()
    }
}

/// `https://reg.example:5000/` and `reg.example:5000` are the same registry.
fn registry_key(key: &str) -> &str {
    key.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/')
}

impl Credentials {
    /// A config.json's credentials; an entry without `auth` (a credential helper's) is
    /// skipped, one whose `auth` is not base64 of `USER:PASS` is an error naming it.
    pub fn parse(bytes: &[u8]) -> Result<Credentials, String> {
        let config: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
        let mut out = BTreeMap::new();
        let Some(auths) = config.get("auths") else {
            return Ok(Credentials(out));
        };
        let auths = auths.as_object().ok_or("\"auths\" is not an object")?;
        for (registry, entry) in auths {
            let Some(auth) = entry.get("auth") else { continue };
            let bad = || format!("the auth of {registry:?} is not base64 of USER:PASS");
            let decoded = base64::engine::general_purpose::STANDARD.decode(auth.as_str().ok_or_else(bad)?).map_err(|_| bad())?;
            let (user, pass) = std::str::from_utf8(&decoded).ok().and_then(|s| s.split_once(':')).ok_or_else(bad)?;
            out.insert(registry_key(registry).to_string(), (user.to_string(), pass.to_string()));
        }
        Ok(Credentials(out))
    }

    /// The credentials of the file at `path`: a file named on purpose must be read whole.
    pub fn load(path: &Path) -> Result<Credentials, ImageError> {
        let bytes = std::fs::read(path).map_err(crate::error::io("cannot read registry credentials", path))?;
        Credentials::parse(&bytes).map_err(|problem| ImageError::Io { what: "invalid registry credentials (docker config.json format)", path: path.into(), error: std::io::Error::other(problem) })
    }

    /// The host's docker config.json, if it has one that parses; a broken one is logged and
    /// passed over, as docker's own absence would be.
    pub fn from_host() -> Credentials {
        let Some(path) = host_config() else { return Credentials::default() };
        match std::fs::read(&path) {
            Ok(bytes) => Credentials::parse(&bytes).unwrap_or_else(|e| {
                tracing::warn!("{}: {e}; its credentials are not used", path.display());
                Credentials::default()
            }),
            Err(_) => Credentials::default(),
        }
    }

    /// USER and PASS for `registry` (`host[:port]`).
    pub fn get(&self, registry: &str) -> Option<(String, String)> {
        self.0.get(registry).cloned()
    }
}

fn host_config() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    Some(dir.join("config.json"))
}

#[cfg(test)]
mod tests {
    use super::Credentials;
    use base64::Engine as _;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn credentials_are_found_by_registry_and_helpers_entries_skipped() {
        let config = serde_json::json!({"auths": {"https://reg.example:5000/": {"auth": b64("me:pa:ss")}, "helped.example": {}}, "credsStore": "desktop"});
        let c = Credentials::parse(config.to_string().as_bytes()).unwrap();
        assert_eq!(c.get("reg.example:5000"), Some(("me".into(), "pa:ss".into())));
        assert_eq!(c.get("helped.example"), None);
        assert_eq!(c.get("third.example"), None);
        assert_eq!(format!("{c:?}"), r#"Credentials(["reg.example:5000"])"#, "no secrets in Debug");
        assert_eq!(Credentials::parse(b"{}").unwrap(), Credentials::default());
    }

    #[test]
    fn a_broken_entry_is_named() {
        for auth in ["!!", &b64("no colon")] {
            let config = serde_json::json!({"auths": {"reg.example": {"auth": auth}}});
            let e = Credentials::parse(config.to_string().as_bytes()).unwrap_err();
            assert!(e.contains("reg.example") && e.contains("USER:PASS"), "{e}");
        }
        assert!(Credentials::parse(b"not json").unwrap_err().contains("not JSON"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(&file, br#"{"auths": []}"#).unwrap();
        let e = Credentials::load(&file).unwrap_err().to_string();
        assert!(e.contains("auth.json") && e.contains("\"auths\" is not an object"), "{e}");
    }

    #[test]
    fn the_host_s_config_is_docker_config_s() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), serde_json::json!({"auths": {"reg.example": {"auth": b64("u:p")}}}).to_string()).unwrap();
        // The only test of this binary that reads DOCKER_CONFIG.
        std::env::set_var("DOCKER_CONFIG", dir.path());
        assert_eq!(Credentials::from_host().get("reg.example"), Some(("u".into(), "p".into())));
        std::fs::write(dir.path().join("config.json"), b"broken").unwrap();
        assert_eq!(Credentials::from_host(), Credentials::default(), "a broken host config is passed over");
    }
}
