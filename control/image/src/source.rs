//! Where an image's manifest, config and layers come from: an OCI image layout directory, a
//! `docker save` archive (unpacked first, through the same applier as a layer, so its paths
//! are held to the same rules), or blobs a registry pull left in the cache. Each ends as a
//! `Resolved` image: its manifest digest, run config and layer files, opened, not yet trusted
//! (their digests are checked as they are applied).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::digest::Digest;
use crate::error::{ImageError, LayerError};
use crate::oci::{Compression, ConfigFile, Descriptor, Document, RunConfig, MANIFEST_TYPES, REF_NAME};
use crate::tree::Tree;

/// Largest manifest, index or config read: these are read whole into memory.
const MAX_DOCUMENT: u64 = 4 << 20;
/// Indexes within indexes followed, at most.
const MAX_NESTING: usize = 4;

/// An image ready to be built: its parts found, its layers open.
pub struct Resolved {
    /// The image as the user named it, for messages.
    pub image: String,
    /// The manifest's digest (for a legacy `docker save` archive, which has none, its config's).
    pub digest: Digest,
    pub config: RunConfig,
    /// The tag the source itself gives the image, if any.
    pub tag: Option<String>,
    pub layers: Vec<LayerBlob>,
}

pub struct LayerBlob {
    /// What the blob's sha256 must be.
    pub digest: Digest,
    /// Its size, where a manifest gives it.
    pub size: Option<u64>,
    pub compression: Compression,
    pub file: File,
}

/// Reads blobs by digest, verified: a directory's `blobs/sha256/HEX` or a tree's.
pub(crate) trait BlobReader {
    fn open(&self, digest: &Digest) -> Result<File, String>;
}

/// A directory of blobs named by their sha256 hex (a layout's `blobs/sha256`, the cache).
pub(crate) struct DirBlobs<'a>(pub &'a Path);

impl BlobReader for DirBlobs<'_> {
    fn open(&self, digest: &Digest) -> Result<File, String> {
        let path = self.0.join(digest.hex());
        File::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))
    }
}

struct TreeBlobs<'a>(&'a Tree);

impl BlobReader for TreeBlobs<'_> {
    fn open(&self, digest: &Digest) -> Result<File, String> {
        self.0.open_file(&format!("blobs/sha256/{}", digest.hex())).map_err(|e| e.to_string())
    }
}

fn bad(image: &str, problem: impl Into<String>) -> ImageError {
    ImageError::Bad { image: image.into(), problem: problem.into() }
}

/// A small blob, read whole and checked against its digest (and size).
pub(crate) fn read_verified(image: &str, what: &'static str, blobs: &dyn BlobReader, d: &Descriptor) -> Result<Vec<u8>, ImageError> {
    let blob_err = |problem: String| ImageError::Blob { image: image.into(), what, digest: d.digest.clone(), problem };
    let digest = d.digest().ok_or_else(|| blob_err("not a sha256 digest".into()))?;
    if d.size > MAX_DOCUMENT {
        return Err(blob_err(format!("{} bytes: larger than the {} MiB a {what} may be", d.size, MAX_DOCUMENT >> 20)));
    }
    let mut bytes = Vec::new();
    blobs.open(&digest).map_err(&blob_err)?.take(MAX_DOCUMENT + 1).read_to_end(&mut bytes).map_err(|e| blob_err(e.to_string()))?;
    let actual = Digest::of(&bytes);
    if actual != digest {
        return Err(blob_err(format!("digest mismatch: the blob is {actual}")));
    }
    Ok(bytes)
}

/// Follows `manifests` (an index's entries) to the one manifest for linux/amd64.
pub(crate) fn select_manifest(image: &str, blobs: &dyn BlobReader, manifests: &[Descriptor], depth: usize) -> Result<(Digest, Document), ImageError> {
    let mut seen = Vec::new();
    for d in manifests {
        if !d.may_be_linux_amd64() {
            seen.push(d.platform_name());
            continue;
        }
        if d.is_index() {
            if depth >= MAX_NESTING {
                return Err(bad(image, "indexes nested too deep"));
            }
            let doc = parse_document(image, &read_verified(image, "index", blobs, d)?)?;
            return select_manifest(image, blobs, doc.manifests.as_deref().unwrap_or_default(), depth + 1);
        }
        if !MANIFEST_TYPES.contains(&d.media_type.as_str()) && !d.media_type.is_empty() {
            seen.push(format!("{} ({})", d.platform_name(), d.media_type));
            continue;
        }
        let bytes = read_verified(image, "manifest", blobs, d)?;
        let doc = parse_document(image, &bytes)?;
        return Ok((Digest::of(&bytes), doc));
    }
    Err(ImageError::NoPlatform { image: image.into(), available: if seen.is_empty() { "no manifests".into() } else { seen.join(", ") } })
}

pub(crate) fn parse_document(image: &str, bytes: &[u8]) -> Result<Document, ImageError> {
    serde_json::from_slice(bytes).map_err(|e| bad(image, format!("manifest or index is not valid JSON: {e}")))
}

/// The config and layers a manifest names, checked to be linux/amd64.
pub(crate) fn resolve_manifest(image: &str, blobs: &dyn BlobReader, digest: Digest, doc: &Document, tag: Option<String>) -> Result<Resolved, ImageError> {
    let (Some(config), Some(layers)) = (&doc.config, &doc.layers) else {
        return Err(bad(image, format!("manifest {digest} has no config or no layers")));
    };
    let config = parse_config(image, &read_verified(image, "config", blobs, config)?)?;
    let layers = layers
        .iter()
        .map(|l| {
            let layer_err = |error| ImageError::Layer { image: image.into(), layer: l.digest.clone(), error };
            let compression = Compression::of(&l.media_type).ok_or_else(|| layer_err(LayerError::MediaType(l.media_type.clone())))?;
            let digest = l.digest().ok_or_else(|| bad(image, format!("layer digest {:?} is not sha256", l.digest)))?;
            let file = blobs.open(&digest).map_err(|problem| ImageError::Blob { image: image.into(), what: "layer", digest: l.digest.clone(), problem })?;
            Ok(LayerBlob { digest, size: Some(l.size), compression, file })
        })
        .collect::<Result<_, ImageError>>()?;
    Ok(Resolved { image: image.into(), digest, config: config.config, tag, layers })
}

fn parse_config(image: &str, bytes: &[u8]) -> Result<ConfigFile, ImageError> {
    let config: ConfigFile = serde_json::from_slice(bytes).map_err(|e| bad(image, format!("config is not valid JSON: {e}")))?;
    let (os, arch) = (config.os.as_deref().unwrap_or("linux"), config.architecture.as_deref().unwrap_or("amd64"));
    if (os, arch) != ("linux", "amd64") {
        return Err(ImageError::NoPlatform { image: image.into(), available: format!("{os}/{arch}") });
    }
    Ok(config)
}

/// An OCI image layout directory; `tag` picks among several images by their ref name.
pub fn from_layout(dir: &Path, image: &str, tag: Option<&str>) -> Result<Resolved, ImageError> {
    let bytes = std::fs::read(dir.join("index.json")).map_err(|e| bad(image, format!("not an OCI image layout (index.json: {e})")))?;
    layout_index(image, &DirBlobs(&dir.join("blobs/sha256")), &bytes, tag)
}

fn layout_index(image: &str, blobs: &dyn BlobReader, index: &[u8], tag: Option<&str>) -> Result<Resolved, ImageError> {
    let index = parse_document(image, index)?;
    let all = index.manifests.unwrap_or_default();
    let named: Vec<Descriptor> = match tag {
        Some(t) => all.iter().filter(|d| d.annotations.get(REF_NAME).is_some_and(|r| r == t || r.rsplit(':').next() == Some(t))).cloned().collect(),
        None => all.clone(),
    };
    if named.is_empty() {
        let tags: Vec<&str> = all.iter().filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str)).collect();
        return Err(bad(image, format!("no image tagged {} in it (it has: {})", tag.unwrap_or("?"), tags.join(", "))));
    }
    let ref_name = named[0].annotations.get(REF_NAME).cloned();
    let (digest, doc) = select_manifest(image, blobs, &named, 0)?;
    resolve_manifest(image, blobs, digest, &doc, ref_name)
}

/// A legacy `docker save` manifest.json entry.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SaveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// A `docker save` archive, unpacked into `scratch` (an empty directory the caller removes).
pub fn from_docker_archive(archive: &Path, scratch: &Path, image: &str, tag: Option<&str>) -> Result<Resolved, ImageError> {
    let file = File::open(archive).map_err(crate::error::io("cannot open", archive))?;
    let tree = Tree::open(scratch).map_err(crate::error::io("cannot open", scratch))?;
    crate::apply::apply(&tree, std::io::BufReader::new(file)).map_err(|e| bad(image, format!("the archive: {e}")))?;
    // Docker 25 and later save an OCI layout (with manifest.json beside it for older tools).
    if let Ok(index) = tree.open_file("index.json") {
        let mut bytes = Vec::new();
        index.take(MAX_DOCUMENT).read_to_end(&mut bytes).map_err(crate::error::io("cannot read", archive))?;
        return layout_index(image, &TreeBlobs(&tree), &bytes, tag);
    }
    let mut bytes = Vec::new();
    tree.open_file("manifest.json")
        .map_err(|e| bad(image, format!("neither an OCI layout nor a docker save archive (manifest.json: {e})")))?
        .take(MAX_DOCUMENT)
        .read_to_end(&mut bytes)
        .map_err(crate::error::io("cannot read", archive))?;
    let entries: Vec<SaveEntry> = serde_json::from_slice(&bytes).map_err(|e| bad(image, format!("manifest.json: {e}")))?;
    let entry = match tag {
        Some(t) => entries.iter().find(|e| e.repo_tags.iter().flatten().any(|r| r == t || r.rsplit(':').next() == Some(t))),
        None => entries.first(),
    }
    .ok_or_else(|| bad(image, format!("no image tagged {} in manifest.json", tag.unwrap_or("?"))))?;
    let mut config_bytes = Vec::new();
    tree.open_file(&entry.config)
        .map_err(|e| bad(image, format!("config {}: {e}", entry.config)))?
        .take(MAX_DOCUMENT)
        .read_to_end(&mut config_bytes)
        .map_err(crate::error::io("cannot read", archive))?;
    // A legacy archive names its config by digest; its layers are the uncompressed tars whose
    // digests the config lists as diff_ids.
    let config_digest = Digest::of(&config_bytes);
    let stem = entry.config.trim_start_matches("blobs/sha256/").trim_end_matches(".json");
    if stem != config_digest.hex() {
        return Err(ImageError::Blob { image: image.into(), what: "config", digest: entry.config.clone(), problem: format!("digest mismatch: the file is {config_digest}") });
    }
    let config = parse_config(image, &config_bytes)?;
    let diff_ids = config.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(bad(image, format!("config lists {} layers, manifest.json {}", diff_ids.len(), entry.layers.len())));
    }
    let layers = entry
        .layers
        .iter()
        .zip(&diff_ids)
        .map(|(path, diff_id)| {
            let layer_err = |error| ImageError::Layer { image: image.into(), layer: path.clone(), error };
            let digest = Digest::parse(diff_id).ok_or_else(|| bad(image, format!("diff_id {diff_id:?} is not sha256")))?;
            let file = tree.open_file(path).map_err(layer_err)?;
            Ok(LayerBlob { digest, size: None, compression: Compression::None, file })
        })
        .collect::<Result<_, ImageError>>()?;
    let tag = entry.repo_tags.as_ref().and_then(|t| t.first().cloned());
    Ok(Resolved { image: image.into(), digest: config_digest, config: config.config, tag, layers })
}
