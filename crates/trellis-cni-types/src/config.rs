//! The main plugin's network configuration: decoded from stdin, checked for unknown keys (the
//! spec's code 2), typed (code 7 naming the field) and validated into [`PluginConfig`], the only
//! shape the rest of the plugin sees. The IPAM role reads just its part ([`IpamPluginConfig`]).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::args::{parse_ip_maybe_prefix, CniArgs};
use crate::env::{
    preview, validate_identifier, validate_ifname, MAX_NETWORK_NAME_LEN, MAX_PATH_LEN,
};
use crate::error::{codes, CniError};
use crate::ipam_config::{check_keys, parse_ipam, typed, IpamSection};
use crate::result::{CniResult, Dns};
use crate::version::CniVersion;

/// How pods attach to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Calico style: veth with a /32 (/128) route, proxy ARP, gateway 169.254.1.1.
    Routed,
    /// Flannel/bridge style: veth into a Linux bridge that holds the gateway address.
    Bridge(BridgeConfig),
}

/// Bridge mode settings (the reference bridge plugin's names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeConfig {
    pub name: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub hairpin_mode: bool,
    pub ip_masq: bool,
}

/// What the runtime passed through `runtimeConfig` for the capabilities Trellis supports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    pub ips: Vec<IpAddr>,
    pub mac: Option<[u8; 6]>,
    /// Pools requested for this attachment (names or CIDRs).
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
}

/// The validated configuration of the main plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub cni_version: CniVersion,
    pub name: String,
    pub mode: Mode,
    pub mtu: Option<u32>,
    pub ipam: IpamSection,
    pub dns: Option<Dns>,
    pub runtime: RuntimeConfig,
    /// `args.cni.ips` (the conventions document's static-IP request).
    pub args_ips: Vec<IpAddr>,
    pub prev_result: Option<CniResult>,
    pub log_level: Option<String>,
    pub log_file: Option<PathBuf>,
    /// GC: the attachments to keep.
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The document as received, for delegation to another IPAM plugin.
    pub raw: Value,
}

const TOP_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "capabilities",
    "runtimeConfig",
    "args",
    "prevResult",
    "ipam",
    "dns",
    "mode",
    "mtu",
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "hairpinMode",
    "ipMasq",
    "logLevel",
    "logFile",
    "agentSocket",
    VALID_ATTACHMENTS,
    OLD_ATTACHMENTS,
];
/// GC's list of attachments to keep (spec 1.1.0).
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// The same list under its name in drafts of 1.1.0, still sent by some runtimes.
pub const OLD_ATTACHMENTS: &str = "cni.dev/attachments";

/// One attachment GC must keep.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Reads GC's keep-list from either key; `None` when neither is present.
fn parse_attachments(v: &Value) -> Result<Option<Vec<Attachment>>, CniError> {
    for key in [VALID_ATTACHMENTS, OLD_ATTACHMENTS] {
        if let Some(list) = v.get(key) {
            return typed(list, &format!("{key}.")).map(Some);
        }
    }
    Ok(None)
}
const BRIDGE_ONLY: &[&str] = &[
    "bridge",
    "isGateway",
    "isDefaultGateway",
    "hairpinMode",
    "ipMasq",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    name: String,
    #[serde(rename = "type")]
    _plugin_type: String,
    #[serde(default)]
    _capabilities: Option<BTreeMap<String, bool>>,
    #[serde(default)]
    dns: Option<Dns>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    bridge: Option<String>,
    #[serde(default)]
    is_gateway: Option<bool>,
    #[serde(default)]
    is_default_gateway: Option<bool>,
    #[serde(default)]
    hairpin_mode: Option<bool>,
    #[serde(default)]
    ip_masq: Option<bool>,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    log_file: Option<PathBuf>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
}

/// Decodes stdin into a JSON object and its version (codes 6 and 1).
pub fn decode_document(stdin: &[u8]) -> Result<(Value, CniVersion), CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            codes::DECODE,
            format!("cannot decode network config from stdin: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(CniError::new(
            codes::DECODE,
            "network config on stdin must be a JSON object",
        ));
    }
    let version = match v.get("cniVersion") {
        Some(Value::String(s)) => CniVersion::parse(s)?,
        Some(other) => {
            return Err(CniError::new(
                codes::INCOMPATIBLE_VERSION,
                format!(
                    "field `cniVersion` must be a version string, got {}",
                    preview(&other.to_string())
                ),
            ))
        }
        None => {
            return Err(CniError::new(
                codes::INCOMPATIBLE_VERSION,
                "field `cniVersion` is missing (versions before 0.3.0 are not supported)",
            ))
        }
    };
    Ok((v, version))
}

/// Network names: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$` (spec, section "Configuration format"), at
/// most [`MAX_NETWORK_NAME_LEN`] bytes.
pub fn validate_network_name(name: &str) -> Result<(), CniError> {
    validate_identifier(name, MAX_NETWORK_NAME_LEN).map_err(|e| CniError::invalid_config("name", e))
}

/// Longest `ipam.dataDir`: leaves room under PATH_MAX for `/<network>/<address>`.
pub const MAX_DATA_DIR_LEN: usize = 1024;
/// Longest agent socket path: `sun_path` holds 108 bytes including the terminating NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// Longest file name component on Linux filesystems (NAME_MAX).
const NAME_MAX: usize = 255;

/// A path from the config (`logFile`, `ipam.dataDir`, `agentSocket`): absolute (never relative
/// to wherever the runtime runs), no NUL, at most `max` bytes, no component over NAME_MAX.
pub fn validate_path(field: &str, path: &Path, max: usize) -> Result<(), CniError> {
    let text = path.to_string_lossy();
    let bad = |why: String| Err(CniError::invalid_config(field, why));
    if !path.is_absolute() {
        return bad(format!("{} is not an absolute path", preview(&text)));
    }
    if text.contains('\0') {
        return bad(format!("{} contains a NUL byte", preview(&text)));
    }
    if text.len() > max {
        return bad(format!(
            "the path is {} bytes long; the limit is {max}",
            text.len()
        ));
    }
    if let Some(c) = path.components().find(|c| c.as_os_str().len() > NAME_MAX) {
        return bad(format!(
            "a component of the path is {} bytes long; the limit is {NAME_MAX}",
            c.as_os_str().len()
        ));
    }
    Ok(())
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!(
            "{s:?} is not a MAC address (six hex octets separated by ':')"
        ));
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
    }
    if mac[0] & 1 == 1 {
        return Err(format!("{s:?} is a multicast address"));
    }
    if mac == [0; 6] {
        return Err(format!("{s:?} is the zero address"));
    }
    Ok(mac)
}

fn parse_ip_list(v: &Value, field: &str) -> Result<Vec<IpAddr>, CniError> {
    let Some(items) = v.as_array() else {
        return Err(CniError::invalid_config(
            field,
            format!("must be a list of addresses, got {v}"),
        ));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            item.as_str()
                .and_then(parse_ip_maybe_prefix)
                .ok_or_else(|| {
                    CniError::invalid_config(
                        &format!("{field}[{i}]"),
                        format!("{item} is not an IP address"),
                    )
                })
        })
        .collect()
}

/// `runtimeConfig`: only the capabilities Trellis declares (`ips`, `mac`).
fn parse_runtime_config(v: Option<&Value>, strict: bool) -> Result<RuntimeConfig, CniError> {
    let mut rc = RuntimeConfig::default();
    let Some(v) = v else { return Ok(rc) };
    let Some(obj) = v.as_object() else {
        return Err(CniError::invalid_config(
            "runtimeConfig",
            "must be an object",
        ));
    };
    if strict {
        check_keys(
            obj,
            &["ips", "mac", "ipv4pools", "ipv6pools"],
            "runtimeConfig.",
        )?;
    }
    if let Some(ips) = obj.get("ips") {
        rc.ips = parse_ip_list(ips, "runtimeConfig.ips")?;
    }
    for (key, out) in [
        ("ipv4pools", &mut rc.ipv4_pools),
        ("ipv6pools", &mut rc.ipv6_pools),
    ] {
        if let Some(v) = obj.get(key) {
            *out = typed(v, &format!("runtimeConfig.{key}"))?;
        }
    }
    if let Some(mac) = obj.get("mac") {
        let s = mac
            .as_str()
            .ok_or_else(|| CniError::invalid_config("runtimeConfig.mac", "must be a string"))?;
        rc.mac = Some(parse_mac(s).map_err(|e| CniError::invalid_config("runtimeConfig.mac", e))?);
    }
    Ok(rc)
}

fn parse_args_ips(v: Option<&Value>) -> Result<Vec<IpAddr>, CniError> {
    let Some(args) = v else {
        return Ok(Vec::new());
    };
    if !args.is_object() {
        return Err(CniError::invalid_config("args", "must be an object"));
    }
    if let Some(cni) = args.get("cni") {
        if !cni.is_object() {
            return Err(CniError::invalid_config("args.cni", "must be an object"));
        }
    }
    match v.and_then(|a| a.get("cni")).and_then(|c| c.get("ips")) {
        Some(ips) => parse_ip_list(ips, "args.cni.ips"),
        None => Ok(Vec::new()),
    }
}

fn parse_prev_result(v: Option<&Value>) -> Result<Option<CniResult>, CniError> {
    v.filter(|p| !p.is_null())
        .map(|p| CniResult::from_json(p, "prevResult"))
        .transpose()
}

/// Where the requested addresses of an ADD came from, to name it in errors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum IpSource {
    /// `runtimeConfig.ips` (the `ips` capability).
    #[default]
    RuntimeConfig,
    /// `args.cni.ips` (the conventions document).
    ArgsCni,
    /// `IP=` in `CNI_ARGS`.
    CniArgs,
}

impl IpSource {
    /// The field that holds requested address number `index`.
    pub fn field(self, index: usize) -> String {
        match self {
            IpSource::RuntimeConfig => format!("runtimeConfig.ips[{index}]"),
            IpSource::ArgsCni => format!("args.cni.ips[{index}]"),
            IpSource::CniArgs => format!("CNI_ARGS IP[{index}]"),
        }
    }

    /// The error for requested address number `index`: code 4 for `CNI_ARGS`, 7 for the config.
    pub fn error(self, index: usize, why: impl fmt::Display) -> CniError {
        match self {
            IpSource::CniArgs => CniError::invalid_env("CNI_ARGS", format!("IP[{index}]: {why}")),
            _ => CniError::invalid_config(&self.field(index), why),
        }
    }
}

/// The addresses an ADD asks for, and where they came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Requested {
    pub source: IpSource,
    pub ips: Vec<IpAddr>,
}

/// Requested addresses, by precedence: `runtimeConfig.ips`, `args.cni.ips`, then `IP=` in CNI_ARGS.
pub fn requested_ips(
    runtime: &RuntimeConfig,
    args_ips: &[IpAddr],
    env_args: &CniArgs,
) -> Requested {
    let (source, ips) = if !runtime.ips.is_empty() {
        (IpSource::RuntimeConfig, runtime.ips.clone())
    } else if !args_ips.is_empty() {
        (IpSource::ArgsCni, args_ips.to_vec())
    } else {
        (IpSource::CniArgs, env_args.ips.clone())
    };
    Requested { source, ips }
}

impl PluginConfig {
    /// Parses and validates the main plugin's stdin.
    pub fn parse(stdin: &[u8]) -> Result<PluginConfig, CniError> {
        let (v, cni_version) = decode_document(stdin)?;
        let obj = v.as_object().expect("decode_document checked");
        check_keys(obj, TOP_KEYS, "")?;
        let raw: RawConf = typed(&v, "")?;
        validate_network_name(&raw.name)?;
        let mode_name = raw.mode.as_deref().unwrap_or("routed");
        let mode = match mode_name {
            "routed" => {
                if let Some(k) = BRIDGE_ONLY.iter().find(|k| obj.contains_key(**k)) {
                    return Err(CniError::new(
                        codes::UNSUPPORTED_FIELD,
                        format!(
                            "unsupported field `{k}` (value {}) in mode routed; it applies to mode bridge",
                            preview(&obj[*k].to_string())
                        ),
                    ));
                }
                Mode::Routed
            }
            "bridge" => {
                let name = raw.bridge.clone().unwrap_or_else(|| "cni0".into());
                validate_ifname(&name).map_err(|e| CniError::invalid_config("bridge", e))?;
                let is_default_gateway = raw.is_default_gateway.unwrap_or(false);
                Mode::Bridge(BridgeConfig {
                    name,
                    // isDefaultGateway implies isGateway, as in the reference bridge plugin.
                    is_gateway: raw.is_gateway.unwrap_or(false) || is_default_gateway,
                    is_default_gateway,
                    hairpin_mode: raw.hairpin_mode.unwrap_or(false),
                    ip_masq: raw.ip_masq.unwrap_or(false),
                })
            }
            other => {
                return Err(CniError::invalid_config(
                    "mode",
                    format!("{other:?} is not one of routed, bridge"),
                ))
            }
        };
        if let Some(mtu) = raw.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(CniError::invalid_config(
                    "mtu",
                    format!("{mtu} is outside 68..65535"),
                ));
            }
        }
        if let Some(level) = &raw.log_level {
            if !["error", "warn", "info", "debug", "trace"].contains(&level.as_str()) {
                return Err(CniError::invalid_config(
                    "logLevel",
                    format!("{level:?} is not one of error, warn, info, debug, trace"),
                ));
            }
        }
        if let Some(p) = &raw.log_file {
            validate_path("logFile", p, MAX_PATH_LEN)?;
        }
        if let Some(p) = &raw.agent_socket {
            validate_path("agentSocket", p, MAX_SOCKET_PATH_LEN)?;
        }
        let mut ipam = parse_ipam(obj.get("ipam"), &raw.name)?;
        if let (IpamSection::Agent(a), Some(sock)) = (&mut ipam, &raw.agent_socket) {
            a.socket = sock.clone();
        }
        if let (IpamSection::Local(l), Some(mtu)) = (&ipam, raw.mtu) {
            if mtu < 1280 && l.sets.iter().any(|s| !s.is_ipv4()) {
                return Err(CniError::invalid_config(
                    "mtu",
                    format!("{mtu} is below IPv6's minimum of 1280"),
                ));
            }
        }
        Ok(PluginConfig {
            cni_version,
            name: raw.name,
            mode,
            mtu: raw.mtu,
            ipam,
            dns: raw.dns,
            runtime: parse_runtime_config(obj.get("runtimeConfig"), true)?,
            args_ips: parse_args_ips(obj.get("args"))?,
            prev_result: parse_prev_result(obj.get("prevResult"))?,
            log_level: raw.log_level,
            log_file: raw.log_file,
            valid_attachments: parse_attachments(&v)?,
            raw: v,
        })
    }
}

/// What the IPAM role reads from its stdin: the main plugin's document, of which only
/// `cniVersion`, `name`, `ipam`, `runtimeConfig.ips`, `args` and `prevResult` concern it.
#[derive(Debug, Clone, PartialEq)]
pub struct IpamPluginConfig {
    pub cni_version: CniVersion,
    pub name: String,
    /// Local ranges or the agent (never a delegate: this is the IPAM plugin).
    pub ipam: IpamSection,
    pub runtime: RuntimeConfig,
    pub args_ips: Vec<IpAddr>,
    pub prev_result: Option<CniResult>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `logLevel` and `logFile` when they are strings (the document may be another plugin's).
    pub log_level: Option<String>,
    pub log_file: Option<PathBuf>,
}

impl IpamPluginConfig {
    pub fn parse(stdin: &[u8]) -> Result<IpamPluginConfig, CniError> {
        let (v, cni_version) = decode_document(stdin)?;
        let name = match v.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                return Err(CniError::invalid_config(
                    "name",
                    "is required and must be a string",
                ))
            }
        };
        validate_network_name(&name)?;
        let ipam = match parse_ipam(v.get("ipam"), &name)? {
            IpamSection::Delegate { plugin_type } => {
                return Err(CniError::invalid_config(
                    "ipam.type",
                    format!("{plugin_type:?}: this binary is the trellis-ipam plugin"),
                ))
            }
            local_or_agent => local_or_agent,
        };
        let log_file = v.get("logFile").and_then(Value::as_str).map(PathBuf::from);
        if let Some(p) = &log_file {
            validate_path("logFile", p, MAX_PATH_LEN)?;
        }
        Ok(IpamPluginConfig {
            log_level: v
                .get("logLevel")
                .and_then(Value::as_str)
                .map(str::to_string),
            log_file,
            cni_version,
            name,
            ipam,
            runtime: parse_runtime_config(v.get("runtimeConfig"), false)?,
            args_ips: parse_args_ips(v.get("args"))?,
            prev_result: parse_prev_result(v.get("prevResult"))?,
            valid_attachments: parse_attachments(&v)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(extra: Value) -> Vec<u8> {
        let mut base = json!({"cniVersion": "1.0.0", "name": "net1", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24"}]]}});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        serde_json::to_vec(&base).unwrap()
    }

    #[test]
    fn routed_default() {
        let c = PluginConfig::parse(&conf(json!({}))).unwrap();
        assert_eq!(c.mode, Mode::Routed);
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
    }

    #[test]
    fn bridge_defaults() {
        let c = PluginConfig::parse(&conf(json!({"mode": "bridge", "isDefaultGateway": true})))
            .unwrap();
        let Mode::Bridge(b) = c.mode else { panic!() };
        assert_eq!(b.name, "cni0");
        assert!(b.is_gateway && b.is_default_gateway);
    }

    #[test]
    fn spec_codes_for_bad_input() {
        assert_eq!(
            PluginConfig::parse(b"{nope").unwrap_err().code,
            codes::DECODE
        );
        assert_eq!(PluginConfig::parse(b"[]").unwrap_err().code, codes::DECODE);
        let e = PluginConfig::parse(&conf(json!({"cniVersion": "9.9.9"}))).unwrap_err();
        assert_eq!(e.code, codes::INCOMPATIBLE_VERSION);
        let e = PluginConfig::parse(&conf(json!({"frobnicate": 3}))).unwrap_err();
        assert_eq!(e.code, codes::UNSUPPORTED_FIELD);
        assert!(
            e.msg.contains("frobnicate") && e.msg.contains('3'),
            "{}",
            e.msg
        );
        let e = PluginConfig::parse(&conf(json!({"hairpinMode": true}))).unwrap_err();
        assert_eq!(e.code, codes::UNSUPPORTED_FIELD);
        let e = PluginConfig::parse(&conf(json!({"mtu": "big"}))).unwrap_err();
        assert_eq!(e.code, codes::INVALID_CONFIG);
        assert!(e.msg.contains("`mtu`"), "{}", e.msg);
        let e = PluginConfig::parse(&conf(json!({"mtu": 20}))).unwrap_err();
        assert!(e.msg.contains("mtu"));
        let e = PluginConfig::parse(&conf(json!({"mode": "overlay"}))).unwrap_err();
        assert!(e.msg.contains("`mode`"));
        let e = PluginConfig::parse(&conf(json!({"name": "bad name"}))).unwrap_err();
        assert!(e.msg.contains("`name`"));
        let e = PluginConfig::parse(&conf(
            json!({"runtimeConfig": {"mac": "01:00:00:00:00:01"}}),
        ))
        .unwrap_err();
        assert!(e.msg.contains("runtimeConfig.mac"));
        let e =
            PluginConfig::parse(&conf(json!({"runtimeConfig": {"portMappings": []}}))).unwrap_err();
        assert_eq!(e.code, codes::UNSUPPORTED_FIELD);
        let e = PluginConfig::parse(&conf(json!({"prevResult": {"ips": 3}}))).unwrap_err();
        assert_eq!(e.code, codes::DECODE);
    }

    #[test]
    fn names_lengths_and_paths_are_bounded_and_named() {
        let field_of = |extra: Value| PluginConfig::parse(&conf(extra)).unwrap_err();
        let e = field_of(json!({"name": "n".repeat(MAX_NETWORK_NAME_LEN + 1)}));
        assert!(
            e.msg.contains("`name`") && e.msg.contains("limit"),
            "{}",
            e.msg
        );
        assert!(
            PluginConfig::parse(&conf(json!({"name": "n".repeat(MAX_NETWORK_NAME_LEN)}))).is_ok()
        );
        for (extra, field) in [
            (json!({"logFile": "relative.log"}), "`logFile`"),
            (json!({"logFile": "/tmp/a\0b"}), "`logFile`"),
            (
                json!({"logFile": format!("/{}", "x".repeat(300))}),
                "`logFile`",
            ),
            (
                json!({"agentSocket": format!("/{}", "s".repeat(120))}),
                "`agentSocket`",
            ),
            (
                json!({"ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.1.0.0/24"}]],
                    "dataDir": "/tmp/x\0y"}}),
                "`ipam.dataDir`",
            ),
            (
                json!({"ipam": {"type": "trellis-ipam", "agentSocket": "sock"}}),
                "`ipam.agentSocket`",
            ),
        ] {
            let e = field_of(extra.clone());
            assert_eq!(e.code, codes::INVALID_CONFIG, "{extra}");
            assert!(e.msg.contains(field), "{extra}: {}", e.msg);
        }
    }

    #[test]
    fn bridge_names_the_kernel_would_rewrite_are_refused() {
        for name in [
            "fzbr%d",
            "all",
            "default",
            "br\0x",
            "a b",
            "waytoolongbridgename",
        ] {
            let e =
                PluginConfig::parse(&conf(json!({"mode": "bridge", "bridge": name}))).unwrap_err();
            assert_eq!(e.code, codes::INVALID_CONFIG, "{name:?}");
            assert!(e.msg.contains("`bridge`"), "{name:?}: {}", e.msg);
        }
    }

    #[test]
    fn args_must_be_objects() {
        let e = PluginConfig::parse(&conf(json!({"args": [1]}))).unwrap_err();
        assert!(e.msg.contains("`args`"), "{}", e.msg);
        let e = PluginConfig::parse(&conf(json!({"args": {"cni": 3}}))).unwrap_err();
        assert!(e.msg.contains("`args.cni`"), "{}", e.msg);
        let e = PluginConfig::parse(&conf(json!({"args": {"cni": {"ips": ["x"]}}}))).unwrap_err();
        assert!(e.msg.contains("`args.cni.ips[0]`"), "{}", e.msg);
    }

    #[test]
    fn gc_attachments_both_spellings() {
        let c = PluginConfig::parse(&conf(json!({"cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]})))
        .unwrap();
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "a");
        let c = PluginConfig::parse(&conf(json!({"cni.dev/attachments": []}))).unwrap();
        assert_eq!(c.valid_attachments, Some(vec![]));
        let e =
            PluginConfig::parse(&conf(json!({"cni.dev/attachments": [{"id": 1}]}))).unwrap_err();
        assert!(e.msg.contains("cni.dev/attachments"), "{}", e.msg);
    }

    #[test]
    fn requested_ip_precedence() {
        let c = PluginConfig::parse(&conf(json!({"runtimeConfig": {"ips": ["10.1.0.9/24"]},
            "args": {"cni": {"ips": ["10.1.0.8"]}}})))
        .unwrap();
        let env_args = CniArgs {
            ips: vec!["10.1.0.7".parse().unwrap()],
            ..Default::default()
        };
        let r = requested_ips(&c.runtime, &c.args_ips, &env_args);
        assert_eq!(r.ips, vec!["10.1.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.source.field(0), "runtimeConfig.ips[0]");
        let r = requested_ips(&RuntimeConfig::default(), &[], &env_args);
        assert_eq!(r.ips, env_args.ips);
        assert_eq!(r.source.error(0, "x").code, codes::INVALID_ENV);
    }

    #[test]
    fn ipam_role_ignores_main_plugin_fields() {
        let doc = json!({"cniVersion": "0.4.0", "name": "n", "type": "bridge", "isGateway": true, "vlan": 3,
            "runtimeConfig": {"portMappings": []},
            "ipam": {"type": "trellis-ipam", "subnet": "10.2.0.0/24"}});
        let c = IpamPluginConfig::parse(&serde_json::to_vec(&doc).unwrap()).unwrap();
        let IpamSection::Local(l) = c.ipam else {
            panic!()
        };
        assert_eq!(l.sets.len(), 1);
    }
}
