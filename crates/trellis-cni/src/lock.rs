//! Cross-process locks on files (`flock`): the kernel drops them when the holder dies, so a
//! `kill -9` never leaves a lock behind. Used to serialise calls for one container, to guard the
//! IPAM store and the nftables table, and to keep a bridge from being removed while an ADD is
//! attaching to it.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::{PluginError, Result};
use crate::safe_open::open_regular;

/// Where per-container locks live.
pub const LOCK_DIR: &str = "/run/trellis/cni/locks";

/// An exclusive lock on a file, released on drop.
pub struct FileLock {
    _flock: Flock<File>,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the lock at `path` is held exclusively. Retries when the file was replaced or
    /// removed while waiting, so that removing a lock file (see [`FileLock::release_and_remove`])
    /// is safe. A lock file that is not a regular file (a planted symbolic link, a FIFO) is an
    /// error, never opened through.
    pub fn acquire(path: &Path) -> Result<FileLock> {
        Self::acquire_as(path, FlockArg::LockExclusive)
    }

    /// Like [`FileLock::acquire`], but shared: any number of shared holders, no exclusive one.
    pub fn acquire_shared(path: &Path) -> Result<FileLock> {
        Self::acquire_as(path, FlockArg::LockShared)
    }

    fn acquire_as(path: &Path, how: FlockArg) -> Result<FileLock> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(|e| PluginError::store(dir, e))?;
        }
        loop {
            let file = open_regular(
                path,
                OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true),
            )
            .map_err(|e| PluginError::store(path, e))?;
            let flock =
                Flock::lock(file, how).map_err(|(_, e)| PluginError::store(path, e.into()))?;
            let held = flock.metadata().map_err(|e| PluginError::store(path, e))?;
            match fs::metadata(path) {
                Ok(now) if now.ino() == held.ino() && now.dev() == held.dev() => {
                    return Ok(FileLock {
                        _flock: flock,
                        path: path.to_path_buf(),
                    })
                }
                _ => continue,
            }
        }
    }

    /// Removes the lock file, then releases the lock. Waiters notice and retry on a new file.
    pub fn release_and_remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The lock file that serialises every call for one container.
pub fn container_lock_path(container_id: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{container_id}.lock"))
}

/// The lock that serialises every call for one container.
pub fn container_lock(container_id: &str) -> Result<FileLock> {
    FileLock::acquire(&container_lock_path(container_id))
}

/// The lock file of bridge `name`: ADDs hold it shared from finding the bridge until their veth
/// is attached; removing the bridge takes it exclusively. (`@` never occurs in container IDs,
/// so this cannot collide with a container's lock.)
pub fn bridge_lock_path(name: &str) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("bridge@{name}.lock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn second_holder_waits_until_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = FileLock::acquire(&path).unwrap();
        let got = Arc::new(AtomicBool::new(false));
        let got2 = got.clone();
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            let l = FileLock::acquire(&p2).unwrap();
            got2.store(true, Ordering::SeqCst);
            drop(l);
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!got.load(Ordering::SeqCst), "lock was not exclusive");
        first.release_and_remove();
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
