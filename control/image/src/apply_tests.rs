use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::*;

/// A hand-built tar layer.
#[derive(Default)]
pub(crate) struct LayerTar {
    builder: Option<tar::Builder<Vec<u8>>>,
}

impl LayerTar {
    pub(crate) fn new() -> Self {
        LayerTar { builder: Some(tar::Builder::new(Vec::new())) }
    }

    fn add(&mut self, path: &str, kind: EntryType, mode: u32, owner: (u64, u64), link: Option<&str>, data: &[u8]) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        // Set by hand: the builder's own setters refuse `..` and absolute paths, which the
        // applier must be shown to refuse itself.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        self.builder.as_mut().unwrap().append(&h, data).unwrap();
        self
    }

    pub(crate) fn file(&mut self, path: &str, data: &str, mode: u32, owner: (u64, u64)) -> &mut Self {
        self.add(path, EntryType::Regular, mode, owner, None, data.as_bytes())
    }
    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.add(path, EntryType::Directory, mode, (0, 0), None, b"")
    }
    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, EntryType::Symlink, 0o777, (0, 0), Some(target), b"")
    }
    pub(crate) fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.add(path, EntryType::Link, 0o644, (0, 0), Some(target), b"")
    }
    pub(crate) fn char_dev(&mut self, path: &str, major: u32, minor: u32) -> &mut Self {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(EntryType::Char);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_size(0);
        h.set_cksum();
        self.builder.as_mut().unwrap().append(&h, &b""[..]).unwrap();
        self
    }
    pub(crate) fn bytes(&mut self) -> Vec<u8> {
        self.builder.take().unwrap().into_inner().unwrap()
    }
}

struct Staged {
    dir: tempfile::TempDir,
    tree: Tree,
}

fn staged() -> Staged {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("root")).unwrap();
    let tree = Tree::open(&dir.path().join("root")).unwrap();
    Staged { dir, tree }
}

impl Staged {
    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
    fn apply(&self, layer: &mut LayerTar) -> Result<LayerStats, LayerError> {
        apply(&self.tree, &layer.bytes()[..])
    }
    fn exists(&self, p: &str) -> bool {
        self.root().join(p).symlink_metadata().is_ok()
    }
    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.root().join(p)).unwrap()
    }
}

#[test]
fn files_keep_owner_mode_and_setuid() {
    let s = staged();
    s.apply(LayerTar::new().dir("usr/", 0o755).file("usr/bin/su", "su", 0o4755, (0, 0)).file("home/u/f", "x", 0o640, (1000, 1001)))
        .unwrap();
    let su = s.root().join("usr/bin/su").metadata().unwrap();
    assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
    let f = s.root().join("home/u/f").metadata().unwrap();
    assert_eq!((f.uid(), f.gid(), f.mode() & 0o7777), (1000, 1001, 0o640));
    assert_eq!(f.mtime(), 1_700_000_000);
}

#[test]
fn whiteout_removes_a_lower_file_and_a_lower_directory() {
    let s = staged();
    s.apply(LayerTar::new().file("etc/secret", "s", 0o600, (0, 0)).file("var/cache/a/b", "b", 0o644, (0, 0))).unwrap();
    s.apply(LayerTar::new().file("etc/.wh.secret", "", 0o644, (0, 0)).file("var/cache/.wh.a", "", 0o644, (0, 0))).unwrap();
    assert!(!s.exists("etc/secret"));
    assert!(!s.exists("var/cache/a"));
    assert!(s.exists("var/cache"));
}

#[test]
fn whiteout_spares_what_the_same_layer_made() {
    let s = staged();
    s.apply(LayerTar::new().file("a/kept", "new", 0o644, (0, 0)).file("a/.wh.kept", "", 0o644, (0, 0))).unwrap();
    assert_eq!(s.read("a/kept"), "new");
}

#[test]
fn opaque_directory_hides_lower_content_in_either_order() {
    let s = staged();
    s.apply(LayerTar::new().file("opt/old", "o", 0o644, (0, 0)).file("opt/sub/old", "o", 0o644, (0, 0)).file("other", "x", 0o644, (0, 0)))
        .unwrap();
    // An entry of this layer before the marker, one after it.
    s.apply(LayerTar::new().file("opt/sub/before", "b", 0o644, (0, 0)).file("opt/.wh..wh..opq", "", 0o644, (0, 0)).file("opt/after", "a", 0o644, (0, 0)))
        .unwrap();
    assert!(!s.exists("opt/old"));
    assert!(!s.exists("opt/sub/old"));
    assert_eq!(s.read("opt/sub/before"), "b");
    assert_eq!(s.read("opt/after"), "a");
    assert!(s.exists("other"));
}

#[test]
fn hard_link_shares_the_inode() {
    let s = staged();
    s.apply(LayerTar::new().file("bin/a", "data", 0o755, (0, 0)).hardlink("bin/b", "bin/a")).unwrap();
    let (a, b) = (s.root().join("bin/a").metadata().unwrap(), s.root().join("bin/b").metadata().unwrap());
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
}

#[test]
fn later_layer_replaces_a_file_with_a_directory_and_back() {
    let s = staged();
    s.apply(LayerTar::new().file("x", "file", 0o644, (0, 0))).unwrap();
    s.apply(LayerTar::new().file("x/y", "in dir", 0o644, (0, 0))).unwrap_err();
    s.apply(LayerTar::new().dir("x", 0o755).file("x/y", "in dir", 0o644, (0, 0))).unwrap();
    assert_eq!(s.read("x/y"), "in dir");
    s.apply(LayerTar::new().file("x", "file again", 0o644, (0, 0))).unwrap();
    assert_eq!(s.read("x"), "file again");
}

#[test]
fn parent_traversal_is_refused() {
    let s = staged();
    let e = s.apply(LayerTar::new().file("../escaped", "x", 0o644, (0, 0))).unwrap_err();
    assert!(matches!(e, LayerError::Traversal { .. }), "{e}");
    let e = s.apply(LayerTar::new().file("a/../../escaped", "x", 0o644, (0, 0))).unwrap_err();
    assert!(matches!(e, LayerError::Traversal { .. }), "{e}");
    assert!(!s.dir.path().join("escaped").exists());
}

#[test]
fn absolute_paths_are_refused() {
    let s = staged();
    let e = s.apply(LayerTar::new().file("/tmp/ember-image-abs-test", "x", 0o644, (0, 0))).unwrap_err();
    assert!(matches!(e, LayerError::Traversal { .. }), "{e}");
    assert!(!Path::new("/tmp/ember-image-abs-test").exists());
}

#[test]
fn hard_link_out_of_the_tree_is_refused() {
    let s = staged();
    let e = s.apply(LayerTar::new().hardlink("passwd", "../../../../etc/passwd")).unwrap_err();
    assert!(matches!(e, LayerError::Traversal { .. }), "{e}");
    assert!(!s.exists("passwd"));
}

#[test]
fn writing_through_a_symlink_out_of_the_tree_is_refused() {
    let s = staged();
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    // A link made in one layer, written through in the next: the classic extraction hole.
    s.apply(LayerTar::new().symlink("evil", "../outside")).unwrap();
    let e = s.apply(LayerTar::new().file("evil/planted", "x", 0o644, (0, 0))).unwrap_err();
    assert!(matches!(e, LayerError::SymlinkEscape { .. }), "{e}");
    assert!(!outside.join("planted").exists());
    // The same within one layer, through a chain of links.
    let e = s.apply(LayerTar::new().symlink("a", "b/../..").symlink("b", "d").dir("d", 0o755).file("a/planted", "x", 0o644, (0, 0)))
        .unwrap_err();
    assert!(matches!(e, LayerError::SymlinkEscape { .. }), "{e}");
    assert!(!outside.join("planted").exists());
}

#[test]
fn absolute_symlinks_resolve_inside_the_tree() {
    let s = staged();
    let outside = s.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    s.apply(LayerTar::new().symlink("lib64", "/usr/lib64").symlink("out", outside.to_str().unwrap())).unwrap();
    s.apply(LayerTar::new().file("lib64/ld.so", "ld", 0o755, (0, 0)).file("out/planted", "x", 0o644, (0, 0))).unwrap();
    assert_eq!(s.read("usr/lib64/ld.so"), "ld");
    assert!(!outside.join("planted").exists());
    assert!(s.root().join(outside.strip_prefix("/").unwrap()).join("planted").exists());
}

#[test]
fn symlink_loop_is_an_error() {
    let s = staged();
    let e = s.apply(LayerTar::new().symlink("a", "b").symlink("b", "a").file("a/x", "x", 0o644, (0, 0))).unwrap_err();
    assert!(matches!(e, LayerError::SymlinkLoop { .. }), "{e}");
}

#[test]
fn device_nodes_are_made() {
    let s = staged();
    s.apply(LayerTar::new().char_dev("dev/null", 1, 3)).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = s.root().join("dev/null").symlink_metadata().unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), rustix::fs::makedev(1, 3));
}

#[test]
fn a_truncated_tar_is_an_error() {
    let s = staged();
    let bytes = LayerTar::new().file("big", &"x".repeat(10_000), 0o644, (0, 0)).bytes();
    let e = apply(&s.tree, &bytes[..2048]).unwrap_err();
    assert!(matches!(e, LayerError::Tar(_)), "{e}");
}
