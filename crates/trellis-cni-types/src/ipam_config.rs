//! The `ipam` section: `trellis-ipam` with host-local style `ranges` (validated into range sets),
//! or any other IPAM plugin, which the main plugin executes from `CNI_PATH`.

use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::{Map, Value};
use trellis_ipam::{Range, RangeSet};

use crate::config::{validate_path, MAX_DATA_DIR_LEN, MAX_SOCKET_PATH_LEN};
use crate::error::CniError;
use crate::result::{Dns, Route};

/// Most ranges in `ipam.ranges`, over all its sets: real configurations have a few, and every
/// check and allocation compares ranges with each other.
pub const MAX_RANGES: usize = 1024;

/// Default parent of per-network IPAM state (`<dir>/<network>`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/trellis/ipam";

/// Trellis's own IPAM plugin type (and the name the binary answers to as IPAM plugin).
pub const TRELLIS_IPAM: &str = "trellis-ipam";

/// What the `ipam` section asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpamSection {
    /// `trellis-ipam` with `ranges`: allocation from a local, crash-safe store.
    Local(LocalIpamConfig),
    /// `trellis-ipam` without `ranges`: cluster IPAM served by the node agent.
    Agent(AgentIpamConfig),
    /// Another IPAM plugin, run from `CNI_PATH` with the same stdin.
    Delegate { plugin_type: String },
}

/// Cluster IPAM through the agent's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIpamConfig {
    pub socket: PathBuf,
    /// Pools to allocate from (names or CIDRs), like Calico's `ipv4_pools`.
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
}

/// Where the agent listens unless `agentSocket` says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/trellis/agent.sock";

/// Validated local IPAM settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIpamConfig {
    /// One address is allocated from each set (dual stack: one IPv4 set and one IPv6 set).
    pub sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    /// Directory holding this network's allocations: `dataDir/<network>`.
    pub data_dir: PathBuf,
    pub dns: Option<Dns>,
}

const IPAM_KEYS: &[&str] = &[
    "type",
    "ranges",
    "subnet",
    "rangeStart",
    "rangeEnd",
    "gateway",
    "routes",
    "dataDir",
    "dns",
    "agentSocket",
    "ipv4_pools",
    "ipv6_pools",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRange {
    subnet: IpNet,
    #[serde(default)]
    range_start: Option<std::net::IpAddr>,
    #[serde(default)]
    range_end: Option<std::net::IpAddr>,
    #[serde(default)]
    gateway: Option<std::net::IpAddr>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLocal {
    #[serde(default)]
    ranges: Option<Vec<Vec<Value>>>,
    #[serde(default)]
    subnet: Option<IpNet>,
    #[serde(default)]
    range_start: Option<std::net::IpAddr>,
    #[serde(default)]
    range_end: Option<std::net::IpAddr>,
    #[serde(default)]
    gateway: Option<std::net::IpAddr>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    data_dir: Option<PathBuf>,
    #[serde(default)]
    dns: Option<Dns>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default, rename = "ipv4_pools")]
    ipv4_pools: Vec<String>,
    #[serde(default, rename = "ipv6_pools")]
    ipv6_pools: Vec<String>,
}

/// Rejects keys outside `allowed` with the spec's "unsupported field" error, naming key and value.
pub fn check_keys(
    obj: &Map<String, Value>,
    allowed: &[&str],
    prefix: &str,
) -> Result<(), CniError> {
    for (k, v) in obj {
        if !allowed.contains(&k.as_str()) {
            return Err(CniError::unsupported_field(&format!("{prefix}{k}"), v));
        }
    }
    Ok(())
}

/// Deserialises `v` into `T`, turning errors into code 7 naming the JSON path under `prefix`.
pub fn typed<T: serde::de::DeserializeOwned>(v: &Value, prefix: &str) -> Result<T, CniError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            prefix.trim_end_matches('.').to_string()
        } else {
            format!("{prefix}{path}")
        };
        CniError::invalid_config(&field, e.inner())
    })
}

/// A range error, naming the field inside the range (`ipam.ranges[0][0].subnet`).
fn range_error(prefix: &str, e: trellis_ipam::IpamError) -> CniError {
    match &e {
        trellis_ipam::IpamError::InvalidRange { field, .. } => {
            CniError::invalid_config(&format!("{prefix}{field}"), e)
        }
        _ => CniError::invalid_config(prefix.trim_end_matches('.'), e),
    }
}

/// `ipam.routes`: a destination without host bits and a gateway of the destination's family that
/// can be a next hop — what the kernel would otherwise refuse halfway through an ADD.
fn validate_routes(routes: &[Route]) -> Result<(), CniError> {
    for (i, r) in routes.iter().enumerate() {
        let field = |k: &str| format!("ipam.routes[{i}].{k}");
        if r.dst.network() != r.dst.addr() {
            return Err(CniError::invalid_config(
                &field("dst"),
                format!(
                    "{} has host bits set; the network is {}",
                    r.dst,
                    r.dst.trunc()
                ),
            ));
        }
        if let Some(gw) = r.gw {
            if gw.is_ipv4() != r.dst.addr().is_ipv4() {
                return Err(CniError::invalid_config(
                    &field("gw"),
                    format!("{gw} is not of the same address family as dst {}", r.dst),
                ));
            }
            let broadcast = matches!(gw, std::net::IpAddr::V4(v4) if v4.is_broadcast());
            if gw.is_unspecified() || gw.is_loopback() || gw.is_multicast() || broadcast {
                return Err(CniError::invalid_config(
                    &field("gw"),
                    format!(
                        "{gw} cannot be a gateway (unspecified, loopback, multicast or broadcast)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Parses the `ipam` section for network `network`.
pub fn parse_ipam(v: Option<&Value>, network: &str) -> Result<IpamSection, CniError> {
    let Some(v) = v else {
        return Err(CniError::invalid_config("ipam", "is required"));
    };
    let Some(obj) = v.as_object() else {
        return Err(CniError::invalid_config("ipam", "must be an object"));
    };
    let plugin_type = match obj.get("type") {
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(other) => {
            return Err(CniError::invalid_config(
                "ipam.type",
                format!("must be a non-empty string, got {other}"),
            ))
        }
        None => return Err(CniError::invalid_config("ipam.type", "is required")),
    };
    if plugin_type != TRELLIS_IPAM {
        if plugin_type.contains('/') || plugin_type.starts_with('.') {
            return Err(CniError::invalid_config(
                "ipam.type",
                format!("{plugin_type:?} is not a plugin name"),
            ));
        }
        return Ok(IpamSection::Delegate { plugin_type });
    }
    check_keys(obj, IPAM_KEYS, "ipam.")?;
    let raw: RawLocal = typed(v, "ipam.")?;
    if let Some(p) = &raw.data_dir {
        validate_path("ipam.dataDir", p, MAX_DATA_DIR_LEN)?;
    }
    if let Some(p) = &raw.agent_socket {
        validate_path("ipam.agentSocket", p, MAX_SOCKET_PATH_LEN)?;
    }
    validate_routes(&raw.routes)?;
    let mut sets = Vec::new();
    let local = raw.ranges.is_some() || raw.subnet.is_some();
    if local
        && (raw.agent_socket.is_some() || !raw.ipv4_pools.is_empty() || !raw.ipv6_pools.is_empty())
    {
        return Err(CniError::invalid_config(
            "ipam.agentSocket",
            "agentSocket and ipv4_pools/ipv6_pools go with cluster IPAM (no `ranges`)",
        ));
    }
    match (&raw.ranges, raw.subnet) {
        (Some(_), Some(_)) => {
            return Err(CniError::invalid_config(
                "ipam.subnet",
                "use either `ranges` or `subnet`, not both",
            ))
        }
        (None, None) => {
            for (k, set) in [
                ("dataDir", raw.data_dir.is_some()),
                ("routes", !raw.routes.is_empty()),
                ("rangeStart", raw.range_start.is_some()),
            ] {
                if set {
                    return Err(CniError::invalid_config(
                        &format!("ipam.{k}"),
                        "applies to local ranges; without `ranges` the node agent allocates",
                    ));
                }
            }
            return Ok(IpamSection::Agent(AgentIpamConfig {
                socket: raw
                    .agent_socket
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET)),
                ipv4_pools: raw.ipv4_pools,
                ipv6_pools: raw.ipv6_pools,
            }));
        }
        (None, Some(subnet)) => {
            let range = Range::new(subnet, raw.range_start, raw.range_end, raw.gateway)
                .map_err(|e| range_error("ipam.", e))?;
            sets.push(
                RangeSet::new(vec![range])
                    .map_err(|e| CniError::invalid_config("ipam.subnet", e))?,
            );
        }
        (Some(range_sets), None) => {
            if raw.range_start.is_some() || raw.range_end.is_some() || raw.gateway.is_some() {
                return Err(CniError::invalid_config(
                    "ipam.rangeStart",
                    "top-level rangeStart/rangeEnd/gateway go with `subnet`; put them inside `ranges`",
                ));
            }
            if range_sets.is_empty() {
                return Err(CniError::invalid_config("ipam.ranges", "must not be empty"));
            }
            let total: usize = range_sets.iter().map(Vec::len).sum();
            if total > MAX_RANGES {
                return Err(CniError::invalid_config(
                    "ipam.ranges",
                    format!("holds {total} ranges; at most {MAX_RANGES} are accepted"),
                ));
            }
            for (i, set) in range_sets.iter().enumerate() {
                let mut ranges = Vec::new();
                for (j, r) in set.iter().enumerate() {
                    let prefix = format!("ipam.ranges[{i}][{j}].");
                    if let Some(o) = r.as_object() {
                        check_keys(o, &["subnet", "rangeStart", "rangeEnd", "gateway"], &prefix)?;
                    }
                    let rr: RawRange = typed(r, &prefix)?;
                    ranges.push(
                        Range::new(rr.subnet, rr.range_start, rr.range_end, rr.gateway)
                            .map_err(|e| range_error(&prefix, e))?,
                    );
                }
                let set = RangeSet::new(ranges)
                    .map_err(|e| CniError::invalid_config(&format!("ipam.ranges[{i}]"), e))?;
                sets.push(set);
            }
        }
    }
    for i in 0..sets.len() {
        for j in i + 1..sets.len() {
            if let Some((a, b)) = sets[i].overlaps(&sets[j]) {
                return Err(CniError::invalid_config(
                    "ipam.ranges",
                    format!("range sets {i} and {j} overlap ({a} and {b})"),
                ));
            }
        }
    }
    let data_dir = raw
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR))
        .join(network);
    Ok(IpamSection::Local(LocalIpamConfig {
        sets,
        routes: raw.routes,
        data_dir,
        dns: raw.dns,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes;
    use serde_json::json;

    #[test]
    fn ranges_dual_stack() {
        let v = json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]],
                       "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "/tmp/x"});
        let IpamSection::Local(c) = parse_ipam(Some(&v), "net1").unwrap() else {
            panic!()
        };
        assert_eq!(c.sets.len(), 2);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x/net1"));
    }

    #[test]
    fn errors_name_the_field() {
        let v = json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/33"}]]});
        let e = parse_ipam(Some(&v), "n").unwrap_err();
        assert_eq!(e.code, codes::INVALID_CONFIG);
        assert!(e.msg.contains("ipam.ranges[0][0].subnet"), "{}", e.msg);
        let v =
            json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24", "bogus": 1}]]});
        let e = parse_ipam(Some(&v), "n").unwrap_err();
        assert_eq!(e.code, codes::UNSUPPORTED_FIELD);
        assert!(e.msg.contains("ipam.ranges[0][0].bogus"), "{}", e.msg);
        let v = json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24"}], [{"subnet": "10.1.0.0/25"}]]});
        assert!(parse_ipam(Some(&v), "n")
            .unwrap_err()
            .msg
            .contains("overlap"));
        let v = json!({"type": "trellis-ipam", "dataDir": "/x"});
        assert!(parse_ipam(Some(&v), "n")
            .unwrap_err()
            .msg
            .contains("ipam.dataDir"));
        let v = json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24", "rangeStart": "10.2.0.1"}]]});
        assert!(parse_ipam(Some(&v), "n")
            .unwrap_err()
            .msg
            .contains("rangeStart"));
    }

    #[test]
    fn reserved_ranges_and_bad_routes_name_the_field() {
        for (subnet, set) in [
            ("127.0.0.0/8", 0),
            ("0.0.0.0/8", 0),
            ("224.0.0.0/4", 0),
            ("255.255.255.255/32", 0),
            ("::1/128", 1),
            ("ff00::/8", 1),
            ("::/128", 1),
        ] {
            let mut ranges = json!([[{"subnet": "10.1.0.0/24"}], [{"subnet": "fd00::/64"}]]);
            ranges[set] = json!([{"subnet": subnet}]);
            let v = json!({"type": "trellis-ipam", "ranges": ranges});
            let e = parse_ipam(Some(&v), "n").unwrap_err();
            assert_eq!(e.code, codes::INVALID_CONFIG, "{subnet}");
            let field = format!("`ipam.ranges[{set}][0].subnet`");
            assert!(e.msg.contains(&field), "{subnet}: {}", e.msg);
        }
        let v = json!({"type": "trellis-ipam", "subnet": "127.0.0.0/8"});
        let e = parse_ipam(Some(&v), "n").unwrap_err();
        assert!(e.msg.contains("`ipam.subnet`"), "{}", e.msg);
        let v = json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24", "rangeEnd": "10.2.0.1"}]]});
        let e = parse_ipam(Some(&v), "n").unwrap_err();
        assert!(e.msg.contains("`ipam.ranges[0][0].rangeEnd`"), "{}", e.msg);
        for (route, field) in [
            (json!({"dst": "10.9.0.1/16"}), "`ipam.routes[0].dst`"),
            (
                json!({"dst": "10.9.0.0/16", "gw": "fd00::1"}),
                "`ipam.routes[0].gw`",
            ),
            (
                json!({"dst": "10.9.0.0/16", "gw": "224.0.0.1"}),
                "`ipam.routes[0].gw`",
            ),
        ] {
            let v = json!({"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24"}]],
                "routes": [route]});
            let e = parse_ipam(Some(&v), "n").unwrap_err();
            assert!(e.msg.contains(field), "{}", e.msg);
        }
    }

    /// Every range is compared with every other (overlaps), so their number is bounded: 60 000
    /// ranges kept STATUS busy for most of a minute.
    #[test]
    fn the_number_of_ranges_is_bounded_naming_the_field() {
        let ranges = |n: usize| -> Vec<Value> {
            (0..n)
                .map(|i| json!({"subnet": format!("10.{}.{}.0/24", i / 256, i % 256)}))
                .collect()
        };
        let v = json!({"type": "trellis-ipam", "ranges": [ranges(MAX_RANGES)]});
        assert!(parse_ipam(Some(&v), "n").is_ok());
        let v = json!({"type": "trellis-ipam",
            "ranges": [ranges(MAX_RANGES), [{"subnet": "fd00::/64"}]]});
        let e = parse_ipam(Some(&v), "n").unwrap_err();
        assert_eq!(e.code, codes::INVALID_CONFIG);
        assert!(
            e.msg.contains("`ipam.ranges`") && e.msg.contains("1025 ranges"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn no_ranges_means_the_agent() {
        let v = json!({"type": "trellis-ipam"});
        let IpamSection::Agent(a) = parse_ipam(Some(&v), "n").unwrap() else {
            panic!()
        };
        assert_eq!(a.socket, PathBuf::from(DEFAULT_AGENT_SOCKET));
        let v = json!({"type": "trellis-ipam", "agentSocket": "/tmp/a.sock", "ipv4_pools": ["p1"]});
        let IpamSection::Agent(a) = parse_ipam(Some(&v), "n").unwrap() else {
            panic!()
        };
        assert_eq!(
            (a.socket, a.ipv4_pools),
            (PathBuf::from("/tmp/a.sock"), vec!["p1".to_string()])
        );
    }

    #[test]
    fn other_types_delegate_and_legacy_subnet_works() {
        let v = json!({"type": "host-local", "anything": true});
        assert_eq!(
            parse_ipam(Some(&v), "n").unwrap(),
            IpamSection::Delegate {
                plugin_type: "host-local".into()
            }
        );
        let v = json!({"type": "trellis-ipam", "subnet": "10.9.0.0/16", "rangeStart": "10.9.1.0"});
        let IpamSection::Local(c) = parse_ipam(Some(&v), "n").unwrap() else {
            panic!()
        };
        assert_eq!(c.sets[0].ranges()[0].start.to_string(), "10.9.1.0");
    }
}
