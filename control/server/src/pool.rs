//! Warm pools (`ember serve --pool SNAPSHOT=N`): N sandboxes of a template (or of the default
//! image, `default`) restored ahead and left idle, so that a create of that source takes one
//! in the time of a record update instead of a restore; the filler tops each pool up to its
//! floor again in the background, one sandbox at a time, as creates take them.
//!
//! A pool's sandboxes are nobody's yet: no box, no tenant, listed nowhere but `/metrics`. Only
//! a create that asks for nothing but the source takes one (a create that names vCPUs or
//! memory has its own machine made). The registry keeps their names, so a server restarted
//! after a crash finds them again; a graceful shutdown removes them.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, CreateSpec, Created, Source, State};

/// What `--pool` asks for: `floor` sandboxes of `source` kept ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    /// As given: `default` or a template's name.
    pub name: String,
    pub source: Source,
    pub floor: usize,
}

impl PoolSpec {
    /// `SNAPSHOT=N`: `default` (the default image) or a template's name, and N from 1 to 64.
    pub fn parse(text: &str) -> Result<PoolSpec, String> {
        let (name, floor) = text
            .split_once('=')
            .ok_or_else(|| format!("pool '{text}' is not SNAPSHOT=N (e.g. default=4)"))?;
        let floor: usize = floor
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| format!("pool '{text}': N must be a whole number from 1 to 64"))?;
        let source = match name {
            "default" => Source::Default,
            "" => return Err(format!("pool '{text}' names no snapshot")),
            name => Source::Template(name.into()),
        };
        Ok(PoolSpec { name: name.into(), source, floor })
    }
}

/// A pool member as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The pool's name (`PoolSpec::name`).
    pub pool: String,
    pub name: String,
    pub vcpus: u8,
    pub mem_bytes: u64,
}

struct Pool {
    spec: PoolSpec,
    ready: VecDeque<Created>,
}

#[derive(Default)]
pub struct Pools {
    pools: Mutex<Vec<Pool>>,
    changes: AtomicU64,
}

impl Pools {
    /// Pools for `specs`, holding `members` (a restarted server's) of those still running.
    pub fn new(specs: Vec<PoolSpec>, members: Vec<Member>, backend: &dyn Backend) -> Pools {
        let mut pools: Vec<Pool> = specs
            .into_iter()
            .map(|spec| Pool { spec, ready: VecDeque::new() })
            .collect();
        for m in members {
            let pool = pools.iter_mut().find(|p| p.spec.name == m.pool && p.ready.len() < p.spec.floor);
            match (pool, backend.state(&m.name)) {
                (Some(pool), Ok(State::Running)) => pool.ready.push_back(Created {
                    name: m.name,
                    vcpus: m.vcpus,
                    mem_bytes: m.mem_bytes,
                    disk_bytes: None,
                }),
                // No longer wanted (the pool is gone or full) or no longer usable.
                _ => {
                    let _ = backend.remove(&m.name);
                }
            }
        }
        Pools { pools: Mutex::new(pools), changes: AtomicU64::new(0) }
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// A ready sandbox for a create of `spec`, if a pool has one.
    pub fn take(&self, spec: &CreateSpec) -> Option<Created> {
        if spec.vcpus.is_some() || spec.mem_bytes.is_some() {
            return None;
        }
        let mut pools = self.pools.lock().unwrap();
        let taken = pools
            .iter_mut()
            .find(|p| p.spec.source == spec.source)
            .and_then(|p| p.ready.pop_front());
        drop(pools);
        if taken.is_some() {
            self.changed();
        }
        taken
    }

    /// The first pool below its floor, with what to create for it.
    pub fn wanting(&self, ready_timeout: std::time::Duration) -> Option<(String, CreateSpec)> {
        let pools = self.pools.lock().unwrap();
        pools.iter().find(|p| p.ready.len() < p.spec.floor).map(|p| {
            let spec = CreateSpec { source: p.spec.source.clone(), vcpus: None, mem_bytes: None, ready_timeout };
            (p.spec.name.clone(), spec)
        })
    }

    /// Adds `created` to pool `name`; gives it back if that pool is full by now.
    pub fn add(&self, name: &str, created: Created) -> Result<(), Created> {
        let mut pools = self.pools.lock().unwrap();
        match pools.iter_mut().find(|p| p.spec.name == name && p.ready.len() < p.spec.floor) {
            Some(pool) => {
                pool.ready.push_back(created);
                drop(pools);
                self.changed();
                Ok(())
            }
            None => Err(created),
        }
    }

    /// Every member, for the registry.
    pub fn members(&self) -> Vec<Member> {
        let pools = self.pools.lock().unwrap();
        pools
            .iter()
            .flat_map(|p| {
                p.ready.iter().map(|c| Member {
                    pool: p.spec.name.clone(),
                    name: c.name.clone(),
                    vcpus: c.vcpus,
                    mem_bytes: c.mem_bytes,
                })
            })
            .collect()
    }

    /// Each pool's name with how many it holds and its floor.
    pub fn sizes(&self) -> Vec<(String, usize, usize)> {
        let pools = self.pools.lock().unwrap();
        pools.iter().map(|p| (p.spec.name.clone(), p.ready.len(), p.spec.floor)).collect()
    }

    /// Empties every pool, returning what they held (to be removed).
    pub fn drain(&self) -> Vec<Created> {
        let mut pools = self.pools.lock().unwrap();
        let all = pools.iter_mut().flat_map(|p| p.ready.drain(..)).collect();
        drop(pools);
        self.changed();
        all
    }
}

/// Tops the pools up, one sandbox after the other, until each is at its floor; then returns.
/// A create that fails is logged and given up on until the next round.
pub async fn fill(state: &crate::state::Shared) {
    while let Some((name, spec)) = state.pools.wanting(state.config.ready_timeout) {
        let backend = state.backend.clone();
        let made = crate::state::blocking(move || backend.create(&spec).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match made {
            Ok(created) => {
                if let Err(extra) = state.pools.add(&name, created) {
                    let backend = state.backend.clone();
                    let _ = crate::state::blocking(move || backend.remove(&extra.name)).await;
                }
            }
            Err(e) => {
                tracing::warn!(pool = %name, "cannot fill the warm pool: {e}");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            PoolSpec::parse("default=4").unwrap(),
            PoolSpec { name: "default".into(), source: Source::Default, floor: 4 }
        );
        assert_eq!(PoolSpec::parse("py=1").unwrap().source, Source::Template("py".into()));
        for bad in ["default", "default=0", "default=65", "=2", "py=x"] {
            let err = PoolSpec::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }
}
