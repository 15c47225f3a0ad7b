//! Pulls from Debian's `docker-registry` (the distribution registry) on loopback, images pushed
//! to it with `skopeo` (both installed by tests/install-deps): the image built, a second image
//! sharing the base layer fetching only its own blobs (counted by the pull and in the
//! registry's access log), a missing tag, a registry that answers 401, and where credentials
//! come from.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use image::{ImageError, PullOptions};

struct Registry {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A registry on 127.0.0.1 storing under `dir`; with `htpasswd`, one that wants credentials.
fn registry(dir: &Path, htpasswd: Option<(&str, &str)>) -> Registry {
    let port = free_port();
    let mut config = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.join("storage").display()
    );
    if let Some((user, pass)) = htpasswd {
        let file = dir.join("htpasswd");
        std::fs::write(&file, format!("{user}:{}\n", bcrypt::hash(pass, 5).unwrap())).unwrap();
        config += &format!("auth:\n  htpasswd:\n    realm: ember-test\n    path: {}\n", file.display());
    }
    std::fs::write(dir.join("config.yml"), config).unwrap();
    let log = dir.join("registry.log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .expect("docker-registry (Debian's docker-registry package; tests/install-deps installs it)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the registry did not listen: {}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, port, log }
}

fn push(layout: &Path, dest: &str, creds: Option<&str>) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    if let Some(c) = creds {
        cmd.args(["--dest-creds", c]);
    }
    let out = cmd.arg(format!("oci:{}:1", layout.display())).arg(format!("docker://{dest}")).stdin(Stdio::null()).output().expect("skopeo (tests/install-deps installs it)");
    assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
}

/// Blob GETs the registry logged for `repo`.
fn blob_gets(reg: &Registry, repo: &str) -> usize {
    let log = std::fs::read_to_string(&reg.log).unwrap();
    let needle = format!("\"GET /v2/{repo}/blobs/sha256:");
    log.lines().filter(|l| l.contains(&needle)).count()
}

fn pull(f: &Fixture, reference: &str, opts: &PullOptions) -> Result<(image::Entry, image::PullStats), ImageError> {
    let (resolved, stats) = image::pull(&f.store, reference, opts, &mut |line| eprintln!("{line}"))?;
    Ok((f.build(resolved, reference)?, stats))
}

#[test]
fn pull_builds_the_image_and_a_second_image_fetches_only_its_own_layers() {
    let f = fixture();
    let reg = registry(f.tmp.path(), None);
    let a = layout(&f.tmp.path().join("a"), "amd64");
    let b = layout_with(&f.tmp.path().join("b"), "amd64", Layer::new().file("etc/b", "only in b", 0o644, 0).tar());
    push(&a.dir, &format!("127.0.0.1:{}/test:1", reg.port), None);
    push(&b.dir, &format!("127.0.0.1:{}/other:1", reg.port), None);

    let (entry, stats) = pull(&f, &format!("127.0.0.1:{}/test:1", reg.port), &PullOptions::default()).unwrap();
    check_image(&f, &entry);
    assert_eq!((stats.fetched, stats.cached), (3, 0), "config and two layers");
    assert_eq!(blob_gets(&reg, "test"), 3);

    let (other, stats) = pull(&f, &format!("127.0.0.1:{}/other:1", reg.port), &PullOptions::default()).unwrap();
    assert_eq!((stats.fetched, stats.cached), (2, 1), "its config and top layer; the base layer was cached");
    assert_eq!(blob_gets(&reg, "other"), 2);
    assert!(stat(&f.store.path(&other), "/etc/b").is_some());

    let (_, stats) = pull(&f, &format!("127.0.0.1:{}/test:1", reg.port), &PullOptions::default()).unwrap();
    assert_eq!(stats.fetched, 0);
    assert_eq!(blob_gets(&reg, "test"), 3);

    let e = pull(&f, &format!("127.0.0.1:{}/test:nope", reg.port), &PullOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::NotInRegistry { .. }), "{e}");
    assert!(e.to_string().contains("test:nope"), "{e}");
}

#[test]
fn a_registry_that_wants_credentials_answers_401_without_them() {
    let f = fixture();
    let reg = registry(f.tmp.path(), Some(("ember", "s3cret")));
    let a = layout(&f.tmp.path().join("a"), "amd64");
    let reference = format!("127.0.0.1:{}/private:1", reg.port);
    push(&a.dir, &reference, Some("ember:s3cret"));
    // No credentials by registry: not the host's docker config.json's either.
    let none = Some(image::Credentials::default());
    for auth in [None, Some(("ember".to_string(), "wrong".to_string()))] {
        let e = pull(&f, &reference, &PullOptions { auth, credentials: none.clone(), ..PullOptions::default() }).unwrap_err();
        assert!(matches!(e, ImageError::Unauthorized { .. }), "{e}");
        assert!(e.to_string().contains(&reference), "{e}");
    }
    let auth = Some(("ember".to_string(), "s3cret".to_string()));
    let (entry, _) = pull(&f, &reference, &PullOptions { auth, ..PullOptions::default() }).unwrap();
    check_image(&f, &entry);
}

/// A docker config.json with `user:pass` for `registry`, in `dir`.
fn docker_config(dir: &Path, registry: &str, creds: &str) -> PathBuf {
    use base64::Engine as _;
    std::fs::create_dir_all(dir).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(creds);
    std::fs::write(dir.join("config.json"), serde_json::json!({"auths": {registry: {"auth": auth}}}).to_string()).unwrap();
    dir.join("config.json")
}

#[test]
fn credentials_come_from_the_file_given_else_from_the_host_s_docker_config() {
    let f = fixture();
    let reg = registry(f.tmp.path(), Some(("ember", "s3cret")));
    let a = layout(&f.tmp.path().join("a"), "amd64");
    let registry = format!("127.0.0.1:{}", reg.port);
    push(&a.dir, &format!("{registry}/private:1"), Some("ember:s3cret"));
    // The host's (DOCKER_CONFIG's) are right; a file given replaces them, as `ember serve
    // --registry-auth FILE` does.
    std::env::set_var("DOCKER_CONFIG", f.tmp.path().join("host"));
    docker_config(&f.tmp.path().join("host"), &registry, "ember:s3cret");
    let wrong = image::Credentials::load(&docker_config(&f.tmp.path().join("given"), &registry, "ember:wrong")).unwrap();
    let e = pull(&f, &format!("{registry}/private:1"), &PullOptions { credentials: Some(wrong), ..PullOptions::default() }).unwrap_err();
    assert!(matches!(e, ImageError::Unauthorized { .. }), "the host's were used: {e}");
    let right = image::Credentials::load(&docker_config(&f.tmp.path().join("given"), &registry, "ember:s3cret")).unwrap();
    let (entry, _) = pull(&f, &format!("{registry}/private:1"), &PullOptions { credentials: Some(right), ..PullOptions::default() }).unwrap();
    check_image(&f, &entry);
    image::Store::remove(&f.store, &entry.name).unwrap();
    let (entry, _) = pull(&f, &format!("{registry}/private:1"), &PullOptions::default()).unwrap();
    check_image(&f, &entry);
}
