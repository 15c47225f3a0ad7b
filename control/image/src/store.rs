//! The images ember made from OCI images: `DIR/HEX-CAPACITY.ext4` (HEX the manifest digest,
//! so an image is built once per capacity), its run config beside it as `.json`, and
//! `DIR/index.json` naming them `name:tag`. The index is rewritten whole under a lock.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io, ImageError};
use crate::oci::RunConfig;

const INDEX: &str = "index.json";
const LOCK: &str = ".lock";

/// One named image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// `name:tag`.
    pub name: String,
    /// The manifest's digest.
    pub digest: String,
    /// The ext4 file's name in the store's directory.
    pub file: String,
    pub capacity: u64,
    pub config: RunConfig,
    /// Seconds since the epoch.
    pub created: u64,
}

/// What every exec in a sandbox made from the image starts with, unless it says otherwise:
/// the file beside the image (`.json`), found from the image a sandbox's record names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// `uid:gid`, or a user name for the guest to look up.
    pub user: Option<String>,
    /// Recorded and shown; a sandbox runs ember's agent, and these only when asked to
    /// (`ember run --detach --start`, see `argv`).
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

impl ExecDefaults {
    /// The defaults of the image at `image`, if ember made it from an OCI image (its name is
    /// the store's `HEX-CAPACITY.ext4`: any other image's neighbours are not read).
    pub fn of_image(image: &Path) -> Result<Option<ExecDefaults>, ImageError> {
        let stem = image.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ext4")).unwrap_or("");
        let ours = stem.split_once('-').is_some_and(|(hex, cap)| {
            hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && !cap.is_empty() && cap.bytes().all(|b| b.is_ascii_digit())
        });
        if !ours {
            return Ok(None);
        }
        let path = image.with_extension("json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ImageError::Io { what: "invalid image defaults", path, error: e.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io { what: "cannot read", path, error: e }),
        }
    }

    /// The image's command as `docker run IMAGE [COMMAND...]` runs it: the Entrypoint, then
    /// `command` if one is given, else the image's Cmd. None when that leaves nothing to run.
    pub fn argv(&self, command: &[String]) -> Option<Vec<String>> {
        let args = if command.is_empty() { &self.cmd } else { command };
        let argv: Vec<String> = self.entrypoint.iter().chain(args).cloned().collect();
        (!argv.is_empty()).then_some(argv)
    }
}

pub struct Store {
    dir: PathBuf,
    blobs: PathBuf,
}

/// `name` with `:latest` when it has no tag (a `:` after its last `/`).
pub fn normalize(name: &str) -> Result<String, ImageError> {
    let bad = |reason| ImageError::BadName { name: name.into(), reason };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("empty or longer than 255 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b)) {
        return Err(bad("only letters, digits and . _ - / : @ may be in it"));
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    Ok(if last.contains(':') || last.contains('@') { name.to_string() } else { format!("{name}:latest") })
}

impl Store {
    /// Images in `dir`; the layers pulls fetch are kept in `blobs` (`sha256/HEX`).
    pub fn new(dir: PathBuf, blobs: PathBuf) -> Store {
        Store { dir, blobs }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blobs(&self) -> &Path {
        &self.blobs
    }

    pub fn path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(&entry.file)
    }

    pub fn list(&self) -> Result<Vec<Entry>, ImageError> {
        let path = self.dir.join(INDEX);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ImageError::Io { what: "invalid image index", path, error: e.into() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(ImageError::Io { what: "cannot read", path, error: e }),
        }
    }

    /// The image named `name` (`name:latest` if it has no tag).
    pub fn find(&self, name: &str) -> Result<Entry, ImageError> {
        let wanted = normalize(name)?;
        self.list()?.into_iter().find(|e| e.name == wanted).ok_or(ImageError::NotFound(wanted))
    }

    /// Names `entry` (replacing an image of the same name; its file stays while another name uses it).
    pub(crate) fn add(&self, entry: Entry) -> Result<(), ImageError> {
        self.locked(|entries| {
            entries.retain(|e| e.name != entry.name);
            entries.push(entry);
            Ok(())
        })
        .map(|_| ())
    }

    /// Removes the name; the image's files go once no name is left on them.
    pub fn remove(&self, name: &str) -> Result<Entry, ImageError> {
        let wanted = normalize(name)?;
        let (gone, orphaned) = self.locked(|entries| {
            let i = entries.iter().position(|e| e.name == wanted).ok_or_else(|| ImageError::NotFound(wanted.clone()))?;
            let gone = entries.remove(i);
            let orphaned = !entries.iter().any(|e| e.file == gone.file);
            Ok((gone, orphaned))
        })?;
        if orphaned {
            let file = self.path(&gone);
            for p in [file.with_extension("json"), file.clone()] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ImageError::Io { what: "cannot remove", path: p, error: e }),
                }
            }
        }
        Ok(gone)
    }

    fn locked<T>(&self, f: impl FnOnce(&mut Vec<Entry>) -> Result<T, ImageError>) -> Result<T, ImageError> {
        create_public_dir(&self.dir).map_err(io("cannot create", &self.dir))?;
        let lock_path = self.dir.join(LOCK);
        let lock = File::create(&lock_path).map_err(io("cannot create", &lock_path))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).map_err(|e| ImageError::Io { what: "cannot lock", path: lock_path, error: e.into() })?;
        let mut entries = self.list()?;
        let out = f(&mut entries)?;
        let bytes = serde_json::to_vec_pretty(&entries).expect("entries serialize");
        write_atomic(&self.dir.join(INDEX), &bytes)?;
        Ok(out)
    }
}

/// Creates `dir` and the missing directories above it, each 0755 whatever the umask (ember's
/// is 077): the images in it are read by every sandbox's VMM, jailed as a uid of its own.
fn create_public_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    std::fs::create_dir_all(dir)?;
    for d in missing {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Writes `path` by a temp file renamed over it: a reader sees the old or the new, whole.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = File::create(&tmp).map_err(io("cannot create", &tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot rename into place", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_latest_unless_tagged() {
        assert_eq!(normalize("busybox").unwrap(), "busybox:latest");
        assert_eq!(normalize("127.0.0.1:5000/test").unwrap(), "127.0.0.1:5000/test:latest");
        assert_eq!(normalize("127.0.0.1:5000/test:1").unwrap(), "127.0.0.1:5000/test:1");
        assert!(normalize("a b").is_err());
        assert!(normalize("").is_err());
    }

    #[test]
    fn only_the_store_s_images_have_defaults_beside_them() {
        let tmp = tempfile::tempdir().unwrap();
        let ours = tmp.path().join(format!("{}-1024.ext4", "a".repeat(64)));
        let defaults = ExecDefaults { user: Some("1:2".into()), ..Default::default() };
        std::fs::write(ours.with_extension("json"), serde_json::to_vec(&defaults).unwrap()).unwrap();
        assert_eq!(ExecDefaults::of_image(&ours).unwrap(), Some(defaults));
        let theirs = tmp.path().join("mine.ext4");
        std::fs::write(theirs.with_extension("json"), b"not defaults").unwrap();
        assert_eq!(ExecDefaults::of_image(&theirs).unwrap(), None);
    }

    #[test]
    fn the_command_is_the_entrypoint_then_the_given_command_else_cmd() {
        let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let both = ExecDefaults { entrypoint: v(&["/bin/app", "--serve"]), cmd: v(&["--port", "80"]), ..Default::default() };
        assert_eq!(both.argv(&[]), Some(v(&["/bin/app", "--serve", "--port", "80"])));
        assert_eq!(both.argv(&v(&["--port", "8080"])), Some(v(&["/bin/app", "--serve", "--port", "8080"])), "the command replaces Cmd, not the Entrypoint");
        let cmd_only = ExecDefaults { cmd: v(&["python3", "-m", "http.server"]), ..Default::default() };
        assert_eq!(cmd_only.argv(&[]), Some(v(&["python3", "-m", "http.server"])));
        assert_eq!(cmd_only.argv(&v(&["sleep", "9"])), Some(v(&["sleep", "9"])));
        assert_eq!(ExecDefaults::default().argv(&v(&["sleep", "9"])), Some(v(&["sleep", "9"])), "an image ember did not make: the command alone");
        assert_eq!(ExecDefaults::default().argv(&[]), None);
    }

    #[test]
    fn remove_keeps_files_another_name_uses() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(tmp.path().join("images"), tmp.path().join("blobs"));
        let entry = |name: &str| Entry { name: name.into(), digest: "d".into(), file: "x.ext4".into(), capacity: 1, config: RunConfig::default(), created: 0 };
        store.add(entry("a:1")).unwrap();
        store.add(entry("b:1")).unwrap();
        std::fs::write(store.dir().join("x.ext4"), b"").unwrap();
        store.remove("a:1").unwrap();
        assert!(store.dir().join("x.ext4").exists());
        assert!(matches!(store.find("a:1"), Err(ImageError::NotFound(_))));
        store.remove("b:1").unwrap();
        assert!(!store.dir().join("x.ext4").exists());
        assert!(store.list().unwrap().is_empty());
    }
}
