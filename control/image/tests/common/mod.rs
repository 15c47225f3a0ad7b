//! OCI images built by hand for the tests: layers, configs, layouts, and a store to build into.
#![allow(dead_code)] // each test binary uses its own part

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use image::digest::Digest;
use image::{BuildOptions, ImageError, Store};
use serde_json::json;

pub const CAPACITY: u64 = 64 << 20;

pub struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    pub fn new() -> Layer {
        Layer(tar::Builder::new(Vec::new()))
    }
    pub fn entry(mut self, path: &str, kind: tar::EntryType, mode: u32, owner: u64, link: Option<&str>, data: &[u8]) -> Layer {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    pub fn file(self, path: &str, data: &str, mode: u32, owner: u64) -> Layer {
        self.entry(path, tar::EntryType::Regular, mode, owner, None, data.as_bytes())
    }
    pub fn dir(self, path: &str, mode: u32, owner: u64) -> Layer {
        self.entry(path, tar::EntryType::Directory, mode, owner, None, b"")
    }
    pub fn hardlink(self, path: &str, target: &str) -> Layer {
        self.entry(path, tar::EntryType::Link, 0o755, 0, Some(target), b"")
    }
    pub fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

pub fn base_layer() -> Vec<u8> {
    Layer::new()
        .dir("bin/", 0o755, 0)
        .file("bin/sh", "#!fake shell", 0o755, 0)
        .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n", 0o644, 0)
        .file("etc/group", "root:x:0:\napp:x:1001:\n", 0o644, 0)
        .file("etc/secret", "gone in layer 2", 0o600, 0)
        .file("opt/old/file", "hidden by the opaque dir", 0o644, 0)
        .file("usr/bin/su", "setuid", 0o4755, 0)
        .dir("home/app/", 0o750, 1000)
        .tar()
}

pub fn top_layer() -> Vec<u8> {
    Layer::new()
        .file("etc/.wh.secret", "", 0o644, 0)
        .dir("opt/", 0o755, 0)
        .file("opt/.wh..wh..opq", "", 0o644, 0)
        .file("opt/new", "new", 0o644, 0)
        .hardlink("bin/sh-again", "bin/sh")
        .file("home/app/data", "app's", 0o640, 1000)
        .tar()
}

pub fn config(arch: &str) -> Vec<u8> {
    config_for(arch, &top_layer())
}

pub fn config_for(arch: &str, top: &[u8]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": arch, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hello there"], "WorkingDir": "/home/app", "User": "app",
                   "Entrypoint": ["/bin/sh"], "Cmd": ["-c", "true"]},
        "rootfs": {"type": "layers", "diff_ids": [Digest::of(&base_layer()).to_string(), Digest::of(top).to_string()]}
    }))
    .unwrap()
}

/// An OCI image layout: blobs, a manifest (gzip base layer, plain top layer), an index.
pub struct OciLayout {
    pub dir: PathBuf,
    pub layers: Vec<Digest>,
}

pub fn put_blob(dir: &Path, bytes: &[u8]) -> serde_json::Value {
    let d = Digest::of(bytes);
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("blobs/sha256").join(d.hex()), bytes).unwrap();
    json!({"digest": d.to_string(), "size": bytes.len()})
}

pub fn with_type(mut v: serde_json::Value, t: &str) -> serde_json::Value {
    v["mediaType"] = json!(t);
    v
}

pub fn layout(dir: &Path, arch: &str) -> OciLayout {
    layout_with(dir, arch, top_layer())
}

/// The base layer under `top`.
pub fn layout_with(dir: &Path, arch: &str, top: Vec<u8>) -> OciLayout {
    let base = gzip(&base_layer());
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": with_type(put_blob(dir, &config_for(arch, &top)), "application/vnd.oci.image.config.v1+json"),
        "layers": [with_type(put_blob(dir, &base), "application/vnd.oci.image.layer.v1.tar+gzip"),
                   with_type(put_blob(dir, &top), "application/vnd.oci.image.layer.v1.tar")],
    }))
    .unwrap();
    let mut m = with_type(put_blob(dir, &manifest), "application/vnd.oci.image.manifest.v1+json");
    m["platform"] = json!({"architecture": arch, "os": "linux"});
    m["annotations"] = json!({"org.opencontainers.image.ref.name": "1"});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [m]})).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    OciLayout { dir: dir.to_path_buf(), layers: vec![Digest::of(&base), Digest::of(&top)] }
}

pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub store: Store,
    pub agent: PathBuf,
}

pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("images"), tmp.path().join("blobs"));
    let agent = tmp.path().join("ember-agent");
    std::fs::write(&agent, b"\x7fELF fake agent").unwrap();
    Fixture { tmp, store, agent }
}

impl Fixture {
    pub fn import_layout(&self, dir: &Path, name: &str) -> Result<image::Entry, ImageError> {
        let resolved = image::from_layout(dir, name, None)?;
        self.build(resolved, name)
    }
    pub fn build(&self, resolved: image::Resolved, name: &str) -> Result<image::Entry, ImageError> {
        let opts = BuildOptions { name: image::normalize(name)?, capacity: CAPACITY, agent: self.agent.clone() };
        image::build(&self.store, resolved, &opts, &mut |line| eprintln!("{line}")).map(|(entry, _)| entry)
    }
    /// Only the index (and its lock) may be in the store after a failed build.
    pub fn assert_nothing_left(&self) {
        if let Ok(dir) = std::fs::read_dir(self.store.dir()) {
            let left: Vec<String> = dir.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n != ".lock" && n != "index.json").collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
    }
}

pub fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs").arg("-R").arg(request).arg(image).output().expect("debugfs (e2fsprogs; tests/install-deps installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// (mode in octal, uid, gid) of `path` in the image; None when it is not there.
pub fn stat(image: &Path, path: &str) -> Option<(String, u32, u32)> {
    let out = debugfs(image, &format!("stat {path}"));
    if out.contains("File not found") {
        return None;
    }
    let mode = out.split("Mode:").nth(1)?.split_whitespace().next()?.to_string();
    let user = out.split("User:").nth(1)?.split_whitespace().next()?.parse().ok()?;
    let group = out.split("Group:").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((mode, user, group))
}

pub fn check_image(f: &Fixture, entry: &image::Entry) {
    let img = f.store.path(entry);
    let root = debugfs(&img, "ls -l /");
    for top in ["bin", "etc", "opt", "usr", "sbin", "dev", "proc", "tmp", "root", "home"] {
        assert!(root.contains(&format!(" {top}")), "no /{top} in:\n{root}");
    }
    assert_eq!(stat(&img, "/usr/bin/su"), Some(("04755".into(), 0, 0)));
    assert_eq!(stat(&img, "/home/app/data"), Some(("0640".into(), 1000, 1000)));
    assert_eq!(stat(&img, "/home/app"), Some(("0750".into(), 1000, 1000)));
    assert_eq!(stat(&img, "/etc/secret"), None, "the whited-out file is gone");
    assert_eq!(stat(&img, "/opt/old"), None, "the opaque directory hid the lower layer's");
    assert!(stat(&img, "/opt/new").is_some());
    assert_eq!(stat(&img, "/tmp").map(|s| s.0), Some("01777".into()));
    assert_eq!(stat(&img, "/sbin/ember-init").map(|s| s.0), Some("0755".into()));
    assert_eq!(stat(&img, "/usr/local/sbin/ember-agent").map(|s| s.0), Some("0755".into()));
    assert!(debugfs(&img, "stat /dev/console").contains("character special"));
    let links = debugfs(&img, "stat /bin/sh");
    assert!(links.contains("Links: 2"), "bin/sh-again is a hard link of bin/sh:\n{links}");
    let defaults = image::ExecDefaults::of_image(&img).unwrap().unwrap();
    // A bare name stays a name: the guest looks it up, with its supplementary groups.
    assert_eq!(defaults.user.as_deref(), Some("app"));
    assert_eq!(defaults.cwd.as_deref(), Some("/home/app"));
    assert!(defaults.env.contains(&("GREETING".into(), "hello there".into())));
    assert_eq!(defaults.entrypoint, ["/bin/sh"]);
}

