//! A test backend: each sandbox is a directory on the host whose "guest paths" are under it,
//! and commands are host processes run in it (their working directory mapped there, HOME set
//! to it), and ports are the host's loopback (dialed by the real agent, in-process). Starts
//! return a new name, as the real backend's successors do. Used by the Rust
//! tests and by `examples/fake_serve.rs`, which the SDK tests drive.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use server::backend::{
    Backend, BackendError, Control, CreateSpec, Created, DirEntry, ExecSpec, Exit, FileKind,
    FileStat, ImageDefaults, OutputSink, Result, Running, Source, State, Stream, Template,
};

pub struct FakeBackend {
    root: PathBuf,
    boxes: Mutex<HashMap<String, State>>,
    /// The sandboxes `add` made, each with a number of its own.
    incarnations: Mutex<HashMap<String, u64>>,
    next: AtomicU64,
    templates: Vec<Template>,
    /// How long a create takes.
    pub create_delay: Mutex<Duration>,
}

fn bad(e: std::io::Error) -> BackendError {
    match e.kind() {
        std::io::ErrorKind::NotFound => BackendError::NotFound(e.to_string()),
        _ => BackendError::Failed(e.to_string()),
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

impl FakeBackend {
    /// A backend keeping its sandboxes under `root`, offering a template `python`.
    pub fn new(root: &Path) -> FakeBackend {
        let templates = vec![Template {
            name: "python".into(),
            vcpus: 1,
            mem_bytes: 256 << 20,
            created: 1_700_000_000,
        }];
        FakeBackend {
            root: root.to_path_buf(),
            boxes: Mutex::new(HashMap::new()),
            incarnations: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            templates,
            create_delay: Mutex::new(Duration::ZERO),
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join("boxes").join(name)
    }

    fn running(&self, name: &str) -> Result<PathBuf> {
        match self.boxes.lock().unwrap().get(name) {
            Some(State::Running) => Ok(self.dir(name)),
            Some(_) => Err(BackendError::NotReady(format!("{name} is not running"))),
            None => Err(BackendError::NotFound(format!(
                "there is no sandbox {name}"
            ))),
        }
    }

    /// Guest path `path` of sandbox `name` on the host.
    fn host_path(&self, name: &str, path: &str) -> Result<PathBuf> {
        let dir = self.running(name)?;
        let relative = Path::new(path)
            .strip_prefix("/")
            .map_err(|_| BackendError::Invalid(format!("{path} is not absolute")))?;
        if relative
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(BackendError::Invalid(format!("{path}: no . or .. please")));
        }
        Ok(dir.join(relative))
    }

    /// A running sandbox named `name`, as the host's CLI would make one (a removed one's name
    /// may be given again: it is another incarnation).
    pub fn add(&self, name: &str) {
        std::fs::create_dir_all(self.dir(name)).unwrap();
        self.boxes.lock().unwrap().insert(name.into(), State::Running);
        self.incarnations.lock().unwrap().insert(name.into(), self.next.fetch_add(1, Ordering::Relaxed));
    }

    fn new_name(&self) -> String {
        format!("fake-{}", self.next.fetch_add(1, Ordering::Relaxed))
    }
}

fn stat_of(meta: &std::fs::Metadata) -> FileStat {
    let kind = if meta.file_type().is_symlink() {
        FileKind::Symlink
    } else if meta.is_dir() {
        FileKind::Dir
    } else if meta.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    };
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    FileStat {
        kind,
        size: meta.len(),
        mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777,
        mtime_ns: mtime.as_nanos() as i64,
    }
}

impl Backend for FakeBackend {
    fn create(&self, spec: &CreateSpec) -> Result<Created> {
        std::thread::sleep(*self.create_delay.lock().unwrap());
        let name = self.new_name();
        match &spec.source {
            Source::Default => std::fs::create_dir_all(self.dir(&name)).map_err(bad)?,
            Source::Template(t) if self.templates.iter().any(|x| &x.name == t) => {
                std::fs::create_dir_all(self.dir(&name)).map_err(bad)?
            }
            Source::Template(t) => {
                return Err(BackendError::NotFound(format!("there is no template {t}")))
            }
            Source::Snapshot(id) => {
                copy_tree(&self.root.join("snapshots").join(id), &self.dir(&name)).map_err(bad)?
            }
        }
        if spec.vcpus.is_some_and(|v| v > 8) {
            return Err(BackendError::Invalid(format!(
                "{} vCPUs are refused: give --vcpus from 1 to 8",
                spec.vcpus.unwrap_or(0)
            )));
        }
        self.boxes
            .lock()
            .unwrap()
            .insert(name.clone(), State::Running);
        Ok(Created {
            name,
            vcpus: spec.vcpus.unwrap_or(1),
            mem_bytes: spec.mem_bytes.unwrap_or(256 << 20),
            disk_bytes: None,
        })
    }

    fn remove(&self, name: &str) -> Result<()> {
        self.boxes
            .lock()
            .unwrap()
            .remove(name)
            .ok_or_else(|| BackendError::NotFound(name.into()))?;
        std::fs::remove_dir_all(self.dir(name)).map_err(bad)
    }

    fn instance(&self, name: &str) -> Result<String> {
        self.state(name)?;
        Ok(self.incarnations.lock().unwrap().get(name).map_or_else(|| name.to_string(), |n| format!("{name}-{n}")))
    }

    fn state(&self, name: &str) -> Result<State> {
        self.boxes
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .ok_or_else(|| BackendError::NotFound(name.into()))
    }

    fn stop(&self, name: &str, keep_memory: bool) -> Result<()> {
        self.running(name)?;
        self.boxes.lock().unwrap().insert(
            name.into(),
            State::Stopped {
                memory: keep_memory,
            },
        );
        Ok(())
    }

    fn start(&self, name: &str, _ready_timeout: Duration) -> Result<String> {
        let mut boxes = self.boxes.lock().unwrap();
        match boxes.get(name) {
            Some(State::Stopped { .. }) => {}
            Some(_) => return Ok(name.into()),
            None => return Err(BackendError::NotFound(name.into())),
        }
        let successor = self.new_name();
        std::fs::rename(self.dir(name), self.dir(&successor)).map_err(bad)?;
        boxes.remove(name);
        boxes.insert(successor.clone(), State::Running);
        Ok(successor)
    }

    fn snapshot(&self, name: &str, id: &str) -> Result<()> {
        copy_tree(&self.running(name)?, &self.root.join("snapshots").join(id)).map_err(bad)
    }

    /// A snapshot with nothing in it; an image from a registry on 127.0.0.1:1 (where nothing
    /// listens) fails as an unreachable registry would. Its Env names the image.
    fn snapshot_from_image(&self, id: &str, image: &str, _capacity: Option<u64>) -> Result<ImageDefaults> {
        if image.starts_with("127.0.0.1:1/") {
            return Err(BackendError::Invalid(format!("image {image}: registry: connection refused")));
        }
        std::fs::create_dir_all(self.root.join("snapshots").join(id)).map_err(bad)?;
        Ok(ImageDefaults { user: None, work_dir: Some("/".into()), env: vec![("EMBER_IMAGE".into(), image.into())] })
    }

    fn remove_snapshot(&self, id: &str) -> Result<()> {
        std::fs::remove_dir_all(self.root.join("snapshots").join(id)).map_err(bad)
    }

    fn templates(&self) -> Result<Vec<Template>> {
        Ok(self.templates.clone())
    }

    fn fork(&self, name: &str, count: usize, _ready_timeout: Duration) -> Result<Vec<Created>> {
        let dir = self.running(name)?;
        (0..count)
            .map(|_| {
                let child = self.new_name();
                copy_tree(&dir, &self.dir(&child)).map_err(bad)?;
                self.boxes
                    .lock()
                    .unwrap()
                    .insert(child.clone(), State::Running);
                Ok(Created {
                    name: child,
                    vcpus: 1,
                    mem_bytes: 256 << 20,
                    disk_bytes: None,
                })
            })
            .collect()
    }

    fn exec(&self, name: &str, spec: &ExecSpec) -> Result<Box<dyn Running>> {
        let dir = self.running(name)?;
        let cwd = match &spec.cwd {
            Some(cwd) => self.host_path(name, cwd)?,
            None => dir.clone(),
        };
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or_else(|| BackendError::Invalid("empty argv".into()))?;
        let mut child = std::process::Command::new(program)
            .args(args)
            .current_dir(&cwd)
            .env("HOME", &dir)
            .envs(spec.env.iter().cloned())
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| BackendError::Failed(format!("cannot run {program}: {e}")))?;
        let stdin = child.stdin.take().map(|mut pipe| {
            let (tx, rx) = mpsc::channel::<Vec<u8>>();
            std::thread::spawn(move || {
                for data in rx {
                    if pipe.write_all(&data).is_err() {
                        break;
                    }
                }
            });
            tx
        });
        let control = Arc::new(FakeControl {
            pgid: child.id() as i32,
            stdin: Mutex::new(stdin),
        });
        Ok(Box::new(FakeRunning { child, control }))
    }

    fn upload(
        &self,
        name: &str,
        path: &str,
        data: &mut (dyn Read + Send),
        mode: u32,
    ) -> Result<u64> {
        let target = self.host_path(name, path)?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(bad)?;
        }
        let mut file = std::fs::File::create(&target).map_err(bad)?;
        let n = std::io::copy(data, &mut file).map_err(bad)?;
        std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .map_err(bad)?;
        Ok(n)
    }

    fn download(&self, name: &str, path: &str, out: &mut dyn Write) -> Result<u64> {
        let mut file = std::fs::File::open(self.host_path(name, path)?).map_err(bad)?;
        std::io::copy(&mut file, out).map_err(|e| BackendError::Failed(e.to_string()))
    }

    fn stat(&self, name: &str, path: &str) -> Result<FileStat> {
        Ok(stat_of(
            &std::fs::symlink_metadata(self.host_path(name, path)?).map_err(bad)?,
        ))
    }

    fn list_dir(&self, name: &str, path: &str) -> Result<Vec<DirEntry>> {
        let dir = if path == "/" {
            self.running(name)?
        } else {
            self.host_path(name, path)?
        };
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let meta = std::fs::symlink_metadata(entry.path()).map_err(bad)?;
            entries.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                stat: stat_of(&meta),
            });
        }
        Ok(entries)
    }

    /// The real agent, in this process, dials the host's loopback: a box's ports are this
    /// host's, and the splice is the agent's own.
    fn dial(&self, name: &str, port: u16) -> Result<std::os::unix::net::UnixStream> {
        self.running(name)?;
        let (host, agent) = std::os::unix::net::UnixStream::pair().map_err(bad)?;
        std::thread::spawn(move || ember_agent::server::serve(agent, &ember_agent::server::Config::default()));
        Ok(agent_client::dial(host, port)?)
    }
}

struct FakeControl {
    pgid: i32,
    stdin: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
}

impl Control for FakeControl {
    fn write_stdin(&self, data: &[u8]) {
        if let Some(tx) = self.stdin.lock().unwrap().as_ref() {
            let _ = tx.send(data.to_vec());
        }
    }

    fn close_stdin(&self) {
        self.stdin.lock().unwrap().take();
    }

    fn kill(&self) {
        // SAFETY: kill(2) of the command's own process group, which the fake made.
        unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
    }
}

struct FakeRunning {
    child: std::process::Child,
    control: Arc<FakeControl>,
}

fn pipe_into(mut pipe: impl Read, sink: &dyn OutputSink, stream: Stream) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        sink.write(stream, &buf[..n]);
    }
}

impl Running for FakeRunning {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn control(&self) -> Arc<dyn Control> {
        self.control.clone()
    }

    fn wait(mut self: Box<Self>, sink: &dyn OutputSink) -> Result<Exit> {
        let (out, err) = (self.child.stdout.take(), self.child.stderr.take());
        std::thread::scope(|scope| {
            if let Some(err) = err {
                scope.spawn(|| pipe_into(err, sink, Stream::Stderr));
            }
            if let Some(out) = out {
                pipe_into(out, sink, Stream::Stdout);
            }
        });
        let status = self.child.wait().map_err(bad)?;
        self.control.close_stdin();
        Ok(match status.code() {
            Some(code) => Exit::Code(code),
            None => Exit::Signal(status.signal().unwrap_or(0)),
        })
    }
}
