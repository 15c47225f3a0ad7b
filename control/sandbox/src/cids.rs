//! Guest CIDs, unique the host over.

use std::time::Duration;

use crate::error::io;
use crate::{SandboxError, Store};

impl Store {
    /// Reserves the smallest guest CID from 3 up that no other sandbox holds, for sandbox
    /// `owner`.
    pub(crate) fn reserve_cid(&self, owner: &str) -> Result<u32, SandboxError> {
        Ok(self.reserve_cids(&[owner])?[0])
    }

    /// Reserves one guest CID for each of `owners`, so that CIDs stay unique on the host (each
    /// VM has its own vsock socket, but guests see their CIDs) even when several `ember`
    /// processes start sandboxes at once. A reservation is a file `$EMBER_STATE/cids/CID`
    /// made with O_EXCL and naming its sandbox; it lapses once that sandbox's directory is
    /// gone, after a grace period for sandboxes still being made.
    pub(crate) fn reserve_cids(&self, owners: &[&str]) -> Result<Vec<u32>, SandboxError> {
        const GRACE: Duration = Duration::from_secs(60);
        let dir = self.cids_dir();
        std::fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let mut cids = Vec::with_capacity(owners.len());
        let mut cid = 3u32;
        while cids.len() < owners.len() {
            let path = dir.join(cid.to_string());
            let owner = owners[cids.len()];
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    std::io::Write::write_all(&mut f, owner.as_bytes()).map_err(io("cannot write", &path))?;
                    cids.push(cid);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let age = std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    let lapsed = !holder.is_empty() && !self.dir(&holder).exists() && age.is_some_and(|a| a > GRACE);
                    // Removed, then taken again with O_EXCL on the next turn: two processes
                    // that both find it lapsed cannot both get it.
                    if lapsed && std::fs::remove_file(&path).is_ok() {
                        continue;
                    }
                }
                Err(e) => return Err(io("cannot create", &path)(e)),
            }
            cid = cid.checked_add(1).ok_or_else(|| io("no free CID in", &dir)(std::io::ErrorKind::Other.into()))?;
        }
        Ok(cids)
    }

    /// Gives up sandbox `name`'s CID reservation.
    pub(crate) fn release_cid(&self, name: &str, cid: u32) {
        let path = self.cids_dir().join(cid.to_string());
        if std::fs::read_to_string(&path).is_ok_and(|holder| holder == name) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn cids_are_unique_among_concurrent_starts_and_lapsed_ones_come_back() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-store-").unwrap();
        let root = dir.as_path().join("sandboxes");
        let mut all: Vec<u32> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..4)
                .map(|t| {
                    let store = Store::new(root.clone(), PathBuf::from("/nonexistent/ember"));
                    s.spawn(move || {
                        let names: Vec<String> = (0..10).map(|i| format!("s{t}-{i}")).collect();
                        store.reserve_cids(&names.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        all.sort_unstable();
        all.dedup();
        assert_eq!(all, (3..43).collect::<Vec<u32>>(), "40 reservations, 40 distinct CIDs");

        let store = Store::new(root, PathBuf::from("/nonexistent/ember"));
        // CID 3's sandbox never got a directory and its reservation is old: it lapsed. CID 4's
        // sandbox exists: it keeps it.
        let cids = store.cids_dir();
        let holder_of_4 = std::fs::read_to_string(cids.join("4")).unwrap();
        std::fs::create_dir_all(store.dir(&holder_of_4)).unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        for cid in [3, 4] {
            let f = std::fs::File::options().write(true).open(cids.join(cid.to_string())).unwrap();
            f.set_modified(old).unwrap();
        }
        assert_eq!(store.reserve_cid("new").unwrap(), 3);
        assert_eq!(store.reserve_cid("newer").unwrap(), 43);
        store.release_cid("someone-else", 4);
        assert_eq!(store.reserve_cid("newest").unwrap(), 44, "only its holder releases a CID");
        store.release_cid(&holder_of_4, 4);
        assert_eq!(store.reserve_cid("last").unwrap(), 4);
    }
}
