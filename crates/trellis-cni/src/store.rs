//! The local IPAM store: one directory per network, one file per allocated address holding its
//! owner (`containerID\nifname\n`), and `last_reserved_ip.N` per range set, all under an
//! exclusive `flock` on `lock`.
//!
//! Crash safety: an allocation file is written under a temporary name and then `link`ed to the
//! address's name, which fails if it exists: a file is either absent or complete, so a process
//! killed at any point never leaves an address both free and handed out. Leftover temporaries
//! are removed by the next holder of the lock.

use std::collections::HashMap;
use std::fs;
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use trellis_ipam::Owner;

use crate::error::{PluginError, Result};
use crate::lock::FileLock;

const LOCK_FILE: &str = "lock";
const LAST_PREFIX: &str = "last_reserved_ip.";
const TMP_PREFIX: &str = ".tmp-";

/// A locked view of one network's allocations. Dropping it releases the lock.
pub struct LocalStore {
    dir: PathBuf,
    _lock: FileLock,
}

fn owner_text(o: &Owner) -> String {
    format!("{}\n{}\n", o.container_id, o.ifname)
}

fn parse_owner(text: &str) -> Owner {
    let mut lines = text.lines();
    let container_id = lines.next().unwrap_or("").trim().to_string();
    let ifname = lines.next().unwrap_or("").trim().to_string();
    Owner {
        container_id,
        ifname,
    }
}

impl LocalStore {
    /// Opens (creating if needed) and locks the store at `dir`.
    pub fn open(dir: &Path) -> Result<LocalStore> {
        fs::create_dir_all(dir).map_err(|e| PluginError::store(dir, e))?;
        let lock = FileLock::acquire(&dir.join(LOCK_FILE))?;
        let store = LocalStore {
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        store.sweep_temporaries();
        Ok(store)
    }

    fn sweep_temporaries(&self) {
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
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
            match fs::read_to_string(e.path()) {
                Ok(text) => {
                    out.insert(ip, parse_owner(&text));
                }
                Err(err) if err.kind() == ErrorKind::NotFound => {}
                Err(err) => return Err(PluginError::store(e.path(), err)),
            }
        }
        Ok(out)
    }

    /// The last address handed out from range set `set`.
    pub fn last_reserved(&self, set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_PREFIX}{set}")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn write_atomic(&self, name: &str, content: &str, exclusive: bool) -> Result<()> {
        let tmp = self
            .dir
            .join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
        let path = self.dir.join(name);
        let mut f = fs::File::create(&tmp).map_err(|e| PluginError::store(&tmp, e))?;
        f.write_all(content.as_bytes())
            .map_err(|e| PluginError::store(&tmp, e))?;
        drop(f);
        let res = if exclusive {
            fs::hard_link(&tmp, &path)
        } else {
            fs::rename(&tmp, &path)
        };
        let _ = fs::remove_file(&tmp);
        res.map_err(|e| PluginError::store(&path, e))
    }

    /// Records `ip` as owned by `owner`. Fails if the address is already recorded.
    pub fn record(&self, ip: IpAddr, owner: &Owner) -> Result<()> {
        self.write_atomic(&ip.to_string(), &owner_text(owner), true)
    }

    pub fn set_last_reserved(&self, set: usize, ip: IpAddr) -> Result<()> {
        self.write_atomic(&format!("{LAST_PREFIX}{set}"), &ip.to_string(), false)
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
        self.write_atomic(".probe", "", false)?;
        let _ = fs::remove_file(self.dir.join(".probe"));
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

    #[test]
    fn leftover_temporaries_are_swept_and_ignored() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".tmp-10.0.0.9-1234"), "half").unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        assert!(s.used().unwrap().is_empty());
        assert!(!dir.path().join(".tmp-10.0.0.9-1234").exists());
    }
}
