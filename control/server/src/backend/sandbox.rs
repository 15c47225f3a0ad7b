//! [`SandboxBackend`]: the backend `ember serve` runs, over the control plane's `Store` and
//! the guest agent's client, as the CLI drives them.
//!
//! A stop keeps what a start needs in `<state>/stopped/<name>/state/`: with memory, a snapshot
//! of the sandbox (`Store::snapshot`), restored by the start; without, a copy of its disk made
//! after the guest synced, cold-booted by the start. The stopped sandbox itself is kept
//! (`Store::stop`: its VMM gone, its record and overlay there) until its successor runs, so
//! that the disk layers its chain goes through are never collected in between. The start
//! returns the successor's name; the successor's disk is stacked on the stopped state, so that
//! stays, and `<state>/stopped/<successor>/previous` names it for the successor's removal.
//! Captured snapshots live in `<state>/snapshots/<id>/`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use agent_client::{Exec, ExecControl, Outcome};
use sandbox::{SandboxError, SandboxSpec, Store};

use super::{
    Backend, BackendError, Control, CreateSpec, Created, DirEntry, ExecSpec, Exit, FileKind,
    FileStat, ImageDefaults, OutputSink, Result, Running, Source, State, Stream, Template,
};

/// The disk of an image built for a snapshot that names no `fs_capacity_bytes` (sparse).
const DEFAULT_IMAGE_CAPACITY: u64 = 2 << 30;

/// In a successor's stopped directory: the name of the stopped sandbox it was started from.
const PREVIOUS: &str = "previous";

/// How long an agent connection may take to answer its `CONNECT`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct SandboxBackend {
    store: Store,
    /// Where images from Docker images are built (`ember image`'s store), if anywhere.
    images: Option<image::Store>,
    /// How those images are pulled: the registry credentials are the host's (`ember serve
    /// --registry-auth FILE`, else its docker config.json), never a request's.
    pull: image::PullOptions,
    /// What a sandbox from the default image boots as (its name unset).
    boot: SandboxSpec,
    /// The server's own directory (`$EMBER_STATE/server`).
    state: PathBuf,
}

impl SandboxBackend {
    pub fn new(store: Store, boot: SandboxSpec, state: PathBuf) -> Self {
        Self { store, boot, state, images: None, pull: image::PullOptions::default() }
    }

    /// Snapshots from Docker images are built in `images`.
    pub fn with_images(self, images: image::Store) -> Self {
        Self { images: Some(images), ..self }
    }

    /// Registry credentials for the images' pulls, in place of the host's docker config.json.
    pub fn with_registry_credentials(self, credentials: image::Credentials) -> Self {
        Self { pull: image::PullOptions { credentials: Some(credentials), ..self.pull }, ..self }
    }

    /// The base image for `reference`: one of that name and capacity built before, else pulled
    /// and built now.
    fn image_for(&self, images: &image::Store, reference: &str, capacity: Option<u64>) -> Result<PathBuf> {
        let invalid = |e: image::ImageError| BackendError::Invalid(e.to_string());
        let name = image::normalize(reference).map_err(invalid)?;
        if let Ok(entry) = images.find(&name) {
            if capacity.is_none_or(|c| c == entry.capacity) {
                return Ok(images.path(&entry));
            }
        }
        let log = &mut |line: String| tracing::info!("{line}");
        let (resolved, _) = image::pull(images, reference, &self.pull, log).map_err(invalid)?;
        let scratch = image::ScratchDir::new(images.dir()).map_err(invalid)?;
        let agent = image::find_agent(scratch.path()).map_err(invalid)?;
        let opts = image::BuildOptions { name, capacity: capacity.unwrap_or(DEFAULT_IMAGE_CAPACITY), agent };
        let (entry, _) = image::build(images, resolved, &opts, log).map_err(invalid)?;
        Ok(images.path(&entry))
    }

    fn snapshot_dir(&self, id: &str) -> Result<PathBuf> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(BackendError::Invalid(format!(
                "'{id}' is not a snapshot id"
            )));
        }
        Ok(self.state.join("snapshots").join(id))
    }

    fn stopped_dir(&self, name: &str) -> PathBuf {
        self.state.join("stopped").join(name)
    }

    /// What stopped sandbox `name` keeps for its start, if it is stopped.
    fn stopped_state(&self, name: &str) -> Option<PathBuf> {
        Some(self.stopped_dir(name).join("state")).filter(|d| d.is_dir())
    }

    fn agent(&self, name: &str) -> Result<UnixStream> {
        let socket = self.store.vsock_socket(name).map_err(from_sandbox)?;
        agent_client::connect(&socket, agent_protocol::DEFAULT_PORT, CONNECT_TIMEOUT)
            .map_err(BackendError::from)
    }

    fn created(&self, record: sandbox::record::Record) -> Created {
        Created {
            name: record.name,
            vcpus: record.vcpus,
            mem_bytes: record.mem_mib << 20,
            disk_bytes: None,
        }
    }

    /// Whether any sandbox, snapshot or stopped state other than `disk` itself has a disk
    /// chain going through `disk`. A chain that cannot be read counts as using it.
    fn disk_in_use(&self, disk: &Path) -> Result<bool> {
        let Ok(target) = disk.canonicalize() else {
            return Ok(false);
        };
        let mut dirs: Vec<PathBuf> = self.state.parent().map(PathBuf::from).into_iter().collect();
        let mut tops = Vec::new();
        for status in self.store.list().map_err(from_sandbox)? {
            dirs.extend(status.record.disk_dirs.iter().cloned());
            tops.push(
                self.store
                    .dir(&status.record.name)
                    .join(sandbox::paths::OVERLAY),
            );
        }
        for dir in std::fs::read_dir(self.state.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
        {
            tops.push(dir.path().join(sandbox::SNAPSHOT_DISK));
        }
        for dir in std::fs::read_dir(self.state.join("stopped"))
            .into_iter()
            .flatten()
            .flatten()
        {
            tops.push(dir.path().join("state").join(sandbox::SNAPSHOT_DISK));
        }
        dirs.retain(|d| d.is_dir());
        let policy =
            disk::BackingPolicy::new(&dirs).map_err(|e| BackendError::Failed(e.to_string()))?;
        for top in tops
            .iter()
            .filter(|t| t.exists() && t.canonicalize().ok().as_ref() != Some(&target))
        {
            match disk::overlay::info(top, disk::Format::Qcow2, &policy) {
                Ok(chain)
                    if chain
                        .iter()
                        .any(|l| l.path.canonicalize().ok().as_ref() == Some(&target)) =>
                {
                    return Ok(true)
                }
                Ok(_) => {}
                Err(_) => return Ok(true),
            }
        }
        Ok(false)
    }
}

fn from_sandbox(e: SandboxError) -> BackendError {
    match e {
        SandboxError::NotFound(_) | SandboxError::TemplateNotFound(_) => {
            BackendError::NotFound(e.to_string())
        }
        SandboxError::BadName(_)
        | SandboxError::BadMemory { .. }
        | SandboxError::BadVcpus { .. } => BackendError::Invalid(e.to_string()),
        SandboxError::NotRunning(_) | SandboxError::Starting { .. } => {
            BackendError::NotReady(e.to_string())
        }
        e => BackendError::Failed(e.to_string()),
    }
}

/// Whether `name` can only be a name in its directory (what a `previous` file should hold).
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

fn user(spec: &str) -> Result<agent_protocol::User> {
    spec.parse().map_err(BackendError::Invalid)
}

fn stat_of(s: agent_protocol::FileStat) -> FileStat {
    let kind = match s.kind {
        agent_protocol::FileKind::File => FileKind::File,
        agent_protocol::FileKind::Dir => FileKind::Dir,
        agent_protocol::FileKind::Symlink => FileKind::Symlink,
        agent_protocol::FileKind::Other => FileKind::Other,
    };
    FileStat {
        kind,
        size: s.size,
        mode: s.mode,
        mtime_ns: s.mtime_ns,
    }
}

impl Backend for SandboxBackend {
    fn create(&self, spec: &CreateSpec) -> Result<Created> {
        let record = match &spec.source {
            Source::Default => {
                let mem_mib =
                    spec.mem_bytes
                        .map_or(Ok(self.boot.mem_mib), |b| match b % (2 << 20) {
                            0 => Ok(b >> 20),
                            _ => Err(BackendError::Invalid(format!(
                                "mem_bytes {b} is not a whole number of 2 MiB pages"
                            ))),
                        })?;
                let boot = SandboxSpec {
                    mem_mib,
                    vcpus: spec.vcpus.unwrap_or(self.boot.vcpus),
                    ready_timeout: spec.ready_timeout,
                    ..self.boot.clone()
                };
                self.store.start_auto(&boot, |name| {
                    tracing::info!("making template {name} (once)")
                })
            }
            Source::Template(name) => {
                self.store
                    .start_from_template(name, None, spec.ready_timeout)
            }
            Source::Snapshot(id) => {
                self.store
                    .start_from_snapshot(None, &self.snapshot_dir(id)?, spec.ready_timeout)
            }
        };
        Ok(self.created(record.map_err(from_sandbox)?))
    }

    fn remove(&self, name: &str) -> Result<()> {
        match self.store.remove(name) {
            Err(SandboxError::NotFound(_)) if self.stopped_dir(name).exists() => {}
            Err(e) => return Err(from_sandbox(e)),
            Ok(()) => {}
        }
        // Its stopped state, and those of the sandboxes it succeeded, which its disk was
        // stacked on.
        let mut next = Some(name.to_string());
        while let Some(name) = next.take() {
            let dir = self.stopped_dir(&name);
            next = std::fs::read_to_string(dir.join(PREVIOUS))
                .ok()
                .filter(|p| plain_name(p));
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| {
                    BackendError::Failed(format!("cannot remove {}: {e}", dir.display()))
                })?;
            }
        }
        Ok(())
    }

    /// Its creation time and its VMM's pid: a sandbox made again under the name has a VMM
    /// of its own, and two VMMs of one pid are not alive in the same second.
    fn instance(&self, name: &str) -> Result<String> {
        let record = self.store.record(name).map_err(from_sandbox)?;
        Ok(format!("{}-{}", record.created, record.pid))
    }

    fn state(&self, name: &str) -> Result<State> {
        let record = self.store.record(name).map_err(from_sandbox)?;
        if let Some(state) = self.stopped_state(name) {
            if !record.vmm_alive(&self.store.dir(name)) {
                return Ok(State::Stopped {
                    memory: state.join(sandbox::MEMORY_FILE).exists(),
                });
            }
        }
        Ok(match record.start_state() {
            sandbox::record::StartState::Ready if record.vmm_alive(&self.store.dir(name)) => {
                State::Running
            }
            sandbox::record::StartState::Starting { .. } => State::Running,
            _ => State::Failed,
        })
    }

    fn stop(&self, name: &str, keep_memory: bool) -> Result<()> {
        if self.stopped_state(name).is_some() {
            return Err(BackendError::NotReady(format!("sandbox {name} is stopped")));
        }
        let dir = self.stopped_dir(name).join("state");
        if keep_memory {
            self.store.snapshot(name, &dir).map_err(from_sandbox)?;
            return self.store.stop(name).map_err(from_sandbox);
        }
        // What the guest has written but not yet flushed to its disk would be lost with its
        // memory.
        let synced = self.agent(name).and_then(|stream| {
            let request = agent_protocol::ExecRequest {
                argv: vec!["sync".into()],
                ..Default::default()
            };
            agent_client::exec(stream, request, &mut std::io::sink(), &mut std::io::sink())
                .map_err(BackendError::from)
        });
        if let Err(e) = synced {
            tracing::warn!("sandbox {name}: sync before the stop failed: {e}");
        }
        self.store.stop(name).map_err(from_sandbox)?;
        let fail = |what: &str, e: std::io::Error| {
            BackendError::Failed(format!("sandbox {name}: cannot {what}: {e}"))
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail("keep its disk", e))?;
        std::fs::copy(
            self.store.dir(name).join(sandbox::paths::OVERLAY),
            dir.join(sandbox::SNAPSHOT_DISK),
        )
        .map_err(|e| fail("keep its disk", e))?;
        Ok(())
    }

    fn start(&self, name: &str, ready_timeout: Duration) -> Result<String> {
        let record = self.store.record(name).map_err(from_sandbox)?;
        let Some(state) = self
            .stopped_state(name)
            .filter(|_| !record.vmm_alive(&self.store.dir(name)))
        else {
            return Ok(name.to_string());
        };
        let successor = if state.join(sandbox::MEMORY_FILE).exists() {
            self.store.start_from_snapshot(None, &state, ready_timeout)
        } else {
            let boot = SandboxSpec {
                image: state.join(sandbox::SNAPSHOT_DISK),
                mem_mib: record.mem_mib,
                vcpus: record.vcpus,
                ready_timeout,
                ..self.boot.clone()
            };
            self.store.start(&boot)
        }
        .map_err(from_sandbox)?;
        let dir = self.stopped_dir(&successor.name);
        let linked =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(PREVIOUS), name));
        if let Err(e) = linked {
            let _ = self.store.remove(&successor.name);
            return Err(BackendError::Failed(format!(
                "cannot record the start of {name}: {e}"
            )));
        }
        // Only now: while it was the only one, its disk chain kept the layers below it in use.
        if let Err(e) = self.store.remove(name) {
            tracing::warn!(
                "sandbox {name}, started again as {}: cannot remove the stopped one: {e}",
                successor.name
            );
        }
        Ok(successor.name)
    }

    fn snapshot(&self, name: &str, id: &str) -> Result<()> {
        self.store
            .snapshot(name, &self.snapshot_dir(id)?)
            .map_err(from_sandbox)
    }

    fn remove_snapshot(&self, id: &str) -> Result<()> {
        let dir = self.snapshot_dir(id)?;
        if !dir.exists() {
            return Err(BackendError::NotFound(format!("there is no snapshot {id}")));
        }
        if self.disk_in_use(&dir.join(sandbox::SNAPSHOT_DISK))? {
            return Err(BackendError::NotReady(format!(
                "snapshot {id} is in use: a sandbox's disk is stacked on it"
            )));
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| BackendError::Failed(format!("cannot remove {}: {e}", dir.display())))
    }

    fn snapshot_from_image(&self, id: &str, reference: &str, capacity: Option<u64>) -> Result<ImageDefaults> {
        let images = self.images.as_ref().ok_or_else(|| BackendError::Invalid("this server has no image store: start it with EMBER_HOME set".into()))?;
        let dir = self.snapshot_dir(id)?;
        let path = self.image_for(images, reference, capacity)?;
        let defaults = image::ExecDefaults::of_image(&path).map_err(|e| BackendError::Failed(e.to_string()))?.unwrap_or_default();
        let spec = SandboxSpec { image: path, name: None, ..self.boot.clone() };
        let record = self.store.start_auto(&spec, |_| {}).map_err(from_sandbox)?;
        let snapshotted = self.store.snapshot(&record.name, &dir).map_err(from_sandbox);
        if let Err(e) = self.store.remove(&record.name) {
            tracing::warn!("cannot remove {}, the sandbox snapshot {id} was made from: {e}", record.name);
        }
        snapshotted?;
        Ok(ImageDefaults { user: defaults.user, work_dir: defaults.cwd, env: defaults.env })
    }

    fn templates(&self) -> Result<Vec<Template>> {
        let all = self.store.templates().map_err(from_sandbox)?;
        Ok(all
            .into_iter()
            .map(|t| Template {
                name: t.name,
                vcpus: t.vcpus,
                mem_bytes: t.mem_mib << 20,
                created: t.created,
            })
            .collect())
    }

    fn fork(&self, name: &str, count: usize, ready_timeout: Duration) -> Result<Vec<Created>> {
        let children = self
            .store
            .fork(name, count, ready_timeout)
            .map_err(from_sandbox)?;
        Ok(children.into_iter().map(|r| self.created(r)).collect())
    }

    fn exec(&self, name: &str, spec: &ExecSpec) -> Result<Box<dyn Running>> {
        let stream = self.agent(name)?;
        let request = agent_protocol::ExecRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            user: spec.user.as_deref().map(user).transpose()?,
            pty: spec
                .pty
                .then_some(agent_protocol::PtySize { rows: 24, cols: 80 }),
            ..Default::default()
        };
        let (stdin, reader) = if spec.stdin || spec.pty {
            let (tx, rx) = mpsc::channel();
            let reader: Box<dyn Read + Send> = Box::new(ChannelReader {
                rx,
                pending: Vec::new(),
            });
            (Some(tx), Some(reader))
        } else {
            (None, None)
        };
        let exec = Exec::start(stream, request, reader).map_err(BackendError::from)?;
        let control = Arc::new(AgentControl {
            exec: exec.control(),
            stdin: Mutex::new(stdin),
        });
        Ok(Box::new(AgentRunning { exec, control }))
    }

    fn upload(
        &self,
        name: &str,
        path: &str,
        data: &mut (dyn Read + Send),
        mode: u32,
    ) -> Result<u64> {
        let mut stream = self.agent(name)?;
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            agent_client::mkdir(&mut stream, &parent.to_string_lossy(), 0o755, true)
                .map_err(BackendError::from)?;
        }
        agent_client::upload(&mut stream, data, path, mode).map_err(BackendError::from)
    }

    fn download(&self, name: &str, path: &str, out: &mut dyn Write) -> Result<u64> {
        agent_client::download(&mut self.agent(name)?, path, out).map_err(BackendError::from)
    }

    fn stat(&self, name: &str, path: &str) -> Result<FileStat> {
        agent_client::stat(&mut self.agent(name)?, path)
            .map(stat_of)
            .map_err(BackendError::from)
    }

    fn list_dir(&self, name: &str, path: &str) -> Result<Vec<DirEntry>> {
        let entries = agent_client::list_dir(&mut self.agent(name)?, path).map_err(BackendError::from)?;
        Ok(entries
            .into_iter()
            .map(|e| DirEntry {
                name: e.name,
                stat: stat_of(e.stat),
            })
            .collect())
    }

    fn dial(&self, name: &str, port: u16) -> Result<UnixStream> {
        Ok(agent_client::dial(self.agent(name)?, port)?)
    }
}

/// A command's stdin fed from the server: each message is written as it comes, and the
/// sender's end (dropped, or taken by `close_stdin`) is its end of file.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    pending: Vec<u8>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pending.is_empty() {
            match self.rx.recv() {
                Ok(data) => self.pending = data,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Ok(n)
    }
}

struct AgentControl {
    exec: ExecControl,
    stdin: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
}

impl Control for AgentControl {
    fn write_stdin(&self, data: &[u8]) {
        if let Some(tx) = self.stdin.lock().unwrap().as_ref() {
            let _ = tx.send(data.to_vec());
        }
    }

    fn close_stdin(&self) {
        self.stdin.lock().unwrap().take();
    }

    fn kill(&self) {
        if let Err(e) = self.exec.signal(libc::SIGKILL, true) {
            tracing::debug!("kill: {e}");
        }
    }
}

struct AgentRunning {
    exec: Exec,
    control: Arc<AgentControl>,
}

/// One of a command's output streams, written into its sink.
struct SinkWriter<'a> {
    sink: &'a dyn OutputSink,
    stream: Stream,
}

impl Write for SinkWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sink.write(self.stream, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Running for AgentRunning {
    fn pid(&self) -> u32 {
        self.exec.pid()
    }

    fn control(&self) -> Arc<dyn Control> {
        self.control.clone()
    }

    fn wait(self: Box<Self>, sink: &dyn OutputSink) -> Result<Exit> {
        let mut out = SinkWriter {
            sink,
            stream: Stream::Stdout,
        };
        let mut err = SinkWriter {
            sink,
            stream: Stream::Stderr,
        };
        let outcome = self.exec.wait(&mut out, &mut err);
        // The stdin copy ends with the connection; its sender is no longer of use.
        self.control.close_stdin();
        match outcome.map_err(BackendError::from)? {
            Outcome::Exit(code) => Ok(Exit::Code(code)),
            Outcome::Killed(signal) => Ok(Exit::Signal(signal)),
            Outcome::TimedOut => Ok(Exit::Signal(libc::SIGKILL)),
        }
    }
}
