//! Flow-log records on the wire (`trellis flows` ↔ the agent): what the agent aggregated from
//! the packets its deciding policy rules copied, and the query that selects them. Pure data.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// One side of a flow, as the reporting agent resolved its address when the packet came.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase", deny_unknown_fields)]
pub enum FlowPeer {
    /// A workload endpoint (`namespace/name`).
    Pod { namespace: String, name: String },
    /// A node's own address.
    Node { name: String },
    /// Anything else.
    External { address: IpAddr },
}

impl std::fmt::Display for FlowPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowPeer::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            FlowPeer::Node { name } => write!(f, "node/{name}"),
            FlowPeer::External { address } => write!(f, "{address}"),
        }
    }
}

/// What the deciding rule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FlowVerdict {
    Allowed,
    Denied,
}

/// A flow's identity: who to whom, on what, and which rule decided what.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowKey {
    pub source: FlowPeer,
    pub destination: FlowPeer,
    /// IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    /// Destination port (TCP/UDP/SCTP), or ICMP type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub verdict: FlowVerdict,
    /// `ingress` (the destination's policy decided) or `egress` (the source's).
    pub direction: String,
    /// The deciding policy (`knp/NS/NAME`, `gnp/NAME`, `cnp/admin/NAME`, `pro/NAME`, or a
    /// default: `tier/NAME`, `none` — no policy applies —, `profiles`).
    pub policy: String,
    /// The rule's index in the policy, or `default`.
    pub rule: String,
}

/// One flow aggregated over one interval on one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowRecord {
    /// Order of closing on the reporting agent (records of a still-open interval have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The reporting node.
    pub node: String,
    /// Interval start and end, Unix milliseconds.
    pub start: u64,
    pub end: u64,
    #[serde(flatten)]
    pub key: FlowKey,
    /// Packets the deciding rule copied: the first packet of each new connection (and its
    /// retransmissions while undecided or denied).
    pub packets: u64,
}

/// Which records to return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FlowQuery {
    /// Only closed records with a larger `seq` (the previous page's `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<FlowVerdict>,
    /// Either side is a pod of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Also the interval still being aggregated (with the last page).
    #[serde(default)]
    pub open: bool,
}

/// The answer to a flow query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Flows {
    pub records: Vec<FlowRecord>,
    /// Where the next page starts: pass it as `after`.
    pub next: u64,
    /// Whether more closed records follow (ask again with `after: next`).
    #[serde(default)]
    pub more: bool,
    /// Whether flow logs are on at this agent.
    pub enabled: bool,
    /// Packet copies the agent could not record: lost in the kernel's queue, malformed, or
    /// beyond its bound on distinct flows per interval.
    pub lost: u64,
}
