//! The CNI environment contract: `CNI_COMMAND`, `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME`,
//! `CNI_ARGS`, `CNI_PATH`, with the spec's validation and which variables each verb requires.

use std::path::PathBuf;

use crate::args::CniArgs;
use crate::error::CniError;

/// The verb the runtime asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// The validated environment of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<PathBuf>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub path: Vec<PathBuf>,
}

/// Longest container ID accepted. libcni sets no limit; the plugin keeps a lock file named for
/// the ID (at most 255 bytes on every Linux filesystem), and runtimes use 64 hex digits.
pub const MAX_CONTAINER_ID_LEN: usize = 128;

/// Longest network name accepted (`name`): it names the IPAM state directory and, in cluster
/// IPAM, part of each handle.
pub const MAX_NETWORK_NAME_LEN: usize = 128;

/// Longest `CNI_NETNS` path (PATH_MAX less the terminating NUL).
pub const MAX_PATH_LEN: usize = 4095;

/// An identifier as libcni validates container IDs and network names: alphanumeric first, then
/// alphanumerics, `_`, `.`, `-`; at most `max` bytes.
pub fn validate_identifier(id: &str, max: usize) -> Result<(), String> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!("{} must start with a letter or digit", preview(id)))
        }
        _ => {}
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c))) {
        return Err(format!(
            "{} contains {bad:?} (allowed: letters, digits, '_', '.', '-')",
            preview(id)
        ));
    }
    if id.len() > max {
        return Err(format!(
            "{} is {} bytes long; the limit is {max}",
            preview(id),
            id.len()
        ));
    }
    Ok(())
}

/// Container IDs: [`validate_identifier`] with [`MAX_CONTAINER_ID_LEN`].
pub fn validate_container_id(id: &str) -> Result<(), String> {
    validate_identifier(id, MAX_CONTAINER_ID_LEN)
}

/// A value quoted for an error message, cut to 64 characters so that hostile input cannot make
/// the error itself huge.
pub fn preview(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

/// Bytes the kernel's `isspace` (lib/ctype.c) counts as whitespace; `dev_valid_name` refuses
/// them. 0xa0 is there too (Latin-1 no-break space), so UTF-8 names containing that byte are
/// refused by the kernel.
fn kernel_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ' | 0xa0)
}

/// Interface names as the kernel accepts them verbatim: `dev_valid_name` (1–15 bytes, not `.` or
/// `..`, no `/`, `:` or whitespace), no `%` (the kernel would treat the name as a template such as
/// `eth%d` and pick another name), not `all` or `default` (reserved by
/// `/proc/sys/net/ipv{4,6}/conf/`), and no NUL or other control characters. One validator for
/// `CNI_IFNAME` and the bridge name.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "{} is {} bytes long; interface names have at most 15",
            preview(name),
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if name == "all" || name == "default" {
        return Err(format!(
            "{name:?} is reserved (/proc/sys/net/ipv4/conf/{name} configures every interface)"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| matches!(c, '/' | ':' | '%') || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{name:?} contains {bad:?}"));
    }
    if name.bytes().any(kernel_space) {
        return Err(format!(
            "{name:?} contains a byte the kernel reads as whitespace (0xa0)"
        ));
    }
    Ok(())
}

/// `CNI_NETNS`: an absolute path of at most [`MAX_PATH_LEN`] bytes. (Whether it names a network
/// namespace other than the plugin's own is checked when it is opened.)
pub fn validate_netns_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!("{} is not an absolute path", preview(path)));
    }
    if path.len() > MAX_PATH_LEN {
        return Err(format!(
            "the path is {} bytes long; the limit is {MAX_PATH_LEN}",
            path.len()
        ));
    }
    Ok(())
}

impl CniEnv {
    /// Reads and validates the environment through `get` (so tests need no real environment).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let non_empty = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = match non_empty("CNI_COMMAND") {
            None => return Err(CniError::invalid_env("CNI_COMMAND", "is not set")),
            Some(c) => Command::parse(&c).ok_or_else(|| {
                CniError::invalid_env(
                    "CNI_COMMAND",
                    format!(
                        "unknown command {c:?} (expected ADD, DEL, CHECK, GC, STATUS or VERSION)"
                    ),
                )
            })?,
        };
        let (need_id, need_netns, need_ifname, need_path) = match command {
            Command::Add | Command::Check => (true, true, true, true),
            Command::Del => (true, false, true, true),
            Command::Gc | Command::Status => (false, false, false, true),
            Command::Version => (false, false, false, false),
        };
        let require = |k: &str, needed: bool| -> Result<Option<String>, CniError> {
            match non_empty(k) {
                None if needed => Err(CniError::invalid_env(
                    k,
                    format!("is required for {}", command.as_str()),
                )),
                v => Ok(v),
            }
        };
        // Only the per-attachment verbs read these; VERSION, GC and STATUS ignore them (libcni
        // sends `CNI_NETNS=dummy` and the like with VERSION).
        let (container_id, netns, ifname) = if need_id {
            let container_id = require("CNI_CONTAINERID", need_id)?;
            if let Some(id) = &container_id {
                validate_container_id(id)
                    .map_err(|e| CniError::invalid_env("CNI_CONTAINERID", e))?;
            }
            let netns = require("CNI_NETNS", need_netns)?;
            if let Some(p) = &netns {
                validate_netns_path(p).map_err(|e| CniError::invalid_env("CNI_NETNS", e))?;
            }
            let ifname = require("CNI_IFNAME", need_ifname)?;
            if let Some(name) = &ifname {
                validate_ifname(name).map_err(|e| CniError::invalid_env("CNI_IFNAME", e))?;
            }
            (container_id, netns.map(PathBuf::from), ifname)
        } else {
            (None, None, None)
        };
        let path = require("CNI_PATH", need_path)?
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            })
            .unwrap_or_default();
        let args = match get("CNI_ARGS") {
            Some(raw) if command != Command::Version => CniArgs::parse(&raw)?,
            _ => CniArgs::default(),
        };
        Ok(CniEnv {
            command,
            container_id,
            netns,
            ifname,
            args,
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn add_requires_netns_and_names_it() {
        let e = env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ])
        .unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENV);
        assert!(e.msg.contains("CNI_NETNS"), "{}", e.msg);
    }

    #[test]
    fn del_without_netns_is_fine() {
        let e = env(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/a:/b"),
        ])
        .unwrap();
        assert_eq!(e.netns, None);
        assert_eq!(e.path.len(), 2);
    }

    #[test]
    fn bad_values_named() {
        let base = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_NETNS", "/x"),
            ("CNI_PATH", "/b"),
        ];
        let mut v = base.to_vec();
        v.extend([("CNI_CONTAINERID", "-bad"), ("CNI_IFNAME", "eth0")]);
        assert!(env(&v).unwrap_err().msg.contains("CNI_CONTAINERID"));
        let mut v = base.to_vec();
        v.extend([
            ("CNI_CONTAINERID", "ok"),
            ("CNI_IFNAME", "waytoolonginterfacename"),
        ]);
        assert!(env(&v).unwrap_err().msg.contains("CNI_IFNAME"));
        let mut v = base.to_vec();
        let long = "a".repeat(MAX_CONTAINER_ID_LEN + 1);
        v.extend([("CNI_CONTAINERID", long.as_str()), ("CNI_IFNAME", "eth0")]);
        let e = env(&v).unwrap_err();
        assert!(
            e.msg.contains("CNI_CONTAINERID") && e.msg.contains("limit"),
            "{}",
            e.msg
        );
        assert!(
            e.msg.len() < 300,
            "the message quotes a preview, not the value"
        );
        let mut v = base.to_vec();
        v.retain(|(k, _)| *k != "CNI_NETNS");
        v.extend([
            ("CNI_CONTAINERID", "ok"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "relative/ns"),
        ]);
        assert!(env(&v).unwrap_err().msg.contains("CNI_NETNS"));
        assert!(env(&[("CNI_COMMAND", "FROB")])
            .unwrap_err()
            .msg
            .contains("FROB"));
        assert!(env(&[]).unwrap_err().msg.contains("CNI_COMMAND"));
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        // libcni asks for VERSION with placeholder values.
        let v = env(&[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_CONTAINERID", "dummy"),
            ("CNI_IFNAME", "dummy"),
            ("CNI_PATH", "dummy"),
        ])
        .unwrap();
        assert_eq!(v.netns, None);
        assert!(env(&[("CNI_COMMAND", "STATUS")])
            .unwrap_err()
            .msg
            .contains("CNI_PATH"));
    }

    #[test]
    fn interface_names_the_kernel_would_rewrite_or_refuse() {
        for bad in [
            "",
            ".",
            "..",
            "all",
            "default",
            "eth%d",
            "e%s",
            "%",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "a\nb",
            "a\0b",
            "a\x7fb",
            "\u{a0}x",
            "a\u{2003}b",
            "sixteen-bytes-xx",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?} accepted");
        }
        // 0xa0 as a UTF-8 continuation byte: 'à' is C3 A0.
        assert!(validate_ifname("\u{e0}").is_err());
        for good in [
            "eth0",
            "net1",
            "cni0",
            "fifteen-bytes-x",
            "e.1",
            "all0",
            "défault",
        ] {
            assert_eq!(validate_ifname(good), Ok(()), "{good:?}");
        }
    }
}
