//! Forks of a running sandbox: children that go on from the parent's exact state while the
//! parent runs on, sharing its memory and its disk until they write.
//!
//! The parent is paused for the freeze alone: its VMM writes its state file and freezes its
//! RAM in place (no copy: see `vstate::freeze`), and its overlay becomes a read-only layer
//! under `$EMBER_STATE/layers/` with a fresh overlay on top that the VMM switches to (PATCH
//! /drives/rootfs). Then the parent resumes, and each child is a new VMM that loads the state,
//! maps the frozen memory from the descriptors the parent VMM passed with its answer (this
//! process hands them on with each child's load request: a child needs no access to the
//! parent's files or `/proc`, and holds its own reference once mapped), and gets its own
//! overlay on the layer, its own vsock socket and CID.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::paths::OVERLAY;
use crate::record::{Origin, Record};
use super::snapshot::{RestoreMemory, RestoreSource, SNAPSHOT_DISK};
use crate::error::io;
use crate::jails::View;
use crate::names::random_name;
use crate::{SandboxError, Store};
use api::client::ApiClient;
use api::models::{DiskFormat, FrozenMemory, PartialDrive, SnapshotCreateParams, SnapshotType};
use disk::overlay;

/// The drive every sandbox has, configured by [`Store::start`].
const ROOT_DRIVE: &str = "rootfs";

/// The parent's state file for its children to load, in its own directory while they start.
const FORK_STATE: &str = "fork.state";

/// Removes a fork's state file and its metadata once the children have loaded it.
fn remove_state(state: &Path) {
    let _ = std::fs::remove_file(state);
    let _ = std::fs::remove_file(api::snapshot_meta::meta_path(state));
}

/// What the frozen parent leaves for its children.
struct Frozen {
    /// The frozen memory file, then its layers.
    memory: Vec<OwnedFd>,
    layer: PathBuf,
}

impl Store {
    /// Forks sandbox `parent` into `count` children named `<parent>-<n>` (the first free
    /// numbers); returns once every child's guest agent answers. If any child fails, none is
    /// kept.
    pub fn fork(&self, parent: &str, count: usize, ready_timeout: Duration) -> Result<Vec<Record>, SandboxError> {
        let record = self.ready_record(parent)?;
        let dir = self.dir(parent);
        if !record.vmm_alive(&dir) {
            return Err(SandboxError::NotRunning(parent.into()));
        }
        let egress = self.egress_policy(parent)?;
        let names = self.child_names(parent, count);
        let cids = self.reserve_cids(&names.iter().map(String::as_str).collect::<Vec<_>>())?;
        // Before the pause: the children's agents must have run at least this long.
        let agent_ms = self.agent_uptime_ms(parent)?;
        let started = Instant::now();
        let state = dir.join(FORK_STATE);
        let view = self.view(parent)?;
        let backing = self.record_policy(&record)?;
        let frozen = match self.while_paused(parent, |api| self.freeze_paused(api, &view, parent, &dir, &state, &backing)) {
            Ok(f) => f,
            Err(e) => {
                remove_state(&state);
                return Err(e);
            }
        };
        tracing::debug!("fork of {parent}: frozen and resumed after {:?}", started.elapsed());

        let source = RestoreSource {
            state: &state,
            mem_size: record.mem_mib << 20,
            vcpus: record.vcpus,
            memory: RestoreMemory::Fds(frozen.memory),
            disk: &frozen.layer,
            image: &record.image,
            disk_format: DiskFormat::Qcow2,
            backing: backing.clone(),
            agent_ms: Some(agent_ms),
            origin: Origin::Fork(parent.to_string()),
        };
        let results: Vec<Result<Record, SandboxError>> = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .zip(&cids)
                .map(|(name, &cid)| {
                    let source = &source;
                    let egress = egress.as_ref();
                    s.spawn(move || {
                        let child = self.create(Some(name.clone()), |name, child_dir| {
                            self.restore_into(name, child_dir, source, cid, ready_timeout)
                        })?;
                        // A child with egress under its parent's policy gets a proxy of its
                        // own (the parent's connections were reset in the copy with the rest
                        // of its vsock streams).
                        match egress {
                            Some(policy) => self.set_egress(&child.name, policy),
                            None => Ok(child),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(Err(SandboxError::ForkPanicked))).collect()
        });
        remove_state(&state);
        tracing::debug!("fork of {parent}: {count} children ready after {:?}", started.elapsed());
        if results.iter().any(Result::is_err) {
            for record in results.iter().flatten() {
                let _ = self.remove(&record.name);
            }
            return Err(results.into_iter().find_map(Result::err).expect("one failed"));
        }
        Ok(results.into_iter().flatten().collect())
    }

    /// With the parent paused: its state and frozen memory, then its disk frozen into a layer
    /// with a new overlay on it, which the VMM switches to.
    fn freeze_paused(
        &self,
        api: &ApiClient,
        view: &View,
        name: &str,
        dir: &Path,
        state: &Path,
        backing: &disk::BackingPolicy,
    ) -> Result<Frozen, SandboxError> {
        // The create flushes the disk first, so the layer holds everything written before.
        let (frozen, memory): (FrozenMemory, Vec<OwnedFd>) = api.put_for_with_fds(
            "/snapshot/create",
            &SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: view.out_path(state),
                mem_file_path: String::new(),
                freeze_memory: true,
            },
            &[],
        )?;
        if frozen.mem_fds != memory.len() || memory.is_empty() {
            return Err(SandboxError::FrozenFds { name: name.into(), said: frozen.mem_fds, got: memory.len() });
        }
        view.collect(&api::snapshot_meta::meta_path(state))?;
        view.collect(state)?;
        let layers = self.layers_dir();
        std::fs::create_dir_all(&layers).map_err(io("cannot create", &layers))?;
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let layer = layers.join(format!("{name}-{}.qcow2", &random_name()[3..]));
        let overlay_path = dir.join(OVERLAY);
        std::fs::rename(&overlay_path, &layer).map_err(io("cannot move the sandbox's disk to", &layer))?;
        let base = overlay::Base { path: &layer, format: disk::Format::Qcow2, policy: backing };
        let switched = overlay::create_over_in_use(base, &overlay_path).map_err(SandboxError::from).and_then(|()| {
            // The parent's jail gets the layer (the old file, read-only for every VMM from now
            // on: the VMM keeps the descriptor it has until the switch closes it) and the new
            // overlay at the old path.
            view.expose(&layer, false)?;
            view.expose(&overlay_path, true)?;
            let patch = PartialDrive {
                drive_id: ROOT_DRIVE.into(),
                path_on_host: Some(overlay_path.display().to_string()),
                format: Some(DiskFormat::Qcow2),
                rate_limiter: None,
            };
            Ok(api.patch(&format!("/drives/{ROOT_DRIVE}"), &patch)?)
        });
        if let Err(e) = switched {
            // The VMM still writes the old file (or reopened it at its old path): put it back.
            let _ = std::fs::remove_file(&overlay_path);
            let _ = std::fs::rename(&layer, &overlay_path);
            let _ = view.expose(&overlay_path, true);
            return Err(e);
        }
        Ok(Frozen { memory, layer })
    }

    /// `<parent>-<n>` for the `count` smallest n from 1 that no sandbox has.
    fn child_names(&self, parent: &str, count: usize) -> Vec<String> {
        (1..).map(|n| format!("{parent}-{n}")).filter(|n| !self.dir(n).exists()).take(count).collect()
    }

    /// Deletes the frozen layers that no sandbox's or template's disk is stacked on.
    pub fn collect_layers(&self) {
        let Ok(entries) = std::fs::read_dir(self.layers_dir()) else { return };
        let names_in = |dir: PathBuf| -> Vec<String> {
            let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
            entries.map(|e| e.file_name().to_string_lossy().into_owned()).collect()
        };
        let sandboxes = names_in(self.root.clone()).into_iter().filter(|n| self.dir(n).join(OVERLAY).exists());
        let mut chains: Vec<Result<Vec<overlay::LayerInfo>, SandboxError>> =
            sandboxes.map(|name| self.sandbox_chain(&name)).collect();
        for name in names_in(self.templates_dir()) {
            let disk = self.template_dir(&name).join(SNAPSHOT_DISK);
            if disk.exists() {
                let image = self.template(&name).map(|t| t.image);
                chains.push(image.and_then(|image| {
                    let backing = self.disk_policy(&[&disk, &image])?;
                    Ok(overlay::info(&disk, disk::Format::Qcow2, &backing)?)
                }));
            }
        }
        let mut used = Vec::new();
        for chain in chains {
            match chain {
                Ok(chain) => used.extend(chain.into_iter().filter_map(|l| l.path.canonicalize().ok())),
                // An unreadable chain might use any layer: keep them all.
                Err(_) => return,
            }
        }
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.canonicalize().is_ok_and(|p| used.contains(&p)) {
                tracing::debug!("removing unused disk layer {}", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forking_needs_a_running_sandbox() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        assert!(matches!(store.fork("nope", 1, Duration::from_secs(1)), Err(SandboxError::NotFound(_))));
        let dir = store.dir("dead");
        std::fs::create_dir_all(&dir).unwrap();
        let record = Record {
            name: "dead".into(),
            pid: i32::MAX,
            cid: 3,
            image: "/base.ext4".into(),
            mem_mib: 256,
            vcpus: 1,
            created: 0,
            vmm_socket: None,
            jail: None,
            cgroup: None,
            disk_dirs: Vec::new(),
            phase: crate::record::Phase::Ready,
            starter: None,
            lifetime: None,
            origin: None,
            egress: None,
        };
        std::fs::write(dir.join(crate::paths::RECORD), serde_json::to_vec(&record).unwrap()).unwrap();
        let err = store.fork("dead", 1, Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("dead is not running"), "{err}");
        std::fs::create_dir_all(store.dir("dead-1")).unwrap();
        assert_eq!(store.child_names("dead", 2), ["dead-2", "dead-3"]);
    }

    #[test]
    fn unused_layers_are_collected_and_used_ones_kept() {
        let tmp = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let store = Store::new(tmp.as_path().join("sandboxes"), PathBuf::from("/nonexistent/ember"));
        let layers = store.layers_dir();
        std::fs::create_dir_all(&layers).unwrap();
        let base = tmp.as_path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let (used, unused) = (layers.join("a.qcow2"), layers.join("b.qcow2"));
        crate::test_overlay(&base, &used);
        crate::test_overlay(&base, &unused);
        std::fs::create_dir_all(store.dir("child")).unwrap();
        crate::test_overlay(&used, &store.dir("child").join(OVERLAY));
        store.collect_layers();
        assert!(used.exists(), "a sandbox's disk is stacked on it");
        assert!(!unused.exists());
        assert!(base.exists(), "only layers are collected");
    }
}
