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

/// Container IDs: alphanumeric first, then alphanumerics, `_`, `.`, `-` (libcni's rule).
pub fn validate_container_id(id: &str) -> Result<(), String> {
    let mut chars = id.chars();
    match chars.next() {
        None => return Err("must not be empty".into()),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(format!("{id:?} must start with a letter or digit"))
        }
        _ => {}
    }
    if let Some(bad) = chars.find(|c| !(c.is_ascii_alphanumeric() || "_.-".contains(*c))) {
        return Err(format!("{id:?} contains {bad:?}"));
    }
    Ok(())
}

/// Interface names: 1–15 bytes, not `.`/`..`, no `/`, `:` or whitespace (the kernel's rule).
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 15 {
        return Err(format!("{name:?} is longer than 15 bytes"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace())
    {
        return Err(format!("{name:?} contains {bad:?}"));
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
        let container_id = require("CNI_CONTAINERID", need_id)?;
        if let Some(id) = &container_id {
            validate_container_id(id).map_err(|e| CniError::invalid_env("CNI_CONTAINERID", e))?;
        }
        let netns = require("CNI_NETNS", need_netns)?.map(PathBuf::from);
        let ifname = require("CNI_IFNAME", need_ifname)?;
        if let Some(name) = &ifname {
            validate_ifname(name).map_err(|e| CniError::invalid_env("CNI_IFNAME", e))?;
        }
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
        assert!(env(&[("CNI_COMMAND", "FROB")])
            .unwrap_err()
            .msg
            .contains("FROB"));
        assert!(env(&[]).unwrap_err().msg.contains("CNI_COMMAND"));
        assert!(env(&[("CNI_COMMAND", "VERSION")]).is_ok());
        assert!(env(&[("CNI_COMMAND", "STATUS")])
            .unwrap_err()
            .msg
            .contains("CNI_PATH"));
    }
}
