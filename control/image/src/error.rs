//! What can go wrong making an image, each naming the image (and the layer) it is about.

use std::path::PathBuf;

use thiserror::Error;

/// A problem in one layer, found while applying it.
#[derive(Debug, Error)]
pub enum LayerError {
    #[error("entry {path:?} leaves the image's tree (an absolute path or `..`): refused")]
    Traversal { path: String },
    #[error("entry {path:?} goes through symlink {link:?}, which points out of the image's tree: refused")]
    SymlinkEscape { path: String, link: String },
    #[error("entry {path:?}: more than {max} symlinks on the way (a loop?)")]
    SymlinkLoop { path: String, max: usize },
    #[error("entry {path:?}: {component:?} on its way is not a directory")]
    NotADirectory { path: String, component: String },
    #[error("entry {path:?}: {what}: {error}")]
    Io { path: String, what: &'static str, error: std::io::Error },
    #[error("entry {path:?}: unsupported tar entry type {kind}")]
    Unsupported { path: String, kind: String },
    #[error("the tar stream is corrupt or truncated: {0}")]
    Tar(std::io::Error),
    #[error("blob is truncated: {actual} of {expected} bytes")]
    Truncated { expected: u64, actual: u64 },
    #[error("digest mismatch: the manifest says {expected}, the blob is {actual}")]
    Digest { expected: String, actual: String },
    #[error("unsupported layer media type {0} (gzip, zstd and plain tar are)")]
    MediaType(String),
}

#[derive(Debug, Error)]
pub enum ImageError {
    /// Not a `source`: the message carries it, and a chain printed whole would say it twice.
    #[error("image {image}: layer {layer}: {error}")]
    Layer { image: String, layer: String, error: LayerError },
    #[error("image {image}: {what} {digest}: {problem}")]
    Blob { image: String, what: &'static str, digest: String, problem: String },
    #[error("image {image}: no manifest for linux/amd64 (the image has: {available}); pull or build it for linux/amd64")]
    NoPlatform { image: String, available: String },
    #[error("image {image}: {problem}")]
    Bad { image: String, problem: String },
    #[error("image {image}: the registry refused the credentials (401 Unauthorized): give ember credentials for it (`ember image pull --registry-auth USER:PASS`, `ember serve --registry-auth FILE`, or the host's docker config.json)")]
    Unauthorized { image: String },
    #[error("image {image}: tag or manifest not found in the registry: {detail}")]
    NotInRegistry { image: String, detail: String },
    #[error("image {image}: registry: {detail}")]
    Registry { image: String, detail: String },
    #[error("image {image}: plain HTTP to registry {registry} refused: only loopback registries are reached without TLS unless --insecure is given")]
    InsecureRefused { image: String, registry: String },
    #[error("image {image}: {content_mib} MiB of files do not fit in a {capacity_mib} MiB disk: pass a larger --capacity")]
    TooSmall { image: String, content_mib: u64, capacity_mib: u64 },
    #[error("image {image}: mkfs.ext4 failed: {output}")]
    Mkfs { image: String, output: String },
    #[error("{what} {}: {error}", path.display())]
    Io { what: &'static str, path: PathBuf, error: std::io::Error },
    #[error("no image named {0} (see `ember image ls`)")]
    NotFound(String),
    #[error("invalid image name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("no ember-agent to put in the image: set EMBER_AGENT to the static agent, or EMBER_HOME to an installation whose images/default.ext4 carries one")]
    NoAgent,
    #[error("this host has no CA certificates, which the registry client needs even for a plain-HTTP registry: install ca-certificates, or set SSL_CERT_FILE to a PEM bundle")]
    NoCaCertificates,
}

pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.into();
    move |error| ImageError::Io { what, path, error }
}
