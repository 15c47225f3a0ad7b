//! The host's secrets, which rules' `workspace_secret` headers name: read from a JSON file of
//! names to values that only its owner can read, or from environment variables with a prefix.
//! They are resolved when a policy is compiled, so an unknown name is an error then and not a
//! request that goes out without its credential. Nothing here is ever sent into the guest.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {0} is not in the host's secret store")]
    Missing(String),
    #[error("{value:?} has no {{NAME}} reference to a secret")]
    NoReference { value: String },
    #[error("{value:?} has an unclosed or empty {{NAME}} reference")]
    BadReference { value: String },
    #[error(
        "the secret file {} can be read by group or others (mode {mode:o}): chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the secret file {} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("cannot read the secret file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret file {} is not a JSON object of names to strings: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Secrets by name. Its `Debug` shows names, never values.
#[derive(Default)]
pub struct SecretStore {
    secrets: HashMap<String, String>,
}

impl fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.secrets.keys().collect();
        names.sort();
        f.debug_struct("SecretStore")
            .field("names", &names)
            .finish()
    }
}

impl SecretStore {
    /// A JSON object `{"NAME": "value", ...}` in a file of mode 0600 (or stricter): a file
    /// that others can read has already leaked what it holds, so it is refused, not used.
    pub fn from_file(path: &Path) -> Result<SecretStore, SecretError> {
        let read = |source| SecretError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read)?;
        // The opened file's own metadata, so that a swap of the path after the check
        // changes nothing.
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(SecretError::NotAFile(path.to_path_buf()));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(read)?;
        let secrets = serde_json::from_str(&text).map_err(|source| SecretError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(SecretStore { secrets })
    }

    /// Secret `NAME` is the variable `{prefix}NAME` of this process's environment, as it is
    /// now (a later change to the environment is not seen).
    pub fn from_env(prefix: &str) -> SecretStore {
        SecretStore::from_vars(prefix, std::env::vars())
    }

    /// [`SecretStore::from_env`] over the given variables.
    pub fn from_vars(
        prefix: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> SecretStore {
        let secrets = vars
            .into_iter()
            .filter_map(|(key, value)| Some((key.strip_prefix(prefix)?.to_string(), value)))
            .filter(|(name, _)| !name.is_empty())
            .collect();
        SecretStore { secrets }
    }

    /// `template` with every `{NAME}` replaced by secret `NAME` (`Bearer {GH_TOKEN}`); the
    /// SDK's `workspace_secret("X")` is `{X}`, the whole value.
    pub fn resolve(&self, template: &str) -> Result<String, SecretError> {
        let bad = || SecretError::BadReference {
            value: template.to_string(),
        };
        let mut out = String::new();
        let mut rest = template;
        let mut references = 0;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or_else(bad)?;
            let name = after[..close].trim();
            if name.is_empty() || name.contains('{') {
                return Err(bad());
            }
            let value = self
                .secrets
                .get(name)
                .ok_or_else(|| SecretError::Missing(name.to_string()))?;
            out.push_str(value);
            references += 1;
            rest = &after[close + 1..];
        }
        if references == 0 {
            return Err(SecretError::NoReference {
                value: template.to_string(),
            });
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, mode: u32, text: &str) -> PathBuf {
        let path = dir.join("secrets.json");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_0600_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 0o600, r#"{"GH_TOKEN": "ghp_x", "KEY": "k"}"#);
        let store = SecretStore::from_file(&path).unwrap();
        assert_eq!(store.resolve("{GH_TOKEN}").unwrap(), "ghp_x");
        assert_eq!(
            store.resolve("Bearer { GH_TOKEN }, {KEY}.").unwrap(),
            "Bearer ghp_x, k."
        );
    }

    #[test]
    fn a_file_others_can_read_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            let path = write(dir.path(), mode, r#"{"A": "b"}"#);
            let err = SecretStore::from_file(&path).unwrap_err().to_string();
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
            assert!(err.contains(&format!("mode {mode:o}")), "{err}");
        }
    }

    #[test]
    fn a_file_that_is_not_names_to_strings_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), 0o600, r#"{"A": 1}"#);
        let err = SecretStore::from_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("not a JSON object of names to strings"),
            "{err}"
        );
        let err = SecretStore::from_file(&dir.path().join("absent"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the secret file"), "{err}");
    }

    #[test]
    fn environment_secrets_are_the_prefixed_variables() {
        let store = SecretStore::from_vars(
            "EMBER_SECRET_",
            [
                ("EMBER_SECRET_GH_TOKEN".to_string(), "ghp_y".to_string()),
                ("GH_TOKEN".to_string(), "not this one".to_string()),
            ],
        );
        assert_eq!(store.resolve("{GH_TOKEN}").unwrap(), "ghp_y");
        assert!(format!("{store:?}").contains("GH_TOKEN"));
        assert!(
            !format!("{store:?}").contains("ghp_y"),
            "Debug shows no value"
        );
    }

    #[test]
    fn an_unresolved_reference_names_the_secret() {
        let store = SecretStore::default();
        let err = store
            .resolve("Bearer {OPENAI_KEY}")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "secret OPENAI_KEY is not in the host's secret store");
        assert!(matches!(
            store.resolve("plain"),
            Err(SecretError::NoReference { .. })
        ));
        assert!(matches!(
            store.resolve("{open"),
            Err(SecretError::BadReference { .. })
        ));
        assert!(matches!(
            store.resolve("{}"),
            Err(SecretError::BadReference { .. })
        ));
    }
}
