//! Imports hand-built OCI layouts and `docker save` archives and reads the ext4 that comes out
//! with debugfs (e2fsprogs): files, modes, owners, whiteouts, ember's files, exec defaults; and
//! every bad input refused with nothing left behind.

mod common;

use common::*;
use image::digest::Digest;
use image::{ImageError, LayerError};
use serde_json::json;

#[test]
fn an_oci_layout_becomes_an_ext4_with_its_files_and_ember_s() {
    let f = fixture();
    let l = layout(&f.tmp.path().join("layout"), "amd64");
    let entry = f.import_layout(&l.dir, "test:1").unwrap();
    assert_eq!(entry.name, "test:1");
    check_image(&f, &entry);
    assert_eq!(f.store.find("test:1").unwrap(), entry);
    // The same manifest again is not built again.
    let mtime = std::fs::metadata(f.store.path(&entry)).unwrap().modified().unwrap();
    let again = f.import_layout(&l.dir, "test:again").unwrap();
    assert_eq!(again.file, entry.file);
    assert_eq!(std::fs::metadata(f.store.path(&entry)).unwrap().modified().unwrap(), mtime);
}

#[test]
fn a_docker_save_archive_gives_the_same_image() {
    let f = fixture();
    let (base, top, config) = (base_layer(), top_layer(), config("amd64"));
    let config_name = format!("{}.json", Digest::of(&config).hex());
    let manifest = json!([{"Config": config_name, "RepoTags": ["test:1"], "Layers": ["a/layer.tar", "b/layer.tar"]}]);
    let mut ar = tar::Builder::new(Vec::new());
    for (path, bytes) in [("manifest.json", serde_json::to_vec(&manifest).unwrap()), (config_name.as_str(), config), ("a/layer.tar", base), ("b/layer.tar", top)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_path(path).unwrap();
        h.set_cksum();
        ar.append(&h, &bytes[..]).unwrap();
    }
    let archive = f.tmp.path().join("saved.tar");
    std::fs::write(&archive, ar.into_inner().unwrap()).unwrap();
    let scratch = image::ScratchDir::new(&f.tmp.path().join("scratch")).unwrap();
    let resolved = image::from_docker_archive(&archive, scratch.path(), "saved.tar", None).unwrap();
    assert_eq!(resolved.tag.as_deref(), Some("test:1"));
    let entry = f.build(resolved, "test:1").unwrap();
    check_image(&f, &entry);
}

fn layer_error(e: ImageError) -> (String, LayerError) {
    match e {
        ImageError::Layer { layer, error, .. } => (layer, error),
        other => panic!("not a layer error: {other}"),
    }
}

#[test]
fn a_tampered_layer_is_a_digest_mismatch_naming_it() {
    let f = fixture();
    let l = layout(&f.tmp.path().join("layout"), "amd64");
    let blob = l.dir.join("blobs/sha256").join(l.layers[1].hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[600] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let e = f.import_layout(&l.dir, "test:1").unwrap_err();
    assert!(e.to_string().contains("image test:1"), "{e}");
    let (layer, source) = layer_error(e);
    assert_eq!(layer, l.layers[1].to_string());
    assert!(matches!(source, LayerError::Digest { .. }), "{source}");
    f.assert_nothing_left();
}

#[test]
fn a_truncated_layer_is_refused() {
    let f = fixture();
    let l = layout(&f.tmp.path().join("layout"), "amd64");
    let blob = l.dir.join("blobs/sha256").join(l.layers[0].hex());
    let bytes = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &bytes[..bytes.len() / 2]).unwrap();
    let (layer, source) = layer_error(f.import_layout(&l.dir, "test:1").unwrap_err());
    assert_eq!(layer, l.layers[0].to_string());
    assert!(matches!(source, LayerError::Truncated { .. }), "{source}");
    f.assert_nothing_left();
}

#[test]
fn an_image_for_another_platform_only_is_refused() {
    let f = fixture();
    let l = layout(&f.tmp.path().join("layout"), "arm64");
    let e = f.import_layout(&l.dir, "test:1").unwrap_err();
    assert!(matches!(&e, ImageError::NoPlatform { available, .. } if available.contains("linux/arm64")), "{e}");
    f.assert_nothing_left();
}

#[test]
fn a_layer_with_a_traversal_path_is_refused() {
    let f = fixture();
    let dir = f.tmp.path().join("layout");
    let evil = Layer::new().file("bin/sh", "sh", 0o755, 0).file("../../escaped", "x", 0o644, 0).tar();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": with_type(put_blob(&dir, &config("amd64")), "application/vnd.oci.image.config.v1+json"),
        "layers": [with_type(put_blob(&dir, &evil), "application/vnd.oci.image.layer.v1.tar")],
    }))
    .unwrap();
    let m = with_type(put_blob(&dir, &manifest), "application/vnd.oci.image.manifest.v1+json");
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap()).unwrap();
    let (layer, source) = layer_error(f.import_layout(&dir, "evil").unwrap_err());
    assert_eq!(layer, Digest::of(&evil).to_string());
    assert!(matches!(source, LayerError::Traversal { .. }), "{source}");
    assert!(!f.tmp.path().join("escaped").exists() && !f.store.dir().join("escaped").exists());
    f.assert_nothing_left();
}
