//! The egress proxy's CA in the guest's trust store, so that TLS the proxy intercepts (with
//! leaves from that CA) verifies in the guest's programs.
//!
//! The certificate goes where an administrator's own CA goes on Debian
//! (`/usr/local/share/ca-certificates/ember-egress.crt`, which a later `update-ca-certificates`
//! keeps in the bundle), and into the system bundle itself, appended in place: the agent does
//! not run `update-ca-certificates`, which rebuilds the bundle and its links from every
//! certificate with a few processes each (~600 for Debian's 142; 1.6 s on the development host,
//! many times that in an emulated guest), on every sandbox start. OpenSSL, and with it Python,
//! curl, wget and git, reads the bundle; Python's `requests`, pip and Node read the variables
//! the agent gives every exec (see `egress`). The hashed links of `/etc/ssl/certs` (OpenSSL's
//! CApath) do not get it: nothing the images run reads them alone.
//!
//! Idempotent: the same certificate installed again writes nothing (a restored or forked
//! sandbox's disk and memory stay as they were); a different one (another deployment's CA)
//! replaces the one installed before in the bundle.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the certificate itself goes, relative to the root.
const LOCAL_CERT: &str = "usr/local/share/ca-certificates/ember-egress.crt";
/// System bundles, the first one that exists taken: Debian, Ubuntu, Alpine and Arch; Fedora
/// and RHEL; openSUSE. None: the first is made.
const BUNDLES: [&str; 3] = ["etc/ssl/certs/ca-certificates.crt", "etc/pki/tls/certs/ca-bundle.crt", "etc/ssl/ca-bundle.pem"];

/// A guest's trust store, under a root directory (`/`; a scratch directory in tests).
#[derive(Debug, Clone)]
pub struct TrustStore {
    root: PathBuf,
}

impl TrustStore {
    pub fn system() -> TrustStore {
        TrustStore { root: PathBuf::from("/") }
    }

    pub fn under(root: impl Into<PathBuf>) -> TrustStore {
        TrustStore { root: root.into() }
    }

    /// Trusts the CA certificate `pem`; returns the bundle's path as the guest names it (for
    /// the variables that name a bundle file).
    pub fn install(&self, pem: &str) -> io::Result<String> {
        let pem = certificate(pem)?;
        let local = self.root.join(LOCAL_CERT);
        let before = fs::read_to_string(&local).ok();
        if before.as_deref() != Some(pem.as_str()) {
            write_whole(&local, pem.as_bytes())?;
        }
        let name = BUNDLES.iter().find(|b| self.root.join(b).exists()).unwrap_or(&BUNDLES[0]);
        let named = self.root.join(name);
        // A bundle that is a link (Fedora's, into /etc/pki/ca-trust) is changed where it lies.
        let bundle = fs::canonicalize(&named).unwrap_or(named);
        let text = match fs::read_to_string(&bundle) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        let mut updated = match before.filter(|b| *b != pem && !b.is_empty()) {
            Some(old) => text.replace(&old, ""),
            None => text.clone(),
        };
        if !updated.contains(&pem) {
            if !updated.is_empty() && !updated.ends_with('\n') {
                updated.push('\n');
            }
            updated.push_str(&pem);
        }
        if updated != text {
            write_whole(&bundle, updated.as_bytes())?;
        }
        Ok(format!("/{name}"))
    }
}

/// `pem` with one final newline, if it is one PEM certificate.
fn certificate(pem: &str) -> io::Result<String> {
    let pem = pem.trim();
    if !pem.starts_with("-----BEGIN CERTIFICATE-----") || !pem.ends_with("-----END CERTIFICATE-----") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the egress CA is not a PEM certificate"));
    }
    Ok(format!("{pem}\n"))
}

/// Writes `path` (mode 0644, its directories made 0755) under a temporary name and renames it
/// into place: a program reading the bundle meanwhile sees the old one or the new one, whole.
fn write_whole(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().expect("a file under the root");
    fs::DirBuilder::new().recursive(true).mode(0o755).create(dir)?;
    let name = path.file_name().expect("a file name").to_string_lossy();
    let temporary = dir.join(format!(".{name}.ember-{}", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&temporary)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    match written.and_then(|()| fs::rename(&temporary, path)) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = fs::remove_file(&temporary);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn pem(body: &str) -> String {
        format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ember-trust-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_ca_joins_the_system_bundle_once_and_replaces_an_earlier_one() {
        let root = scratch("debian");
        let bundle = root.join(BUNDLES[0]);
        fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        let system = pem("SYSTEMROOT");
        fs::write(&bundle, system.trim_end()).unwrap();
        let store = TrustStore::under(&root);

        assert_eq!(store.install(&format!("  {}  ", pem("FIRST"))).unwrap(), "/etc/ssl/certs/ca-certificates.crt");
        assert_eq!(fs::read_to_string(&bundle).unwrap(), format!("{system}{}", pem("FIRST")));
        assert_eq!(fs::read_to_string(root.join(LOCAL_CERT)).unwrap(), pem("FIRST"));
        assert_eq!(fs::metadata(&bundle).unwrap().permissions().mode() & 0o777, 0o644);

        let written = fs::metadata(&bundle).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.install(&pem("FIRST")).unwrap();
        assert_eq!(fs::metadata(&bundle).unwrap().modified().unwrap(), written, "the same CA again writes nothing");

        store.install(&pem("SECOND")).unwrap();
        assert_eq!(fs::read_to_string(&bundle).unwrap(), format!("{system}{}", pem("SECOND")));
        assert_eq!(fs::read_to_string(root.join(LOCAL_CERT)).unwrap(), pem("SECOND"));
        assert!(fs::read_dir(bundle.parent().unwrap()).unwrap().count() == 1, "no temporary file is left");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn another_distributions_bundle_is_used_and_none_at_all_is_made() {
        let root = scratch("fedora");
        let real = root.join("etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem");
        fs::create_dir_all(real.parent().unwrap()).unwrap();
        fs::write(&real, pem("SYSTEM")).unwrap();
        let link = root.join(BUNDLES[1]);
        fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink("../../ca-trust/extracted/pem/tls-ca-bundle.pem", &link).unwrap();
        assert_eq!(TrustStore::under(&root).install(&pem("CA")).unwrap(), "/etc/pki/tls/certs/ca-bundle.crt");
        assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link stays a link");
        assert_eq!(fs::read_to_string(&real).unwrap(), format!("{}{}", pem("SYSTEM"), pem("CA")));
        fs::remove_dir_all(&root).unwrap();

        let bare = scratch("busybox");
        assert_eq!(TrustStore::under(&bare).install(&pem("CA")).unwrap(), "/etc/ssl/certs/ca-certificates.crt");
        assert_eq!(fs::read_to_string(bare.join(BUNDLES[0])).unwrap(), pem("CA"));
        fs::remove_dir_all(&bare).unwrap();
    }

    #[test]
    fn what_is_not_a_certificate_is_refused_and_nothing_written() {
        let root = scratch("bad");
        let err = TrustStore::under(&root).install("-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        fs::remove_dir_all(&root).unwrap();
    }
}
