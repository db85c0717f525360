//! The local IPAM store: one directory per network, one entry per allocated address — a
//! symbolic link named for the address whose target is its owner (`containerID/ifname`) — and
//! `last_reserved_ip.N` per range set, all under an exclusive `flock` on `lock`.
//!
//! Crash safety: `symlink(2)` creates the entry and its content in one step and fails if the
//! name exists, so a record is either absent or complete and an address is never recorded
//! twice, whenever the process is killed. (Reading a link is one system call, which keeps an
//! ADD cheap on a node with many pods.) `last_reserved_ip.N` only steers where the round-robin
//! search starts; a torn write there is harmless. Regular files holding `containerID\nifname`
//! are read too.
//!
//! The directory comes from input (`ipam.dataDir`), so nothing in it is trusted: files are
//! opened without following a symbolic link or blocking on a FIFO
//! ([`crate::safe_open::open_regular`]), and records are read at most 4 KiB at a time.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read};
use std::net::IpAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use trellis_cni_types::{codes, CniError};
use trellis_ipam::Owner;

use crate::error::{PluginError, Result};
use crate::lock::FileLock;
use crate::safe_open::open_regular;

const LOCK_FILE: &str = "lock";
const LAST_PREFIX: &str = "last_reserved_ip.";

/// A locked view of one network's allocations. Dropping it releases the lock.
pub struct LocalStore {
    dir: PathBuf,
    _lock: FileLock,
}

fn owner_text(o: &Owner) -> String {
    format!("{}/{}", o.container_id, o.ifname)
}

fn parse_owner(text: &str) -> Owner {
    // Container IDs and interface names never contain '/', nor IDs a newline.
    let mut lines = text.split(['/', '\n']);
    let container_id = lines.next().unwrap_or("").trim().to_string();
    let ifname = lines.next().unwrap_or("").trim().to_string();
    Owner {
        container_id,
        ifname,
    }
}

/// A store error naming the field whose directory it is.
fn store_error(path: &Path, e: std::io::Error) -> PluginError {
    CniError::new(
        codes::IO_FAILURE,
        format!("IPAM state {} (field `ipam.dataDir`): {e}", path.display()),
    )
    .into()
}

/// The most read of a record or hint file (an owner is under 300 bytes).
const MAX_RECORD: u64 = 4096;

/// Reads a small regular file of the store without following a link or blocking on a FIFO.
fn read_small(path: &Path) -> std::io::Result<String> {
    let mut text = String::new();
    open_regular(path, OpenOptions::new().read(true))?
        .take(MAX_RECORD)
        .read_to_string(&mut text)?;
    Ok(text)
}

impl LocalStore {
    /// Opens (creating if needed) and locks the store at `dir`.
    pub fn open(dir: &Path) -> Result<LocalStore> {
        let unusable = |e: PluginError| -> PluginError {
            CniError::new(
                codes::IO_FAILURE,
                format!("cannot use the IPAM state directory (field `ipam.dataDir`): {e}"),
            )
            .into()
        };
        fs::create_dir_all(dir).map_err(|e| unusable(PluginError::store(dir, e)))?;
        let lock = FileLock::acquire(&dir.join(LOCK_FILE)).map_err(unusable)?;
        Ok(LocalStore {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Every allocated address and its owner.
    pub fn used(&self) -> Result<HashMap<IpAddr, Owner>> {
        let mut out = HashMap::new();
        let entries = fs::read_dir(&self.dir).map_err(|e| PluginError::store(&self.dir, e))?;
        for e in entries {
            let e = e.map_err(|e| PluginError::store(&self.dir, e))?;
            let name = e.file_name();
            let Ok(ip) = name.to_string_lossy().parse::<IpAddr>() else {
                continue;
            };
            let content = match fs::read_link(e.path()) {
                Ok(target) => Ok(target.to_string_lossy().into_owned()),
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => read_small(&e.path()),
                Err(err) => Err(err),
            };
            match content {
                Ok(text) => {
                    out.insert(ip, parse_owner(&text));
                }
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => return Err(store_error(&e.path(), err)),
            }
        }
        Ok(out)
    }

    /// The last address handed out from range set `set` (only a hint: anything unreadable is
    /// no hint).
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        read_small(&self.dir.join(format!("{LAST_PREFIX}{set}")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Records `ip` as owned by `owner`. Fails if the address is already recorded.
    pub fn record(&self, ip: IpAddr, owner: &Owner) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        std::os::unix::fs::symlink(owner_text(owner), &path)
            .map_err(|e| PluginError::store(&path, e))
    }

    /// Records the round-robin hint. The file is overwritten in place and then cut to the new
    /// length, never emptied first: on ext4 truncating a file to zero frees its data block,
    /// which on a filesystem mounted with `discard` waits for the device (a few hundred
    /// microseconds to milliseconds per ADD); a cut inside the block frees nothing.
    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(format!("{LAST_PREFIX}{set}"));
        let text = ip.to_string();
        open_regular(
            &path,
            OpenOptions::new().write(true).create(true).truncate(false),
        )
        .and_then(|f| {
            f.write_all_at(text.as_bytes(), 0)?;
            if f.metadata()?.len() > text.len() as u64 {
                f.set_len(text.len() as u64)?;
            }
            Ok(())
        })
        .map_err(|e| store_error(&path, e))
    }

    /// Releases every address whose owner fails `keep`; returns what was released.
    pub fn release_unless(&self, keep: impl Fn(&Owner) -> bool) -> Result<Vec<(IpAddr, Owner)>> {
        let mut released = Vec::new();
        for (ip, owner) in self.used()? {
            if keep(&owner) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match fs::remove_file(&path) {
                Ok(()) => released.push((ip, owner)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(PluginError::store(path, e)),
            }
        }
        Ok(released)
    }

    /// Releases the addresses of one owner (idempotent).
    pub fn release_owner(&self, owner: &Owner) -> Result<Vec<IpAddr>> {
        Ok(self
            .release_unless(|o| o != owner)?
            .into_iter()
            .map(|(ip, _)| ip)
            .collect())
    }

    /// Whether the store's directory accepts writes (for STATUS).
    pub fn writable(&self) -> Result<()> {
        let probe = self.dir.join(".probe");
        // A leftover (or planted) entry is removed, never written through.
        match fs::remove_file(&probe) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(store_error(&probe, e)),
            _ => {}
        }
        open_regular(&probe, OpenOptions::new().write(true).create_new(true))
            .map_err(|e| store_error(&probe, e))?;
        let _ = fs::remove_file(&probe);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(c: &str) -> Owner {
        Owner {
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn record_is_exclusive_and_release_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "fd00::2".parse().unwrap();
        s.record(a, &owner("x")).unwrap();
        s.record(b, &owner("y")).unwrap();
        assert!(s.record(a, &owner("z")).is_err());
        assert_eq!(s.used().unwrap().get(&a), Some(&owner("x")));
        assert_eq!(s.release_owner(&owner("x")).unwrap(), vec![a]);
        assert!(s.release_owner(&owner("x")).unwrap().is_empty());
        assert_eq!(s.used().unwrap().len(), 1);
        s.set_last_reserved(0, a).unwrap();
        assert_eq!(s.last_reserved(0), Some(a));
        assert_eq!(s.last_reserved(1), None);
    }

    /// The hint is rewritten in place: a shorter address leaves nothing of a longer one behind
    /// (10.0.0.9 over 10.0.0.10 must not read back as 10.0.0.90), and the file holds exactly
    /// the address, as host-local writes it.
    #[test]
    fn last_reserved_is_replaced_whole_by_a_shorter_address() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        for text in ["fd00::1234:5678", "10.0.0.10", "10.0.0.9", "10.0.0.200"] {
            let ip: IpAddr = text.parse().unwrap();
            s.set_last_reserved(0, ip).unwrap();
            assert_eq!(s.last_reserved(0), Some(ip));
            let on_disk = fs::read_to_string(dir.path().join(format!("{LAST_PREFIX}0"))).unwrap();
            assert_eq!(on_disk, text);
        }
    }

    #[test]
    fn plain_file_records_are_understood() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("10.0.0.9"), "abc\neth1\n").unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            s.used().unwrap()[&ip],
            Owner {
                container_id: "abc".into(),
                ifname: "eth1".into()
            }
        );
        assert!(s.record(ip, &owner("x")).is_err());
    }
}
