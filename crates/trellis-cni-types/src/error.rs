//! The spec's error result (`{"cniVersion","code","msg","details"}`) and its well-known codes.

use serde::Serialize;

/// Error codes: 1–99 are the spec's, 100+ are Trellis's own.
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in network configuration (message names key and value).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const CONTAINER_UNKNOWN: u32 = 3;
    /// Invalid necessary environment variables (message names the variable).
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure (e.g. the IPAM data directory).
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later (a resource is transiently unavailable, e.g. the agent is down).
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot service ADD requests.
    pub const STATUS_UNAVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity.
    pub const STATUS_LIMITED: u32 = 51;
    /// Trellis: no address available (range exhausted, requested address in use).
    pub const ADDRESS_UNAVAILABLE: u32 = 100;
    /// Trellis: a kernel operation (netlink, sysctl, nftables) failed.
    pub const KERNEL: u32 = 101;
    /// Trellis: a delegated plugin failed without a usable error of its own.
    pub const DELEGATE: u32 = 102;
    /// Trellis: CHECK found the kernel state differs from prevResult.
    pub const CHECK_MISMATCH: u32 = 103;
}

/// An error as the spec returns it on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

/// Longest `msg` or `details`: messages quote offending values, and hostile input can be
/// megabytes long; the runtime logs every error.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// `text` cut to [`MAX_MESSAGE_LEN`] bytes (at a character boundary), saying how long it was.
fn bounded(text: String) -> String {
    if text.len() <= MAX_MESSAGE_LEN {
        return text;
    }
    let mut end = MAX_MESSAGE_LEN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (message cut; {} bytes)", &text[..end], text.len())
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: bounded(msg.into()),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = bounded(details.into());
        self
    }

    pub fn invalid_env(var: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            codes::INVALID_ENV,
            format!("invalid environment variable {var}: {why}"),
        )
    }

    /// Code 7 naming `field`; an empty `field` means the document as a whole.
    pub fn invalid_config(field: &str, why: impl std::fmt::Display) -> Self {
        if field.is_empty() {
            return Self::new(
                codes::INVALID_CONFIG,
                format!("invalid network config: {why}"),
            );
        }
        Self::new(
            codes::INVALID_CONFIG,
            format!("invalid network config field `{field}`: {why}"),
        )
    }

    pub fn unsupported_field(field: &str, value: impl std::fmt::Display) -> Self {
        let value = value.to_string();
        let value = if value.chars().count() > 64 {
            format!(
                "{}… ({} bytes)",
                value.chars().take(64).collect::<String>(),
                value.len()
            )
        } else {
            value
        };
        Self::new(
            codes::UNSUPPORTED_FIELD,
            format!(
                "unsupported field `{}` in network config (value {value})",
                field.escape_debug()
            ),
        )
    }

    /// The JSON document for stdout, echoing `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> String {
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error JSON serialises")
    }

    /// Parses an error another plugin printed (for delegation).
    pub fn from_json(bytes: &[u8]) -> Option<CniError> {
        #[derive(serde::Deserialize)]
        struct In {
            code: u32,
            #[serde(default)]
            msg: String,
            #[serde(default)]
            details: String,
        }
        let e: In = serde_json::from_slice(bytes).ok()?;
        Some(CniError {
            code: e.code,
            msg: e.msg,
            details: e.details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded() {
        let e = CniError::invalid_config("name", "é".repeat(5000));
        assert!(e.msg.len() < MAX_MESSAGE_LEN + 64, "{}", e.msg.len());
        assert!(e.msg.contains("`name`") && e.msg.ends_with("bytes)"));
    }

    #[test]
    fn error_json_round_trip() {
        let e = CniError::invalid_env("CNI_IFNAME", "missing").with_details("d");
        let j = e.to_json("1.1.0");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 4);
        assert!(v["msg"].as_str().unwrap().contains("CNI_IFNAME"));
        assert_eq!(CniError::from_json(j.as_bytes()).unwrap(), e);
    }
}
