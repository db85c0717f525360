//! The lab topology: what the YAML says (the raw form; [`crate::validate()`] checks it) and
//! the addresses the lab assigns its members. Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::LabError;

/// The topology file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    pub name: String,
    #[serde(default = "embedded")]
    pub datastore: String,
    pub pools: Vec<LabPool>,
    pub subnets: Vec<Subnet>,
    pub nodes: Vec<LabNode>,
    #[serde(default)]
    pub pods: Vec<LabPod>,
    #[serde(default)]
    pub external: Vec<External>,
    /// Reachability to check; empty means every pod reaches every pod.
    #[serde(default)]
    pub expect: Vec<Expectation>,
    /// Cluster BGP settings; present means the nodes run BGP (a BGPConfiguration is written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<LabBgp>,
    /// The router joining the subnets (with two or more), optionally running a BGP daemon: a
    /// spine for per-rack ToRs. Its member name is `router`; its address is .1 on each subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterSpec>,
    /// More resources (YAML documents) applied before the agents start, e.g. BGPPeers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<String>,
    /// Kubernetes namespaces and their labels (applied as `v1` Namespace objects). When any are
    /// listed, every pod's namespace must be one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<LabNamespace>,
    /// Policy documents (YAML) applied once every pod is up and serving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<String>,
    /// The agents keep flow logs (`trellis agent --flow-logs`; `trellis flows --lab NAME`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flow_logs: bool,
    /// Run the lab on the Kubernetes path, against the API server this names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<LabKubernetes>,
}

/// The Kubernetes path: the lab runs `trellis kube-controller` (on the host, against the
/// API server) beside its agents, which run with `--kubernetes`; it creates its Namespaces,
/// Nodes, ServiceAccounts and Pods (labels, `nodeName`, named ports) as API objects before
/// each pod's CNI ADD, and sends the Kubernetes kinds among its resources and policies
/// (NetworkPolicies, ClusterNetworkPolicies, ServiceAccounts, Namespaces) to the API server
/// too, so everything Kubernetes owns arrives in the datastore through the controller. The
/// objects it created are deleted again by `lab down`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabKubernetes {
    /// An absolute path to the kubeconfig of the API server (its URL and credentials), read
    /// by the lab and by the kube-controller it runs.
    pub kubeconfig: String,
}

/// A Kubernetes namespace of the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabNamespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The lab's BGPConfiguration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabBgp {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    #[serde(default = "yes")]
    pub node_to_node_mesh: bool,
}

/// The lab router's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<DaemonSpec>,
}

/// A BGP daemon an external host runs, configured by the lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DaemonSpec {
    /// `bird` (BIRD 2) or `gobgp` (gobgpd).
    pub daemon: String,
    pub as_number: u32,
    /// Members (nodes or other BGP externals) it peers with. For nodes the lab also writes a
    /// node-specific BGPPeer, so the session comes up from both sides.
    pub peers: Vec<String>,
    /// Reflect routes between its iBGP peers (RFC 4456).
    #[serde(default)]
    pub route_reflector: bool,
    /// Act as a route server for its eBGP peers (RFC 7947): next hops and AS paths untouched.
    #[serde(default)]
    pub route_server: bool,
    /// TCP MD5 password on every session (also put on the nodes' BGPPeers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// GTSM (RFC 5082) on every session, peers at most this many hops away (1-254; also put
    /// on the nodes' BGPPeers as `ttlSecurity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<u8>,
}

fn embedded() -> String {
    "embedded".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabPool {
    pub name: String,
    pub cidr: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    #[serde(default = "vxlan")]
    pub encapsulation: String,
    #[serde(default)]
    pub nat_outgoing: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
}

fn vxlan() -> String {
    "VXLAN".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subnet {
    pub name: String,
    pub cidr: IpNet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabNode {
    pub name: String,
    pub subnet: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The node's own AS (Node `spec.bgp.asNumber`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<u32>,
    /// Makes the node a route reflector (Node `spec.bgp.routeReflectorClusterID`).
    #[serde(
        default,
        rename = "routeReflectorClusterID",
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
}

/// A pod. `name` is the lab member (unique in the lab: it names the pod's network namespace);
/// `podName` is the Kubernetes pod name in its namespace (default: `name`), so `x/a` and `y/a`
/// can both exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabPod {
    pub name: String,
    pub node: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Ports the pod declares (named ports) and the lab's server answers on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<LabPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

impl LabPod {
    /// The Kubernetes pod name (`K8S_POD_NAME`).
    pub fn pod_name(&self) -> &str {
        self.pod_name.as_deref().unwrap_or(&self.name)
    }

    /// `namespace/pod`: how probes, traces and the pod's server name it.
    pub fn qualified(&self) -> String {
        format!("{}/{}", self.namespace, self.pod_name())
    }
}

/// A port a pod declares and serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabPort {
    /// The named port (an IANA service name), for policies that name ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// What a pod's server speaks on a port (the kernel here has no SCTP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PortProtocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl PortProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "TCP",
            PortProtocol::Udp => "UDP",
        }
    }
}

fn default_ns() -> String {
    "default".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    pub name: String,
    pub subnet: String,
    /// Route the pools through this member (default: the first node of the subnet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// Run a BGP daemon here (the host also forwards).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<DaemonSpec>,
}

/// `from` (a pod) should (or should not) reach `to` (a pod or external host); for externals,
/// `seenAs: node|pod` checks which source address arrives (natOutgoing on or off).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expectation {
    pub from: String,
    pub to: String,
    #[serde(default = "yes")]
    pub reach: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_as: Option<String>,
}

fn yes() -> bool {
    true
}

/// The built-in topology: 3 nodes, VXLAN, 2 pods per node, the embedded store.
pub fn demo() -> Topology {
    let yaml =
        include_str!("../../../examples/lab/vxlan.yaml").replace("name: vxlan", "name: demo");
    parse(&yaml).expect("the built-in topology is valid")
}

/// Decodes a topology without checking it (see [`crate::validate()`]). Bounded like every
/// resource file (size, depth, aliases, duplicate keys).
pub fn decode(text: &str) -> Result<Topology, LabError> {
    let doc = match trellis_resources::yaml::parse_values(text)
        .map_err(|e| LabError::Decode(e.to_string()))?
        .as_slice()
    {
        [doc] => doc.clone(),
        docs => {
            return Err(LabError::Decode(format!(
                "expected one document, found {}",
                docs.len()
            )))
        }
    };
    let t: Topology = serde_path_to_error::deserialize(doc)
        .map_err(|e| LabError::Decode(format!("{}: {}", e.path(), e.inner())))?;
    Ok(t)
}

/// Decodes and validates a topology.
pub fn parse(text: &str) -> Result<Topology, LabError> {
    let t = decode(text)?;
    crate::validate(&t)?;
    Ok(t)
}

/// Offset in a subnet of the router (on every subnet), of the control namespace (first subnet),
/// of the first node and of the first external host.
pub const ROUTER_HOST: u32 = 1;
pub const CONTROL_HOST: u32 = 2;
pub const FIRST_NODE_HOST: u32 = 10;
pub const FIRST_EXTERNAL_HOST: u32 = 100;

/// Address `n` of a subnet: .1 the router, .2 the control namespace, nodes from .10, externals
/// from .100.
pub fn host(subnet: &IpNet, n: u32) -> IpAddr {
    match subnet {
        IpNet::V4(s) => IpAddr::V4((u32::from(s.network()) + n).into()),
        IpNet::V6(s) => IpAddr::V6((u128::from(s.network()) + n as u128).into()),
    }
}

/// Member name → (its subnet, its address).
pub type Addrs = BTreeMap<String, (IpNet, IpAddr)>;

/// Every member's address (nodes and externals), in topology order. The topology must be
/// validated (every subnet a member names exists).
pub fn addresses(t: &Topology) -> Addrs {
    let mut out = BTreeMap::new();
    let mut next: BTreeMap<&str, (u32, u32)> = t
        .subnets
        .iter()
        .map(|s| (s.name.as_str(), (FIRST_NODE_HOST, FIRST_EXTERNAL_HOST)))
        .collect();
    let subnet = |name: &str| {
        t.subnets
            .iter()
            .find(|s| s.name == name)
            .expect("validated")
            .cidr
    };
    for n in &t.nodes {
        let c = next.get_mut(n.subnet.as_str()).expect("validated");
        out.insert(
            n.name.clone(),
            (subnet(&n.subnet), host(&subnet(&n.subnet), c.0)),
        );
        c.0 += 1;
    }
    for e in &t.external {
        let c = next.get_mut(e.subnet.as_str()).expect("validated");
        out.insert(
            e.name.clone(),
            (subnet(&e.subnet), host(&subnet(&e.subnet), c.1)),
        );
        c.1 += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_is_valid_and_addressed() {
        let t = demo();
        assert_eq!(t.name, "demo");
        assert_eq!(t.nodes.len(), 3);
        assert_eq!(t.pods.len(), 6);
        let a = addresses(&t);
        assert_eq!(a["node1"].1.to_string(), "192.168.50.10");
    }

    #[test]
    fn errors_name_the_problem() {
        let base = "name: x\npools: [{name: p, cidr: 10.0.0.0/16}]\nsubnets: [{name: s, cidr: 192.168.0.0/24}]\n";
        let err = |yaml: String| parse(&yaml).unwrap_err().to_string();
        assert_eq!(
            err(format!("{base}nodes: [{{name: n, subnet: nope}}]\n")),
            "nodes[0].subnet \"nope\": no such subnet"
        );
        assert_eq!(
            err(format!(
                "{base}nodes: [{{name: n, subnet: s}}]\npods: [{{name: p, node: zz}}]\n"
            )),
            "pods[0].node \"zz\": no such node"
        );
        assert_eq!(
            err(format!(
                "{base}nodes: [{{name: n, subnet: s}}, {{name: n, subnet: s}}]\n"
            )),
            "nodes[1].name \"n\": already used by nodes[0]"
        );
        assert!(err(format!("{base}nodes: []\nbogus: 1\n")).contains("bogus"));
        let tor = |bgp: &str| {
            format!("{base}nodes: [{{name: n, subnet: s}}]\nexternal: [{{name: tor, subnet: s, bgp: {bgp}}}]\n")
        };
        for (bgp, want) in [
            (
                "{daemon: quagga, asNumber: 65001, peers: [n]}",
                "bgp.daemon",
            ),
            ("{daemon: bird, asNumber: 0, peers: [n]}", "bgp.asNumber"),
            ("{daemon: bird, asNumber: 65001, peers: [zz]}", "\"zz\""),
            (
                "{daemon: bird, asNumber: 65001, peers: [n], ttlSecurity: 0}",
                "bgp.ttlSecurity",
            ),
            (
                "{daemon: bird, asNumber: 65001, peers: [n], ttlSecurity: 300}",
                "ttlSecurity",
            ),
        ] {
            let e = parse(&tor(bgp)).unwrap_err().to_string();
            assert!(e.contains(want), "{bgp} → {e} (want {want})");
        }
        assert!(parse(&tor(
            "{daemon: bird, asNumber: 65001, peers: [n], ttlSecurity: 1}"
        ))
        .is_ok());
    }
}
