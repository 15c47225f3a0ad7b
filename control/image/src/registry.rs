//! Pulls from a registry (the OCI distribution API, through `oci-client`): the manifest for
//! linux/amd64, then the config and layers into the blob cache (`sha256/HEX`), each checked
//! against its digest before it is renamed in, so a blob the cache has is never fetched again
//! and a second image sharing layers fetches only its own.

use std::path::Path;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::build::file_digest;
use crate::credentials::Credentials;
use crate::digest::Digest;
use crate::error::{io, ImageError};
use crate::oci::{Descriptor, INDEX_TYPES, MANIFEST_TYPES};
use crate::source::{parse_document, resolve_manifest, DirBlobs, Resolved};
use crate::store::Store;

#[derive(Debug, Default, Clone)]
pub struct PullOptions {
    /// `--registry-auth USER:PASS`; else `credentials`', else anonymous.
    pub auth: Option<(String, String)>,
    /// Credentials by registry [default: the host's docker config.json's].
    pub credentials: Option<Credentials>,
    /// Plain HTTP to a registry that is not on loopback.
    pub insecure: bool,
}

/// What a pull fetched and what the cache already had.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PullStats {
    pub fetched: usize,
    pub cached: usize,
    pub bytes: u64,
    /// Wall time of the whole pull: manifests, then every blob fetched and checked.
    pub elapsed: std::time::Duration,
}

/// Whether `registry` (host[:port]) is on this machine's loopback.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn registry_error(image: &str, e: OciDistributionError) -> ImageError {
    let detail = e.to_string();
    match e {
        OciDistributionError::AuthenticationFailure(_) | OciDistributionError::UnauthorizedError { .. } => ImageError::Unauthorized { image: image.into() },
        OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotInRegistry { image: image.into(), detail },
        OciDistributionError::RegistryError { envelope, .. } if envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown)) => {
            ImageError::NotInRegistry { image: image.into(), detail }
        }
        OciDistributionError::RegistryError { envelope, .. } if envelope.errors.iter().any(|e| matches!(e.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) => {
            ImageError::Unauthorized { image: image.into() }
        }
        _ => ImageError::Registry { image: image.into(), detail },
    }
}

/// Pulls `reference` (`[registry/]repo[:tag|@digest]`) into the store's blob cache and
/// resolves it; building is `build::build`'s.
pub fn pull(store: &Store, reference: &str, opts: &PullOptions, progress: &mut dyn FnMut(String)) -> Result<(Resolved, PullStats), ImageError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ImageError::Registry { image: reference.into(), detail: format!("cannot start the I/O runtime: {e}") })?;
    runtime.block_on(pull_async(store, reference, opts, progress))
}

async fn pull_async(store: &Store, reference: &str, opts: &PullOptions, progress: &mut dyn FnMut(String)) -> Result<(Resolved, PullStats), ImageError> {
    let image = reference;
    let started = std::time::Instant::now();
    let r: Reference = reference.parse().map_err(|e| ImageError::Bad { image: image.into(), problem: format!("not an image reference: {e}") })?;
    let registry = r.resolve_registry().to_string();
    let plain = is_loopback(&registry) || opts.insecure;
    // Only reqwest's TLS needs it; a second install (another pull in this process) is refused, harmlessly.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = if plain { ClientProtocol::HttpsExcept(vec![registry.clone()]) } else { ClientProtocol::Https };
    // oci-client builds a default reqwest client beside the configured one, and reqwest's
    // default panics (an abort, in release) on a host whose CA bundle is missing or empty, even
    // for a plain-HTTP registry: say so instead.
    if rustls_native_certs::load_native_certs().certs.is_empty() {
        return Err(ImageError::NoCaCertificates);
    }
    let client = Client::new(ClientConfig { protocol, ..Default::default() });
    let known = || match &opts.credentials {
        Some(c) => c.get(&registry),
        None => Credentials::from_host().get(&registry),
    };
    let auth = match opts.auth.clone().or_else(known) {
        Some((user, pass)) => RegistryAuth::Basic(user, pass),
        None => RegistryAuth::Anonymous,
    };
    let accepted: Vec<&str> = INDEX_TYPES.iter().chain(MANIFEST_TYPES.iter()).copied().collect();
    let (bytes, digest) = client.pull_manifest_raw(&r, &auth, &accepted).await.map_err(|e| registry_error(image, e))?;
    let mut bytes = bytes.to_vec();
    check_pinned(image, r.digest(), &bytes, &digest)?;
    let mut doc = parse_document(image, &bytes)?;
    if doc.is_index() {
        let chosen = pick(image, doc.manifests.as_deref().unwrap_or_default())?;
        let by_digest = Reference::with_digest(r.registry().to_string(), r.repository().to_string(), chosen.digest.clone());
        let (b, d) = client.pull_manifest_raw(&by_digest, &auth, &MANIFEST_TYPES).await.map_err(|e| registry_error(image, e))?;
        bytes = b.to_vec();
        check_pinned(image, Some(&chosen.digest), &bytes, &d)?;
        doc = parse_document(image, &bytes)?;
    }
    let manifest_digest = Digest::of(&bytes);
    let cache = store.blobs().join("sha256");
    std::fs::create_dir_all(&cache).map_err(io("cannot create", &cache))?;
    let mut stats = PullStats::default();
    let (Some(config), Some(layers)) = (&doc.config, &doc.layers) else {
        return Err(ImageError::Bad { image: image.into(), problem: format!("manifest {manifest_digest} has no config or no layers") });
    };
    let n = layers.len();
    for (i, blob) in std::iter::once(config).chain(layers).enumerate() {
        let what = if i == 0 { "config".to_string() } else { format!("layer {i}/{n}") };
        let fetched = fetch(&client, &r, &cache, blob, image).await?;
        match fetched {
            Some(bytes) => {
                stats.fetched += 1;
                stats.bytes += bytes;
                progress(format!("{what} {}: {} KiB fetched", blob.digest, bytes >> 10));
            }
            None => {
                stats.cached += 1;
                progress(format!("{what} {}: cached", blob.digest));
            }
        }
    }
    stats.elapsed = started.elapsed();
    progress(format!("{image}: {} blobs fetched ({} MiB), {} cached, in {:.2} s", stats.fetched, stats.bytes >> 20, stats.cached, stats.elapsed.as_secs_f64()));
    let tag = r.tag().map(|t| format!("{}:{t}", r.repository().trim_start_matches("library/")));
    let resolved = resolve_manifest(image, &DirBlobs(&cache), manifest_digest, &doc, tag)?;
    Ok((resolved, stats))
}

fn check_pinned(image: &str, pinned: Option<&str>, bytes: &[u8], said: &str) -> Result<(), ImageError> {
    let actual = Digest::of(bytes).to_string();
    for expected in pinned.into_iter().chain(Some(said).filter(|s| s.starts_with("sha256:"))) {
        if expected != actual {
            return Err(ImageError::Blob { image: image.into(), what: "manifest", digest: expected.into(), problem: format!("digest mismatch: the registry sent {actual}") });
        }
    }
    Ok(())
}

/// The linux/amd64 manifest of an index.
fn pick<'a>(image: &str, manifests: &'a [Descriptor]) -> Result<&'a Descriptor, ImageError> {
    manifests
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == "amd64") && !d.is_index())
        .ok_or_else(|| ImageError::NoPlatform { image: image.into(), available: manifests.iter().map(Descriptor::platform_name).collect::<Vec<_>>().join(", ") })
}

/// Fetches a blob into the cache unless it is there; the bytes fetched, or None if cached.
async fn fetch(client: &Client, r: &Reference, cache: &Path, blob: &Descriptor, image: &str) -> Result<Option<u64>, ImageError> {
    let digest = blob.digest().ok_or_else(|| ImageError::Bad { image: image.into(), problem: format!("blob digest {:?} is not sha256", blob.digest) })?;
    let dest = cache.join(digest.hex());
    if dest.is_file() {
        return Ok(None);
    }
    let tmp = cache.join(format!(".tmp-{}-{}", digest.hex(), std::process::id()));
    let layer_err = |problem: String| ImageError::Blob { image: image.into(), what: "blob", digest: digest.to_string(), problem };
    let result = async {
        let file = tokio::fs::File::create(&tmp).await.map_err(io("cannot create", &tmp))?;
        client.pull_blob(r, blob.digest.as_str(), file).await.map_err(|e| match registry_error(image, e) {
            ImageError::Registry { detail, .. } => layer_err(detail),
            other => other,
        })?;
        let len = std::fs::metadata(&tmp).map_err(io("cannot look at", &tmp))?.len();
        if len != blob.size {
            return Err(layer_err(format!("truncated or overlong: {len} bytes of {}", blob.size)));
        }
        let actual = file_digest(&tmp).map_err(io("cannot read", &tmp))?;
        if actual != digest {
            return Err(layer_err(format!("digest mismatch: the registry sent {actual}")));
        }
        std::fs::rename(&tmp, &dest).map_err(io("cannot rename into place", &dest))?;
        Ok(len)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(Some)
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_registries_are_plain_http_by_default() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }
}
