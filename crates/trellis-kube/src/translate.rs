//! Kubernetes objects → Trellis's stored form (pure, no I/O).
//!
//! - Namespace → `v1` Namespace (labels, and Calico's `cni.projectcalico.org/ipv4pools` /
//!   `ipv6pools` annotations, validated, kept as annotations);
//! - ServiceAccount → `v1` ServiceAccount (labels, for `serviceAccountSelector`);
//! - `networking.k8s.io/v1` NetworkPolicy → the same stored form `trellis apply` gives it (the
//!   object goes through Trellis's own parser, so defaulting and validation are the CLI's);
//! - `policy.networking.k8s.io` ClusterNetworkPolicy (`v1beta1` or `v1alpha2`; there are no
//!   k8s-openapi types for it, so it arrives as a [`DynamicObject`]) → the same stored form
//!   `trellis apply` gives it, through Trellis's own parser like NetworkPolicies;
//! - Pod → [`PodInfo`]: what the pod's WorkloadEndpoints must carry (labels, service account,
//!   named container ports), plus its Calico IPAM annotations parsed and validated; stored as
//!   the pod's record ([`PodInfo::record`], kind `Pod`), which the agent reads at ADD;
//! - Node → [`NodeInfo`]: its labels (synced onto the Trellis Node its agent registered), and
//!   its podCIDRs and addresses, validated.
//!
//! Every object the controller stores carries [`MANAGED_BY`] = [`CONTROLLER`], so a relist
//! deletes only what the controller wrote. Errors name the Kubernetes field.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DynamicObject, ObjectMeta};
use serde_json::{json, Value};
use trellis_resources::pod::PodSpec;
use trellis_resources::policy::RuleProtocol;
use trellis_resources::{EndpointPort, Kind, Metadata, Object, Resource, ResourceError};

/// The annotation that marks an object the controller wrote.
pub const MANAGED_BY: &str = "trellis.dev/managed-by";
/// Its value.
pub const CONTROLLER: &str = "kube-controller";
/// Calico's namespace and pod IPAM annotations (defined beside the pod record).
pub use trellis_resources::pod::{
    FLOATING_IPS, IPV4_POOLS, IPV6_POOLS, IP_ADDRS, IP_ADDRS_NO_IPAM,
};

/// An object that could not be translated: which one, which field, why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct TranslateError {
    /// `Namespace`, `Pod`, ...
    pub kind: &'static str,
    /// `name` or `namespace/name`.
    pub object: String,
    /// The Kubernetes field (`metadata.labels`, `spec.containers[0].ports[1].name`).
    pub field: String,
    pub reason: String,
}

fn object_name(meta: &ObjectMeta) -> String {
    let name = meta.name.clone().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name,
    }
}

fn error(
    kind: &'static str,
    meta: &ObjectMeta,
    field: impl Into<String>,
    reason: impl Into<String>,
) -> TranslateError {
    TranslateError {
        kind,
        object: object_name(meta),
        field: field.into(),
        reason: reason.into(),
    }
}

/// A resource error from Trellis's parser, as a translation error of this object.
fn from_resource(kind: &'static str, meta: &ObjectMeta, e: ResourceError) -> TranslateError {
    error(kind, meta, e.field, e.reason)
}

/// The metadata Trellis keeps: name, namespace, labels, uid and the given annotations, plus
/// the ownership mark.
fn stored_metadata(meta: &ObjectMeta, annotations: BTreeMap<String, String>) -> Value {
    let mut annotations = annotations;
    annotations.insert(MANAGED_BY.into(), CONTROLLER.into());
    let mut m = json!({
        "name": meta.name.clone().unwrap_or_default(),
        "labels": meta.labels.clone().unwrap_or_default(),
        "annotations": annotations,
    });
    if let Some(ns) = &meta.namespace {
        m["namespace"] = json!(ns);
    }
    if let Some(uid) = &meta.uid {
        m["uid"] = json!(uid);
    }
    m
}

fn required_name(kind: &'static str, meta: &ObjectMeta) -> Result<(), TranslateError> {
    match meta.name.as_deref() {
        Some(n) if !n.is_empty() => Ok(()),
        _ => Err(error(kind, meta, "metadata.name", "is required")),
    }
}

/// A Namespace as stored: its labels and its valid pool annotations. A bad pool annotation
/// (the API server does not check it) is left out — [`namespace_annotation_errors`] names it
/// for the log — but never keeps the namespace's labels from syncing: without them the
/// namespace's pods fall outside every policy that selects their namespace by label.
pub fn namespace(ns: &Namespace) -> Result<Resource, TranslateError> {
    let meta = &ns.metadata;
    required_name("Namespace", meta)?;
    let annotations = meta.annotations.clone().unwrap_or_default();
    let kept = [(IPV4_POOLS, true), (IPV6_POOLS, false)]
        .into_iter()
        .filter_map(|(key, v4)| {
            let value = annotations.get(key)?;
            pools(value, v4).ok()?;
            Some((key.to_string(), value.clone()))
        })
        .collect();
    let doc = json!({
        "apiVersion": Kind::Namespace.api_version(),
        "kind": "Namespace",
        "metadata": stored_metadata(meta, kept),
    });
    Resource::from_value(&doc).map_err(|e| from_resource("Namespace", meta, e))
}

/// The namespace's pool annotations that do not check, each naming its field.
pub fn namespace_annotation_errors(ns: &Namespace) -> Vec<TranslateError> {
    let meta = &ns.metadata;
    let annotations = meta.annotations.clone().unwrap_or_default();
    [(IPV4_POOLS, true), (IPV6_POOLS, false)]
        .into_iter()
        .filter_map(|(key, v4)| {
            let reason = pools(annotations.get(key)?, v4).err()?;
            let field = format!("metadata.annotations.{key}");
            Some(error("Namespace", meta, field, reason))
        })
        .collect()
}

/// A ServiceAccount as stored: its labels.
pub fn service_account(sa: &ServiceAccount) -> Result<Resource, TranslateError> {
    let meta = &sa.metadata;
    required_name("ServiceAccount", meta)?;
    let doc = json!({
        "apiVersion": Kind::ServiceAccount.api_version(),
        "kind": "ServiceAccount",
        "metadata": stored_metadata(meta, BTreeMap::new()),
    });
    Resource::from_value(&doc).map_err(|e| from_resource("ServiceAccount", meta, e))
}

/// A NetworkPolicy as stored: the spec unchanged, through Trellis's parser (the API server's
/// defaulting, Trellis's validation).
pub fn network_policy(np: &NetworkPolicy) -> Result<Resource, TranslateError> {
    let meta = &np.metadata;
    required_name("NetworkPolicy", meta)?;
    let spec = serde_json::to_value(np.spec.clone().unwrap_or_default()).map_err(|e| {
        error(
            "NetworkPolicy",
            meta,
            "spec",
            format!("does not serialise: {e}"),
        )
    })?;
    let doc = json!({
        "apiVersion": Kind::KubernetesNetworkPolicy.api_version(),
        "kind": "NetworkPolicy",
        "metadata": stored_metadata(meta, BTreeMap::new()),
        "spec": spec,
    });
    Resource::from_value(&doc).map_err(|e| from_resource("NetworkPolicy", meta, e))
}

/// A ClusterNetworkPolicy (`policy.networking.k8s.io/v1beta1` or `v1alpha2`, the same schema)
/// as stored: the spec unchanged through Trellis's parser, under the version Trellis stores
/// (`v1beta1`), exactly as `trellis apply` stores the same document.
pub fn cluster_network_policy(o: &DynamicObject) -> Result<Resource, TranslateError> {
    const KIND: &str = "ClusterNetworkPolicy";
    let meta = &o.metadata;
    required_name(KIND, meta)?;
    let api_version = o
        .types
        .as_ref()
        .map(|t| t.api_version.as_str())
        .unwrap_or_default();
    if ![
        trellis_resources::cnp::CNP_API_VERSION,
        trellis_resources::cnp::CNP_API_VERSION_ALPHA2,
    ]
    .contains(&api_version)
    {
        return Err(error(
            KIND,
            meta,
            "apiVersion",
            format!("{api_version:?} is not a ClusterNetworkPolicy version Trellis reads"),
        ));
    }
    let spec = o.data.get("spec").cloned().unwrap_or(Value::Null);
    let doc = json!({
        "apiVersion": api_version,
        "kind": KIND,
        "metadata": stored_metadata(meta, BTreeMap::new()),
        "spec": spec,
    });
    Resource::from_value(&doc).map_err(|e| from_resource(KIND, meta, e))
}

/// What a pod's WorkloadEndpoints carry, from the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName` once scheduled: only endpoints on that node are the pod's.
    pub node: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// Named container ports (unnamed ones are not referred to by policy).
    pub ports: Vec<EndpointPort>,
    /// Calico's IPAM annotations, validated. A bad one is reported but does not make the pod
    /// untranslatable: the API server does not check them, and a pod left without its labels
    /// would escape the policies selecting it. Its record then carries no IPAM annotations,
    /// only the reason (`ipamError`), and its ADD fails with it.
    pub ipam: Result<PodIpam, TranslateError>,
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// Of a static pod's mirror pod: the kubelet's UID of the static pod (what the runtime
    /// passes as `K8S_POD_UID`), kept on the record for `trellis ipam check`.
    pub mirror_of: Option<String>,
}

impl PodInfo {
    /// The pod's record as stored (`/trellis/v1/pods/NS/NAME`), marked as the controller's:
    /// what the agent copies onto the pod's endpoint at ADD.
    pub fn record(&self) -> Object<PodSpec> {
        let mut annotations: BTreeMap<String, String> =
            [(MANAGED_BY.to_string(), CONTROLLER.to_string())].into();
        if let Some(m) = &self.mirror_of {
            annotations.insert(crate::gc_plan::MIRROR_ANNOTATION.into(), m.clone());
        }
        let ipam = self.ipam.as_ref().cloned().unwrap_or_default();
        let ipam_error = self
            .ipam
            .as_ref()
            .err()
            .map(|e| format!("{}: {}", e.field, e.reason));
        Object {
            metadata: Metadata {
                name: self.name.clone(),
                namespace: Some(self.namespace.clone()),
                labels: self.labels.clone(),
                annotations,
                uid: self.uid.clone(),
                ..Default::default()
            },
            spec: PodSpec {
                node_name: self.node.clone(),
                service_account_name: self.service_account.clone(),
                ports: self.ports.clone(),
                ip_addrs: ipam.ip_addrs,
                ipv4_pools: ipam.ipv4_pools,
                ipv6_pools: ipam.ipv6_pools,
                ip_addrs_no_ipam: ipam.ip_addrs_no_ipam,
                floating_ips: ipam.floating_ips,
                ipam_error,
            },
            status: None,
        }
    }
}

/// A pod's Calico IPAM annotations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIpam {
    pub ip_addrs: Vec<IpAddr>,
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
    pub ip_addrs_no_ipam: Vec<IpAddr>,
    pub floating_ips: Vec<IpAddr>,
}

/// A pod's labels, service account, named ports and IPAM annotations, validated.
pub fn pod(p: &Pod) -> Result<PodInfo, TranslateError> {
    let meta = &p.metadata;
    let bad = |field: String, reason: String| error("Pod", meta, field, reason);
    required_name("Pod", meta)?;
    let labels = meta.labels.clone().unwrap_or_default();
    trellis_resources::labels::check("metadata.labels", &labels)
        .map_err(|e| bad(e.field, e.reason))?;
    let spec = p.spec.clone().unwrap_or_default();
    let service_account = spec.service_account_name.clone().filter(|s| !s.is_empty());
    if let Some(sa) = &service_account {
        // The rule Trellis's endpoint validation applies (a DNS subdomain).
        let ok = sa.len() <= 253
            && sa.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            });
        if !ok {
            return Err(bad(
                "spec.serviceAccountName".into(),
                format!("{sa:?} is not a DNS subdomain"),
            ));
        }
    }
    let mut ports = Vec::new();
    let containers = spec.containers.iter().map(|c| ("containers", c));
    let inits = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| ("initContainers", c));
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    for (list, c) in containers.chain(inits) {
        let i = index.entry(list).or_default();
        for (j, port) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.{list}[{i}].ports[{j}]");
            if let Some(p) = container_port(port, &field).map_err(|(f, r)| bad(f, r))? {
                ports.push(p);
            }
        }
        *i += 1;
    }
    let annotations = meta.annotations.clone().unwrap_or_default();
    let annotation = |key: &str| annotations.get(key).map(String::as_str);
    let at = |key: &str| format!("metadata.annotations.{key}");
    let ipam = (|| {
        let mut ipam = PodIpam::default();
        if let Some(v) = annotation(IP_ADDRS) {
            ipam.ip_addrs = ip_addrs(v).map_err(|r| bad(at(IP_ADDRS), r))?;
        }
        if let Some(v) = annotation(IPV4_POOLS) {
            ipam.ipv4_pools = pools(v, true).map_err(|r| bad(at(IPV4_POOLS), r))?;
        }
        if let Some(v) = annotation(IPV6_POOLS) {
            ipam.ipv6_pools = pools(v, false).map_err(|r| bad(at(IPV6_POOLS), r))?;
        }
        if let Some(v) = annotation(IP_ADDRS_NO_IPAM) {
            ipam.ip_addrs_no_ipam = ip_addrs(v).map_err(|r| bad(at(IP_ADDRS_NO_IPAM), r))?;
            if !ipam.ip_addrs.is_empty() {
                // As Calico's plugin: the two say opposite things about IPAM.
                let r = format!("{v:?}: cannot be used together with {IP_ADDRS}");
                return Err(bad(at(IP_ADDRS_NO_IPAM), r));
            }
        }
        if let Some(v) = annotation(FLOATING_IPS) {
            ipam.floating_ips = ip_addrs(v).map_err(|r| bad(at(FLOATING_IPS), r))?;
        }
        Ok(ipam)
    })();
    Ok(PodInfo {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        node: spec.node_name.clone().filter(|n| !n.is_empty()),
        labels,
        service_account,
        ports,
        ipam,
        uid: meta.uid.clone().filter(|u| !u.is_empty()),
        mirror_of: annotation(crate::gc_plan::MIRROR_ANNOTATION)
            .filter(|m| !m.is_empty())
            .map(str::to_string),
    })
}

/// One container port: `Some` when named, checked like the API server does.
fn container_port(
    p: &k8s_openapi::api::core::v1::ContainerPort,
    field: &str,
) -> Result<Option<EndpointPort>, (String, String)> {
    if !(1..=65535).contains(&p.container_port) {
        return Err((
            format!("{field}.containerPort"),
            format!("{} is not a port (1-65535)", p.container_port),
        ));
    }
    let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => RuleProtocol::Tcp,
        "UDP" => RuleProtocol::Udp,
        "SCTP" => RuleProtocol::Sctp,
        other => {
            return Err((
                format!("{field}.protocol"),
                format!("{other:?} is not TCP, UDP or SCTP"),
            ))
        }
    };
    let Some(name) = p.name.as_deref().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    trellis_resources::k8s::valid_port_name(name).map_err(|r| (format!("{field}.name"), r))?;
    Ok(Some(EndpointPort {
        name: name.to_string(),
        protocol,
        // In range: checked above.
        port: p.container_port as u16,
        host_port: None,
        host_ip: None,
    }))
}

/// `ipv4pools` / `ipv6pools`: pool names or CIDRs of the family.
pub use trellis_resources::pod::parse_pools as pools;

/// `ipAddrs` / `ipAddrsNoIpam` / `floatingIPs`: addresses, at most one per family.
pub use trellis_resources::pod::parse_ip_addrs as ip_addrs;

/// What Kubernetes says of a node that Trellis keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// Synced onto the Trellis Node the node's agent registered (pool and BGP peer
    /// `nodeSelector`s read them).
    pub labels: BTreeMap<String, String>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), validated (at most one per family); stored on the
    /// Trellis Node (`spec.podCIDRs`), where the agent's `--use-pod-cidr` makes each its block.
    pub pod_cidrs: Vec<ipnet::IpNet>,
    /// `status.addresses`, validated; not stored: the agent detects and publishes the address
    /// it routes with, as calico-node does.
    pub addresses: Vec<(String, IpAddr)>,
}

/// A Node's labels, podCIDRs and addresses, validated.
pub fn node(n: &Node) -> Result<NodeInfo, TranslateError> {
    let meta = &n.metadata;
    required_name("Node", meta)?;
    let bad = |field: String, reason: String| error("Node", meta, field, reason);
    let labels = meta.labels.clone().unwrap_or_default();
    trellis_resources::labels::check("metadata.labels", &labels)
        .map_err(|e| bad(e.field, e.reason))?;
    let spec = n.spec.clone().unwrap_or_default();
    let cidrs: Vec<(String, String)> = match &spec.pod_cidrs {
        Some(list) if !list.is_empty() => list
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c.clone()))
            .collect(),
        _ => spec
            .pod_cidr
            .iter()
            .map(|c| ("spec.podCIDR".to_string(), c.clone()))
            .collect(),
    };
    let mut pod_cidrs = Vec::new();
    for (field, c) in cidrs {
        let net: ipnet::IpNet = c
            .parse()
            .map_err(|_| bad(field.clone(), format!("{c:?} is not a CIDR")))?;
        if net.trunc() != net {
            return Err(bad(field, format!("{c:?} has host bits set")));
        }
        if pod_cidrs
            .iter()
            .any(|p: &ipnet::IpNet| p.addr().is_ipv4() == net.addr().is_ipv4())
        {
            return Err(bad(field, format!("{c:?}: a second podCIDR of one family")));
        }
        pod_cidrs.push(net);
    }
    let mut addresses = Vec::new();
    let status = n.status.clone().unwrap_or_default();
    for (i, a) in status.addresses.iter().flatten().enumerate() {
        // Hostname, InternalDNS and ExternalDNS entries (the AWS cloud provider sets all
        // three) are names, not addresses.
        if !matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            continue;
        }
        let ip: IpAddr = a.address.parse().map_err(|_| {
            bad(
                format!("status.addresses[{i}].address"),
                format!("{:?} is not an IP address", a.address),
            )
        })?;
        addresses.push((a.type_.clone(), ip));
    }
    Ok(NodeInfo {
        name: meta.name.clone().unwrap_or_default(),
        labels,
        pod_cidrs,
        addresses,
    })
}

/// The annotation on a Trellis Node listing the label keys synced from Kubernetes (so a label
/// removed in Kubernetes is removed, and labels the agent set with `--label` are kept).
pub const KUBE_LABELS: &str = "trellis.dev/kube-labels";

/// Whether a stored object was written by the controller.
pub fn owned(r: &Resource) -> bool {
    r.metadata().annotations.get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
}
