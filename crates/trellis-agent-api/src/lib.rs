//! The agent's Unix-socket protocol: one JSON request per line, one JSON reply per line.
//! Pure data shared by `trellis agent` (server) and `trellis-cni` (client).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub mod flows;

/// Default socket path.
pub const DEFAULT_SOCKET: &str = "/run/trellis/agent.sock";

/// Identifies one attachment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Attachment {
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase", deny_unknown_fields)]
pub enum Request {
    /// Allocate addresses and record the workload endpoint.
    Allocate {
        #[serde(flatten)]
        attachment: Attachment,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        namespace: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
        /// The pod's `metadata.uid` (CNI_ARGS `K8S_POD_UID`, which containerd and CRI-O pass):
        /// recorded on the endpoint so IPAM GC tells a pod recreated under the same name from
        /// the one that held the address, and a record of an earlier pod of the same name
        /// (another UID) is not this pod's. Sent only when known, so an older agent (which
        /// rejects unknown fields) still serves runtimes that do not pass it.
        #[serde(default, skip_serializing_if = "Option::is_none", rename = "podUID")]
        pod_uid: Option<String>,
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            rename = "hostInterface"
        )]
        host_interface: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ips: Vec<IpAddr>,
        #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "ipv4Pools")]
        ipv4_pools: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "ipv6Pools")]
        ipv6_pools: Vec<String>,
    },
    /// Release an attachment's addresses and endpoint (idempotent).
    Release {
        #[serde(flatten)]
        attachment: Attachment,
    },
    /// Confirm the attachment holds exactly these addresses.
    Check {
        #[serde(flatten)]
        attachment: Attachment,
        ips: Vec<IpAddr>,
    },
    /// Release this node's attachments of `network` that are not listed.
    Gc {
        network: String,
        keep: Vec<Attachment>,
    },
    /// Whether the agent can serve ADDs.
    Status {},
    /// The agent's liveness and readiness checks (what `/healthz` and `/readyz` serve), for
    /// `trellis node status`. Touches no datastore: answered from what the agent last saw.
    Health {},
    /// The routed-mode veth exists: reply once the endpoint's policy is in the kernel (at once
    /// when the agent does not enforce policy), or with code 11 after
    /// [`ENDPOINT_READY_DEADLINE`]. Until then the `trl*` interface is closed by the policy
    /// table. An agent older than this request answers code 6 (unknown variant); the plugin
    /// then goes on without waiting.
    EndpointReady {
        #[serde(flatten)]
        attachment: Attachment,
        #[serde(rename = "hostInterface")]
        host_interface: String,
    },
    /// The flow log's records (`trellis flows`). Answered from memory.
    Flows {
        #[serde(flatten)]
        query: flows::FlowQuery,
    },
}

/// How long the agent waits for an endpoint's policy before answering `EndpointReady` with an
/// error (below the plugin's reply timeout, so the error is the agent's, with its reason).
pub const ENDPOINT_READY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// An error the plugin turns into a CNI error with the same code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub code: u32,
    pub msg: String,
}

/// A successful reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ok {
    /// Allocated addresses with their block's prefix length (`10.0.0.5/26`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// MTU for the pod's interface (uplink minus encapsulation overhead, or the configured one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The answer to [`Request::Health`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// The answer to [`Request::Flows`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<flows::Flows>,
}

/// The agent's health: each check with its verdict. `live` is whether every liveness check
/// passes (`/healthz`); `ready` whether every check passes (`/readyz`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthReport {
    pub live: bool,
    pub ready: bool,
    pub checks: Vec<HealthCheck>,
}

/// One check of a [`HealthReport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// `loop/dataplane`, `datastore`, `dataplane`, `bgp`.
    pub name: String,
    /// A liveness check (it also counts for readiness).
    pub liveness: bool,
    pub ok: bool,
    /// What was seen, in a sentence.
    pub detail: String,
}

impl HealthReport {
    /// The failing checks' names.
    pub fn failing(&self) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }

    /// Plain text, one line per check (`ok   NAME: detail` or `FAIL NAME: detail`), then
    /// `ready`, or `not ready: NAMES`; `liveness_only` keeps the liveness checks only and
    /// ends with `live` / `not live: NAMES` (what `/healthz` serves).
    pub fn text(&self, liveness_only: bool) -> String {
        let mut out = String::new();
        let checks = self.checks.iter().filter(|c| c.liveness || !liveness_only);
        for c in checks.clone() {
            let verdict = if c.ok { "ok  " } else { "FAIL" };
            out.push_str(&format!("{verdict} {}: {}\n", c.name, c.detail));
        }
        let failing: Vec<&str> = checks.filter(|c| !c.ok).map(|c| c.name.as_str()).collect();
        let word = if liveness_only { "live" } else { "ready" };
        if failing.is_empty() {
            out.push_str(&format!("{word}\n"));
        } else {
            out.push_str(&format!("not {word}: {}\n", failing.join(", ")));
        }
        out
    }
}

/// The reply to any request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Reply {
    Ok(Ok),
    Error(ErrorReply),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_reject_unknown_fields() {
        let r = Request::Allocate {
            attachment: Attachment {
                network: "n".into(),
                container_id: "c".into(),
                ifname: "eth0".into(),
            },
            namespace: Some("default".into()),
            pod: None,
            pod_uid: Some("u1".into()),
            host_interface: None,
            ips: vec!["10.0.0.1".parse().unwrap()],
            ipv4_pools: vec![],
            ipv6_pools: vec![],
        };
        let line = serde_json::to_string(&r).unwrap();
        assert!(
            line.contains("\"op\":\"allocate\"")
                && line.contains("containerID")
                && line.contains("\"podUID\":\"u1\""),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        assert!(serde_json::from_str::<Request>("{\"op\":\"status\",\"x\":1}").is_err());
        let ready = r#"{"op":"endpointReady","network":"n","containerID":"c","ifname":"eth0","hostInterface":"trl0"}"#;
        match serde_json::from_str::<Request>(ready).unwrap() {
            Request::EndpointReady { host_interface, .. } => assert_eq!(host_interface, "trl0"),
            other => panic!("{other:?}"),
        }
        let reply = Reply::Error(ErrorReply {
            code: 11,
            msg: "m".into(),
        });
        assert_eq!(
            serde_json::from_str::<Reply>(&serde_json::to_string(&reply).unwrap()).unwrap(),
            reply
        );
    }
}

#[cfg(test)]
mod unknown_fields {
    use super::*;

    /// Requests with fields the agent does not know are refused, not silently half-read.
    #[test]
    fn flattened_requests_reject_unknown_fields() {
        let bad = r#"{"op":"release","network":"n","containerID":"c","ifname":"eth0","bogus":1}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err());
        let good = r#"{"op":"release","network":"n","containerID":"c","ifname":"eth0"}"#;
        assert!(serde_json::from_str::<Request>(good).is_ok());
    }
}
