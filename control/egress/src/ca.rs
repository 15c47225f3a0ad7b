//! The deployment's interception CA: made once into a directory (`ca.key`, mode 0600, and
//! `ca.pem`), loaded from it after; it mints the leaf certificate an intercepted connection is
//! served with, per host, on demand. Guests trust `ca.pem` (their trust stores get it at
//! start); the key never leaves the host and is never logged.
//!
//! Only the key is the CA's identity: its certificate's subject is derived from its public key
//! and the issuer of every leaf is written from the same parameters, so a loaded CA signs
//! leaves that chain to the certificate made when it was created, without parsing it.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

pub const KEY_FILE: &str = "ca.key";
pub const CERT_FILE: &str = "ca.pem";

/// Leaves kept; past it the oldest goes. One sandbox names a few hosts, a host's many.
pub const LEAF_CACHE: usize = 1024;
/// A cached leaf is minted anew after this, well within its validity.
const LEAF_RENEW: Duration = Duration::from_secs(24 * 3600);
const LEAF_VALID_DAYS: i64 = 7;
const CA_VALID_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the CA key {} can be read by group or others (mode {mode:o}): chmod 600 {}",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("CA certificate {}: {message}", path.display())]
    BadCertificate { path: PathBuf, message: String },
    #[error("cannot make a certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot use a minted key: {0}")]
    Tls(#[from] rustls::Error),
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

impl Ca {
    /// The CA in `dir`, made there first if it has none. `dir` is made mode 0700.
    pub fn load_or_create(dir: &Path) -> Result<Ca, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        let key_path = dir.join(KEY_FILE);
        let key = match load_key(&key_path)? {
            Some(key) => key,
            None => create_key(&key_path)?,
        };
        let params = ca_params(&key);
        let cert_path = dir.join(CERT_FILE);
        let cert_pem = match std::fs::read_to_string(&cert_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let pem = params.self_signed(&key)?.pem();
                // Written whole under another name first: a reader never sees half of it.
                let tmp = dir.join(format!("{CERT_FILE}.tmp"));
                std::fs::write(&tmp, &pem).map_err(io(&tmp))?;
                std::fs::rename(&tmp, &cert_path).map_err(io(&cert_path))?;
                pem
            }
            Err(e) => return Err(io(&cert_path)(e)),
        };
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| {
            CaError::BadCertificate {
                path: cert_path,
                message: e.to_string(),
            }
        })?;
        Ok(Ca {
            issuer: Issuer::new(params, key),
            cert_der,
            cert_pem,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM, for the guest's trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// A certificate for `host` (a DNS name or an IP address) and its key, minted now or
    /// taken from the cache.
    pub fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        if let Some((minted, leaf)) = self.leaves.lock().unwrap().get(host) {
            if minted.elapsed() < LEAF_RENEW {
                return Ok(leaf.clone());
            }
        }
        // Minted outside the lock: two racing connections mint twice, and neither waits.
        let leaf = Arc::new(self.mint(host)?);
        let mut leaves = self.leaves.lock().unwrap();
        if leaves.len() >= LEAF_CACHE && !leaves.contains_key(host) {
            if let Some(oldest) = leaves
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(h, _)| h.clone())
            {
                leaves.remove(&oldest);
            }
        }
        leaves.insert(host.to_string(), (Instant::now(), leaf.clone()));
        Ok(leaf)
    }

    fn mint(&self, host: &str) -> Result<CertifiedKey, CaError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, host);
        params.distinguished_name = name;
        let now = OffsetDateTime::now_utc();
        // A day's slack for a guest whose clock is behind.
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(LEAF_VALID_DAYS);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = self.provider.key_provider.load_private_key(der)?;
        Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
    }
}

/// The CA's parameters, a function of its key alone (see the module).
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let id: String = key
        .public_key_raw()
        .iter()
        .skip(1)
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "ember");
    name.push(DnType::CommonName, format!("ember egress CA {id}"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_VALID_DAYS);
    params
}

/// The key at `path`, `None` if there is none; refused if others can read it.
fn load_key(path: &Path) -> Result<Option<KeyPair>, CaError> {
    let pem = match std::fs::File::open(path) {
        Ok(file) => {
            let io = |source| CaError::Io {
                path: path.to_path_buf(),
                source,
            };
            let mode = file.metadata().map_err(io)?.mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(CaError::Exposed {
                    path: path.to_path_buf(),
                    mode,
                });
            }
            std::io::read_to_string(file).map_err(io)?
        }
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CaError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    Ok(Some(KeyPair::from_pem(&pem)?))
}

/// A new key at `path`, made 0600 from its first byte; if another process made one first,
/// that one.
fn create_key(path: &Path) -> Result<KeyPair, CaError> {
    let key = KeyPair::generate()?;
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(key.serialize_pem().as_bytes()).map_err(io)?;
            file.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            load_key(path)?.ok_or_else(|| io(std::io::Error::from(ErrorKind::NotFound)))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::RootCertStore;
    use std::os::unix::fs::PermissionsExt;

    /// Whether `leaf` is a valid certificate for `host` under `root`, as a TLS client decides.
    fn verifies(root: &CertificateDer<'static>, leaf: &CertifiedKey, host: &str) -> bool {
        let mut roots = RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let name = ServerName::try_from(host.to_string()).unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn made_once_then_loaded_and_leaves_chain_to_the_first_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = Ca::load_or_create(&ca_dir).unwrap();
        let mode = |name: &str| std::fs::metadata(ca_dir.join(name)).unwrap().mode() & 0o777;
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(std::fs::metadata(&ca_dir).unwrap().mode() & 0o777, 0o700);
        assert!(first.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));

        let loaded = Ca::load_or_create(&ca_dir).unwrap();
        assert_eq!(loaded.cert_pem(), first.cert_pem());
        let leaf = loaded.leaf("api.example.com").unwrap();
        assert!(verifies(first.cert_der(), &leaf, "api.example.com"));
        assert!(!verifies(first.cert_der(), &leaf, "other.example.com"));

        let elsewhere = Ca::load_or_create(&dir.path().join("other")).unwrap();
        assert!(!verifies(elsewhere.cert_der(), &leaf, "api.example.com"));
    }

    #[test]
    fn a_lost_certificate_is_made_again_from_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let first = Ca::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        let again = Ca::load_or_create(dir.path()).unwrap();
        let leaf = again.leaf("example.com").unwrap();
        assert!(verifies(first.cert_der(), &leaf, "example.com"));
    }

    #[test]
    fn leaves_for_ip_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let leaf = ca.leaf("127.0.0.1").unwrap();
        assert!(verifies(ca.cert_der(), &leaf, "127.0.0.1"));
    }

    #[test]
    fn leaves_are_cached_and_the_cache_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let a = ca.leaf("a.example").unwrap();
        assert!(Arc::ptr_eq(&a, &ca.leaf("a.example").unwrap()));
        for i in 0..LEAF_CACHE {
            ca.leaf(&format!("h{i}.example")).unwrap();
        }
        assert_eq!(ca.leaves.lock().unwrap().len(), LEAF_CACHE);
        assert!(
            !Arc::ptr_eq(&a, &ca.leaf("a.example").unwrap()),
            "the oldest went first"
        );
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        Ca::load_or_create(dir.path()).unwrap();
        let key = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = Ca::load_or_create(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(&format!("chmod 600 {}", key.display())),
            "{err}"
        );
    }
}
