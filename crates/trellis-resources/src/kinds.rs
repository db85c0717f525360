//! The resource kinds and their specs. Field names follow Calico's where Calico has the concept,
//! so an operator's `projectcalico.org/v3` YAML applies unchanged.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Object metadata (the Kubernetes fields Trellis keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// How traffic between nodes is carried for a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encapsulation {
    None,
    #[serde(rename = "VXLAN")]
    Vxlan,
    #[serde(rename = "VXLANCrossSubnet")]
    VxlanCrossSubnet,
    #[serde(rename = "IPIP")]
    Ipip,
    #[serde(rename = "IPIPCrossSubnet")]
    IpipCrossSubnet,
}

/// Calico's `ipipMode` / `vxlanMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TunnelMode {
    Never,
    Always,
    CrossSubnet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPoolSpec {
    pub cidr: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encapsulation: Option<Encapsulation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<TunnelMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mode: Option<TunnelMode>,
    #[serde(default)]
    pub nat_outgoing: bool,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, rename = "disableBGPExport")]
    pub disable_bgp_export: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_uses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_mode: Option<String>,
}

impl IpPoolSpec {
    /// `blockSize` or its default (26 for IPv4, 122 for IPv6).
    pub fn block_prefix(&self) -> u8 {
        self.block_size
            .unwrap_or(if self.cidr.addr().is_ipv4() { 26 } else { 122 })
    }

    /// The encapsulation after mapping Calico's ipipMode/vxlanMode onto it.
    pub fn effective_encapsulation(&self) -> Encapsulation {
        if let Some(e) = self.encapsulation {
            return e;
        }
        match (self.ipip_mode, self.vxlan_mode) {
            (_, Some(TunnelMode::Always)) => Encapsulation::Vxlan,
            (_, Some(TunnelMode::CrossSubnet)) => Encapsulation::VxlanCrossSubnet,
            (Some(TunnelMode::Always), _) => Encapsulation::Ipip,
            (Some(TunnelMode::CrossSubnet), _) => Encapsulation::IpipCrossSubnet,
            _ => Encapsulation::None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeAddress {
    pub address: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBgpSpec {
    #[serde(
        default,
        rename = "ipv4Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<IpNet>,
    #[serde(
        default,
        rename = "ipv6Address",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgpSpec>,
    #[serde(
        default,
        rename = "ipv4VXLANTunnelAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_vxlan_tunnel_addr: Option<std::net::IpAddr>,
    #[serde(
        default,
        rename = "vxlanTunnelMACAddr",
        skip_serializing_if = "Option::is_none"
    )]
    pub vxlan_tunnel_mac_addr: Option<String>,
    /// The Kubernetes Node's `spec.podCIDRs` (mirrored by the kube-controller; at most one per
    /// family): with the agent's `--use-pod-cidr` each is this node's only block of its family.
    /// An agent built before this field refuses a Node record carrying it.
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeStatus {
    /// Unix seconds of the agent's last keep-alive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<u64>,
}

/// One allocation's owner inside a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllocationAttribute {
    #[serde(rename = "handle_id")]
    pub handle_id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secondary: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamBlockSpec {
    pub cidr: IpNet,
    /// `host:NODE` when the block is affine to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Per ordinal in the block: index into `attributes`, or null when free.
    pub allocations: Vec<Option<usize>>,
    pub attributes: Vec<AllocationAttribute>,
    /// Unix seconds since when the block has been empty (for release after a grace period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_since: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamHandleSpec {
    #[serde(rename = "handleID")]
    pub handle_id: String,
    /// Block CIDR → number of addresses this handle holds there.
    pub block: BTreeMap<String, u32>,
    /// Datastore key of the attachment's WorkloadEndpoint (Trellis), removed with the handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AffinityState {
    Pending,
    Confirmed,
    PendingDeletion,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockAffinitySpec {
    pub state: AffinityState,
    pub node: String,
    pub cidr: IpNet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpReservationSpec {
    #[serde(rename = "reservedCIDRs")]
    pub reserved_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfigurationSpec {
    #[serde(default)]
    pub strict_affinity: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blocks_per_host: Option<u32>,
    #[serde(default = "yes")]
    pub auto_allocate_blocks: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEndpointSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orchestrator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub node: String,
    #[serde(
        default,
        rename = "containerID",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_networks: Vec<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// The pod's service account (policy's `serviceAccountSelector` and `serviceAccounts`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The pod's named ports, which rules' named ports resolve against.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
    /// Floating addresses NATed to the endpoint's own (Calico's `ipNATs`): the node DNATs
    /// `externalIP` to `internalIP`, and every node routes `externalIP` to this one.
    #[serde(default, rename = "ipNATs", skip_serializing_if = "Vec::is_empty")]
    pub ip_nats: Vec<IpNat>,
}

/// One floating address of an endpoint (Calico's WorkloadEndpoint `ipNATs` entry).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpNat {
    /// One of the endpoint's own addresses.
    #[serde(rename = "internalIP")]
    pub internal_ip: std::net::IpAddr,
    /// The address clients use, NATed to `internalIP`.
    #[serde(rename = "externalIP")]
    pub external_ip: std::net::IpAddr,
}

/// A named port a workload declares (Calico's WorkloadEndpoint `ports`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: crate::policy::RuleProtocol,
    pub port: u16,
    /// Kept for Calico compatibility; Trellis does not map host ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

/// A CIDR entry of BGPConfiguration's service lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrEntry {
    pub cidr: IpNet,
}

/// A named BGP community (`aa:nn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Community {
    pub name: String,
    pub value: String,
}

/// Communities attached to the routes Trellis advertises within `cidr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixAdvertisement {
    pub cidr: IpNet,
    /// Names from `communities`, or literal `aa:nn` values.
    #[serde(default)]
    pub communities: Vec<String>,
}

/// Cluster-wide BGP settings (Calico's BGPConfiguration named `default`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfigurationSpec {
    /// The cluster's AS (default 64512); a Node's `bgp.asNumber` overrides it for that node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Full mesh between all nodes (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    #[serde(
        default,
        rename = "serviceClusterIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_cluster_ips: Vec<CidrEntry>,
    #[serde(
        default,
        rename = "serviceExternalIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_external_ips: Vec<CidrEntry>,
    #[serde(
        default,
        rename = "serviceLoadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_load_balancer_ips: Vec<CidrEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<Community>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_advertisements: Vec<PrefixAdvertisement>,
    /// TCP port the speaker listens on and connects to (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    /// Accepted for Calico compatibility; Trellis's log level comes from RUST_LOG.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    /// Graceful restart time offered on mesh sessions (`120s`, default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_max_restart_time: Option<String>,
    /// Where the speaker listens: every address (`None`, default) or only the node's BGP
    /// address (`NodeIP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_mode: Option<BindMode>,
}

/// Calico's `bindMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BindMode {
    None,
    #[serde(rename = "NodeIP")]
    NodeIp,
}

/// Calico's `sourceAddress`: which local address a session to a peer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SourceAddress {
    /// The node's BGP address (default).
    #[serde(rename = "UseNodeIP")]
    UseNodeIp,
    /// Whatever the kernel picks for the route to the peer.
    None,
}

/// Calico's `nextHopMode`: the next hop sent to a peer for routes learned from others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NextHopMode {
    /// BIRD's default: own address towards eBGP peers, reflected routes keep theirs.
    Auto,
    /// Always the node's own address (BIRD's `next hop self`), reflected routes included.
    #[serde(rename = "Self")]
    NodeSelf,
    /// Never rewritten (BIRD's `next hop keep`); `keepOriginalNextHop: true` is the old spelling.
    Keep,
}

/// A BGP password: inline. Calico's `secretKeyRef` form is refused with a message, since the
/// datastore holds no Kubernetes secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BgpPassword {
    Inline(String),
    SecretKeyRef {
        #[serde(rename = "secretKeyRef")]
        secret_key_ref: BTreeMap<String, String>,
    },
}

/// A BGP peering (Calico's BGPPeer).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeerSpec {
    /// Only this node peers (node-specific peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Nodes matching this selector peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    /// The peer's address (`IP` or `IP:port`).
    #[serde(default, rename = "peerIP", skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    /// Peer with the nodes matching this selector instead (e.g. route reflectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// TCP MD5 signature password (RFC 2385).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<BgpPassword>,
    /// Send learned routes with their original next hop: the older spelling of
    /// `nextHopMode: Keep`.
    #[serde(default)]
    pub keep_original_next_hop: bool,
    /// The next hop sent for learned routes (default `Auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mode: Option<NextHopMode>,
    /// Graceful restart time offered to this peer (`120s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<String>,
    /// The local address of the session (default `UseNodeIP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<SourceAddress>,
    /// How many times this cluster's own AS may appear in a received AS path (BIRD's
    /// `allow local as`; it disables part of eBGP loop prevention). Default 0.
    #[serde(
        default,
        rename = "numAllowedLocalASNumbers",
        skip_serializing_if = "Option::is_none"
    )]
    pub num_allowed_local_as_numbers: Option<u32>,
    /// GTSM (RFC 5082): the peer is at most this many hops away; packets are sent with TTL 255
    /// and those arriving with a TTL below 256 − hops are dropped. 0 (Calico's default) is off.
    #[serde(
        default,
        rename = "ttlSecurity",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl_security: Option<u32>,
    /// BGPFilters applied to this peer's routes, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    /// The gateway on the node's subnet through which `peerIP` is reached: a host route to the
    /// peer is installed through it, so the session never depends on routes learned over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_by: Option<String>,
    /// Trellis extension: the most prefixes kept from this peer, and what happens beyond (none
    /// by default, as in Calico and BIRD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prefixes: Option<MaxPrefixes>,
}

/// A BGPPeer's `maxPrefixes`: `limit` counts the prefixes the peer announces and has not
/// withdrawn, whether accepted or rejected by filters (so it bounds what the agent holds for
/// the peer, like BIRD's `receive limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MaxPrefixes {
    pub limit: u32,
    /// Default `Restart`.
    #[serde(default)]
    pub action: PrefixLimitAction,
}

/// What a BGPPeer's `maxPrefixes` does when the peer announces one prefix too many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrefixLimitAction {
    /// Log and count, keep accepting (memory is not bounded).
    Warn,
    /// Keep the session; ignore new prefixes beyond the limit (BIRD's `block`).
    Reject,
    /// Reset the session with Cease "Maximum Number of Prefixes Reached" (RFC 4486) and
    /// reconnect after a back-off.
    #[default]
    Restart,
}

/// Route filters for BGP peers (Calico's BGPFilter), named in a BGPPeer's `filters`: ordered
/// rules per direction and family; the first rule that matches a route decides, and a route no
/// rule matches is accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpFilterSpec {
    #[serde(default, rename = "exportV4", skip_serializing_if = "Vec::is_empty")]
    pub export_v4: Vec<BgpFilterRule>,
    #[serde(default, rename = "importV4", skip_serializing_if = "Vec::is_empty")]
    pub import_v4: Vec<BgpFilterRule>,
    #[serde(default, rename = "exportV6", skip_serializing_if = "Vec::is_empty")]
    pub export_v6: Vec<BgpFilterRule>,
    #[serde(default, rename = "importV6", skip_serializing_if = "Vec::is_empty")]
    pub import_v6: Vec<BgpFilterRule>,
}

/// One filter rule: with `cidr` and `matchOperator` it matches by prefix (optionally only
/// prefix lengths in `prefixLength`), with `source: RemotePeers` only routes learned from
/// peers (export rules), with neither every route of its family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpFilterRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_operator: Option<MatchOperator>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_length: Option<PrefixLengthRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FilterSource>,
    pub action: FilterAction,
}

/// How a rule's `cidr` is compared with a route's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchOperator {
    /// The same prefix.
    Equal,
    NotEqual,
    /// Inside the CIDR (as long or longer).
    In,
    NotIn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterAction {
    Accept,
    Reject,
}

/// Where a route came from (Calico's `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterSource {
    /// Learned from a BGP peer (not originated by this node).
    RemotePeers,
}

/// Prefix lengths an `In`/`NotIn` rule covers (default: the CIDR's length up to the family's
/// maximum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixLengthRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u8>,
}

/// One session as the agent reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpSessionStatus {
    pub address: String,
    pub as_number: u32,
    /// node-to-node mesh, global, node specific, node selector, or with "(RR client)" appended.
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    /// Unix seconds the session entered its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    pub received: u64,
    pub accepted: u64,
    pub advertised: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub updates_received: u64,
    #[serde(default)]
    pub updates_sent: u64,
    #[serde(default)]
    pub notifications_received: u64,
    #[serde(default)]
    pub notifications_sent: u64,
    /// Times the session reached Established.
    #[serde(default)]
    pub established_transitions: u64,
    /// Announcements of new prefixes beyond the peer's `maxPrefixes` limit.
    #[serde(default)]
    pub prefixes_over_limit: u64,
}

/// A node's BGP speaker, written by its agent (Trellis's analogue of CalicoNodeStatus).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpStatusSpec {
    pub node: String,
    #[serde(rename = "routerID")]
    pub router_id: String,
    pub as_number: u32,
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
    pub peers: Vec<BgpSessionStatus>,
    /// Unix seconds of this report.
    pub updated: u64,
}
