//! `/proc/sys` access. The kernel resolves `/proc/sys/net/...` against the network namespace of
//! the thread that opens the file, so call these inside [`crate::Netns::run`] for another
//! namespace.

use std::fs;

use crate::{DataplaneError, Result};

fn full(path: &str) -> String {
    format!("/proc/sys/{path}")
}

/// Writes `value` to `/proc/sys/<path>` (e.g. `net/ipv4/conf/eth0/proxy_arp`).
pub fn write(path: &str, value: &str) -> Result<()> {
    let p = full(path);
    fs::write(&p, value).map_err(|source| DataplaneError::Sysctl { path: p, source })
}

/// Reads `/proc/sys/<path>`, trimmed.
pub fn read(path: &str) -> Result<String> {
    let p = full(path);
    fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|source| DataplaneError::Sysctl { path: p, source })
}

/// Writes only when the value differs (avoids needless writes, which some sysctls log).
pub fn ensure(path: &str, value: &str) -> Result<()> {
    match read(path) {
        Ok(cur) if cur == value => Ok(()),
        _ => write(path, value),
    }
}
