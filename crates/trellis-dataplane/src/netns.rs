//! Network namespaces: opened by path (`/var/run/netns/NAME` or `/proc/PID/ns/net`) and entered
//! per thread. [`Netns::run`] enters on a fresh thread made for it, so the caller's namespace
//! never changes; [`Netns::enter_with`] enters on the calling thread for a short synchronous
//! step and puts the thread back before it returns (or unwinds), which saves the thread where
//! that matters (a CNI plugin is exec'd per pod). Network namespaces are per thread, so other
//! threads of the process are never affected.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

use crate::{DataplaneError, Result};

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens the namespace at `path`; ENOENT when it is gone.
    pub fn open(path: &Path) -> Result<Netns> {
        let file = File::open(path).map_err(|source| DataplaneError::Netns {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Netns {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Wraps a namespace file the caller opened and checked itself (e.g. without blocking, for a
    /// path taken from input); `path` is what the handle is reported as.
    pub fn from_file(file: File, path: PathBuf) -> Netns {
        Netns { file, path }
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Netns> {
        let path = PathBuf::from("/proc/thread-self/ns/net");
        Netns::open(&path)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Whether this handle and `other` name the same namespace (same inode).
    pub fn same_as(&self, other: &Netns) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (self.file.metadata(), other.file.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Runs `f` on the calling thread while it is inside this namespace, then puts the thread
    /// back into the namespace it was in — also when `f` panics. Two `setns` calls instead of a
    /// thread: for short synchronous work (opening a socket, writing a sysctl), never across an
    /// `.await`. If the thread cannot be put back the process aborts, since going on in the
    /// wrong namespace would change what is not ours (it cannot fail in practice: the thread
    /// holds a handle on its namespace and had the privilege to leave it).
    pub fn enter_with<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        const HOME: &str = "/proc/thread-self/ns/net";
        let home = File::open(HOME).map_err(|source| DataplaneError::Netns {
            path: PathBuf::from(HOME),
            source,
        })?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| DataplaneError::Netns {
            path: self.path.clone(),
            source: std::io::Error::from(e),
        })?;
        struct Back(File);
        impl Drop for Back {
            fn drop(&mut self) {
                if setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET).is_err() {
                    std::process::abort();
                }
            }
        }
        let _back = Back(home);
        Ok(f())
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    DataplaneError::Netns {
                        path: self.path.clone(),
                        source: std::io::Error::from(e),
                    }
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}
