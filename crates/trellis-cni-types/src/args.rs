//! `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`. Known keys are typed; unknown keys are an
//! error unless `IgnoreUnknown` is set, as libcni's `LoadArgs` does.

use std::net::IpAddr;

use crate::env::preview;
use crate::error::CniError;

/// Parsed `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ignore_unknown: bool,
    pub k8s_pod_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_pod_infra_container_id: Option<String>,
    pub k8s_pod_uid: Option<String>,
    /// `IP=` requested addresses (comma-separated; a prefix length is allowed and ignored).
    pub ips: Vec<IpAddr>,
    /// `IPV4POOLS=` / `IPV6POOLS=`: pools to allocate from (comma-separated names or CIDRs).
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
    /// Unknown pairs kept when `IgnoreUnknown` allowed them.
    pub other: Vec<(String, String)>,
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "t" => Some(true),
        "0" | "false" | "f" | "" => Some(false),
        _ => None,
    }
}

/// Parses an address with an optional `/prefix` (the prefix must be valid for the family but is
/// otherwise the range's business).
pub fn parse_ip_maybe_prefix(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if s.contains('/') {
        s.parse::<ipnet::IpNet>().ok().map(|n| n.addr())
    } else {
        s.parse().ok()
    }
}

impl CniArgs {
    pub fn parse(raw: &str) -> Result<CniArgs, CniError> {
        let mut args = CniArgs::default();
        let mut unknown = Vec::new();
        for pair in raw.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::invalid_env(
                    "CNI_ARGS",
                    format!("{} is not KEY=VALUE", preview(pair)),
                ));
            };
            match k {
                "IgnoreUnknown" => {
                    args.ignore_unknown = parse_bool(v).ok_or_else(|| {
                        CniError::invalid_env(
                            "CNI_ARGS",
                            format!("IgnoreUnknown={} is not a boolean", preview(v)),
                        )
                    })?
                }
                "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = Some(v.to_string()),
                "K8S_POD_NAME" => args.k8s_pod_name = Some(v.to_string()),
                "K8S_POD_INFRA_CONTAINER_ID" => {
                    args.k8s_pod_infra_container_id = Some(v.to_string())
                }
                "K8S_POD_UID" => args.k8s_pod_uid = Some(v.to_string()),
                "IPV4POOLS" => {
                    args.ipv4_pools = v
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "IPV6POOLS" => {
                    args.ipv6_pools = v
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "IP" => {
                    for part in v.split(',').filter(|p| !p.trim().is_empty()) {
                        let ip = parse_ip_maybe_prefix(part).ok_or_else(|| {
                            CniError::invalid_env(
                                "CNI_ARGS",
                                format!("IP={} is not an IP address", preview(part)),
                            )
                        })?;
                        args.ips.push(ip);
                    }
                }
                _ => unknown.push((k.to_string(), v.to_string())),
            }
        }
        if !unknown.is_empty() && !args.ignore_unknown {
            let keys: Vec<&str> = unknown.iter().map(|(k, _)| k.as_str()).collect();
            return Err(CniError::invalid_env(
                "CNI_ARGS",
                format!(
                    "unknown key(s) {} (set IgnoreUnknown=1 to allow)",
                    preview(&keys.join(", "))
                ),
            ));
        }
        args.other = unknown;
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes;

    #[test]
    fn parses_kubernetes_args() {
        let a = CniArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;FOO=bar;IP=10.0.0.5/24,fd00::5",
        )
        .unwrap();
        assert!(a.ignore_unknown);
        assert_eq!(a.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.ips.len(), 2);
        assert_eq!(a.other, vec![("FOO".into(), "bar".into())]);
    }

    #[test]
    fn unknown_without_ignore_is_env_error() {
        let e = CniArgs::parse("FOO=bar").unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENV);
        assert!(e.msg.contains("CNI_ARGS") && e.msg.contains("FOO"));
        let e = CniArgs::parse("IP=notanip").unwrap_err();
        assert!(e.msg.contains("notanip"));
        assert!(CniArgs::parse("IP=10.0.0.1/99").is_err());
        assert!(CniArgs::parse("IP=10.0.0.1/x").is_err());
        assert!(CniArgs::parse("novalue").is_err());
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
    }
}
