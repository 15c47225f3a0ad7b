//! The OCI (and Docker v2) JSON documents an image is read from, as far as ember reads them,
//! and the choice of the linux/amd64 manifest from an index.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;

pub const INDEX_TYPES: [&str; 2] =
    ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
pub const MANIFEST_TYPES: [&str; 2] =
    ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];
/// The annotation naming a manifest's tag in an OCI layout's index.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An index or a manifest: which, its media type or its fields say.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    #[serde(default)]
    pub media_type: String,
    pub manifests: Option<Vec<Descriptor>>,
    pub config: Option<Descriptor>,
    pub layers: Option<Vec<Descriptor>>,
}

/// The image configuration blob.
#[derive(Debug, Deserialize)]
pub struct ConfigFile {
    pub architecture: Option<String>,
    pub os: Option<String>,
    #[serde(default)]
    pub config: RunConfig,
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// What the image says its processes run with.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
}

fn null_as_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Document {
    pub fn is_index(&self) -> bool {
        INDEX_TYPES.contains(&self.media_type.as_str()) || (self.media_type.is_empty() && self.manifests.is_some())
    }
}

impl Descriptor {
    pub fn digest(&self) -> Option<Digest> {
        Digest::parse(&self.digest)
    }

    pub fn is_index(&self) -> bool {
        INDEX_TYPES.contains(&self.media_type.as_str())
    }

    /// Whether it may be for linux/amd64: it says so, or says nothing (its config will).
    pub fn may_be_linux_amd64(&self) -> bool {
        self.platform.as_ref().is_none_or(|p| p.os == "linux" && p.architecture == "amd64")
    }

    pub fn platform_name(&self) -> String {
        self.platform.as_ref().map_or_else(|| "unknown".into(), |p| format!("{}/{}", p.os, p.architecture))
    }
}

/// How a layer blob is compressed, from its media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn of(media_type: &str) -> Option<Compression> {
        let t = media_type;
        if t.ends_with("+gzip") || t.ends_with(".tar.gzip") {
            Some(Compression::Gzip)
        } else if t.ends_with("+zstd") {
            Some(Compression::Zstd)
        } else if t.ends_with(".tar") || t.ends_with("rootfs.diff.tar") {
            Some(Compression::None)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_say_the_compression() {
        assert_eq!(Compression::of("application/vnd.oci.image.layer.v1.tar+gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::of("application/vnd.docker.image.rootfs.diff.tar.gzip"), Some(Compression::Gzip));
        assert_eq!(Compression::of("application/vnd.oci.image.layer.v1.tar+zstd"), Some(Compression::Zstd));
        assert_eq!(Compression::of("application/vnd.oci.image.layer.v1.tar"), Some(Compression::None));
        assert_eq!(Compression::of("application/vnd.oci.image.layer.v1.tar+lz4"), None);
    }

    #[test]
    fn run_config_takes_nulls() {
        let c: ConfigFile = serde_json::from_str(r#"{"os":"linux","config":{"Env":null,"Cmd":["sh"],"User":"app"}}"#).unwrap();
        assert_eq!(c.config.cmd, ["sh"]);
        assert!(c.config.env.is_empty());
        assert_eq!(c.config.user.as_deref(), Some("app"));
    }
}
