//! CNI results: one internal shape (1.1.0's) rendered in the version the runtime asked for, and
//! parsed back from any supported version (for `prevResult`).

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{codes, CniError};
use crate::version::CniVersion;

/// An interface the plugin created or configured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the container; `None` on the host.
    pub sandbox: Option<String>,
}

/// An address assigned to an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: IpNet,
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// A route inside the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

/// DNS settings passed through from configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

/// A plugin's result.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl CniResult {
    /// Renders the result as the given spec version prescribes.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let v11 = version >= CniVersion::V1_1_0;
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version.as_str()));
        if !self.interfaces.is_empty() {
            let ifs: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut m = Map::new();
                    m.insert("name".into(), json!(i.name));
                    if let Some(mac) = &i.mac {
                        m.insert("mac".into(), json!(mac));
                    }
                    if let (true, Some(mtu)) = (v11, i.mtu) {
                        m.insert("mtu".into(), json!(mtu));
                    }
                    if let Some(sb) = &i.sandbox {
                        m.insert("sandbox".into(), json!(sb));
                    }
                    Value::Object(m)
                })
                .collect();
            out.insert("interfaces".into(), Value::Array(ifs));
        }
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = Map::new();
                if version.ips_have_version() {
                    let fam = if ip.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    m.insert("version".into(), json!(fam));
                }
                m.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    m.insert("gateway".into(), json!(gw.to_string()));
                }
                if let Some(i) = ip.interface {
                    m.insert("interface".into(), json!(i));
                }
                Value::Object(m)
            })
            .collect();
        if !ips.is_empty() {
            out.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            let routes: Vec<Value> = self
                .routes
                .iter()
                .map(|r| {
                    let r = if v11 {
                        r.clone()
                    } else {
                        Route::new(r.dst, r.gw)
                    };
                    serde_json::to_value(r).expect("route serialises")
                })
                .collect();
            out.insert("routes".into(), Value::Array(routes));
        }
        out.insert(
            "dns".into(),
            serde_json::to_value(&self.dns).expect("dns serialises"),
        );
        Value::Object(out)
    }

    /// Parses a result of any supported version (e.g. `prevResult`, or a delegated IPAM plugin's
    /// output). `field` names where it came from for error messages.
    pub fn from_json(v: &Value, field: &str) -> Result<CniResult, CniError> {
        #[derive(Deserialize)]
        struct RawIf {
            name: String,
            #[serde(default)]
            mac: Option<String>,
            #[serde(default)]
            mtu: Option<u32>,
            #[serde(default)]
            sandbox: Option<String>,
        }
        #[derive(Deserialize)]
        struct RawIp {
            address: IpNet,
            #[serde(default)]
            gateway: Option<IpAddr>,
            #[serde(default)]
            interface: Option<usize>,
        }
        #[derive(Deserialize)]
        struct Raw {
            #[serde(default)]
            interfaces: Vec<RawIf>,
            #[serde(default)]
            ips: Vec<RawIp>,
            #[serde(default)]
            routes: Vec<Route>,
            #[serde(default)]
            dns: Option<Value>,
        }
        let raw: Raw = serde_path_to_error::deserialize(v).map_err(|e| {
            CniError::new(
                codes::DECODE,
                format!("cannot decode {field} at `{}`: {}", e.path(), e.inner()),
            )
        })?;
        let dns = match raw.dns {
            Some(d) => serde_json::from_value::<Dns>(d).unwrap_or_default(),
            None => Dns::default(),
        };
        let result = CniResult {
            interfaces: raw
                .interfaces
                .into_iter()
                .map(|i| Interface {
                    name: i.name,
                    mac: i.mac,
                    mtu: i.mtu,
                    sandbox: i.sandbox,
                })
                .collect(),
            ips: raw
                .ips
                .into_iter()
                .map(|i| IpConfig {
                    address: i.address,
                    gateway: i.gateway,
                    interface: i.interface,
                })
                .collect(),
            routes: raw.routes,
            dns,
        };
        for (n, ip) in result.ips.iter().enumerate() {
            if let Some(i) = ip.interface {
                if i >= result.interfaces.len() {
                    return Err(CniError::new(
                        codes::DECODE,
                        format!("{field}.ips[{n}].interface = {i} points past the interface list"),
                    ));
                }
            }
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "trl0123456789ab".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    mtu: Some(1500),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    mtu: Some(1500),
                    sandbox: Some("/var/run/netns/x".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.0.0.2/32".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::2/128".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                mtu: Some(1400),
                ..Route::new(
                    "0.0.0.0/0".parse().unwrap(),
                    Some("169.254.1.1".parse().unwrap()),
                )
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn old_versions_carry_ip_version_and_drop_new_fields() {
        let v = sample().to_json(CniVersion::V0_3_1);
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        assert!(v["routes"][0].get("mtu").is_none());
        assert!(v["interfaces"][0].get("mtu").is_none());
        let v = sample().to_json(CniVersion::V1_0_0);
        assert!(v["ips"][0].get("version").is_none());
        let v = sample().to_json(CniVersion::V1_1_0);
        assert_eq!(v["routes"][0]["mtu"], 1400);
        assert_eq!(v["interfaces"][1]["mtu"], 1500);
    }

    #[test]
    fn round_trip_every_version() {
        for ver in CniVersion::ALL {
            let v = sample().to_json(ver);
            let back = CniResult::from_json(&v, "prevResult").unwrap();
            let again = back.to_json(ver);
            assert_eq!(v, again, "{ver}");
        }
    }

    #[test]
    fn bad_prev_result_names_path() {
        let v = json!({"ips": [{"address": "nope"}]});
        let e = CniResult::from_json(&v, "prevResult").unwrap_err();
        assert_eq!(e.code, codes::DECODE);
        assert!(e.msg.contains("ips[0].address"), "{}", e.msg);
        let v = json!({"ips": [{"address": "10.0.0.1/24", "interface": 3}]});
        assert!(CniResult::from_json(&v, "prevResult").is_err());
    }
}
