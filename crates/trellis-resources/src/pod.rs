//! The `Pod` kind: Trellis's record of a Kubernetes pod, written by `trellis kube-controller`
//! as soon as the pod exists in the API server (before the kubelet runs the CNI ADD), read by
//! the agent at ADD so the pod's WorkloadEndpoint is born with its labels, service account
//! and named ports — a policy selecting the pod by label applies from the first packet. It
//! also carries the pod's Calico IPAM annotations (`cni.projectcalico.org/ipAddrs`,
//! `ipAddrsNoIpam`, `ipv4pools`, `ipv6pools`, `floatingIPs`), validated, or the reason they
//! were refused. The annotations' names and parsers live here, where both the kube-controller
//! (pods) and the allocator (namespaces' records) find them. Pure: data, validation and the copy
//! onto an endpoint.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{EndpointPort, Object, ResourceError, WorkloadEndpointSpec};

/// What Trellis keeps of a pod (labels and uid are in its metadata).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    /// `spec.nodeName`, once the pod is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Named container ports (what rules' named ports resolve against).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<EndpointPort>,
    /// `cni.projectcalico.org/ipAddrs`: fixed addresses, at most one per family.
    #[serde(default, rename = "ipAddrs", skip_serializing_if = "Vec::is_empty")]
    pub ip_addrs: Vec<IpAddr>,
    /// `cni.projectcalico.org/ipv4pools`: pool names or IPv4 CIDRs.
    #[serde(default, rename = "ipv4Pools", skip_serializing_if = "Vec::is_empty")]
    pub ipv4_pools: Vec<String>,
    /// `cni.projectcalico.org/ipv6pools`: pool names or IPv6 CIDRs.
    #[serde(default, rename = "ipv6Pools", skip_serializing_if = "Vec::is_empty")]
    pub ipv6_pools: Vec<String>,
    /// `cni.projectcalico.org/ipAddrsNoIpam`: addresses given to the pod without IPAM, at most
    /// one per family (honoured only by an agent that enables it).
    #[serde(
        default,
        rename = "ipAddrsNoIpam",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_addrs_no_ipam: Vec<IpAddr>,
    /// `cni.projectcalico.org/floatingIPs`: addresses NATed to the pod's address of the same
    /// family, at most one per family (honoured only by an agent that enables it).
    #[serde(default, rename = "floatingIPs", skip_serializing_if = "Vec::is_empty")]
    pub floating_ips: Vec<IpAddr>,
    /// Why the pod's IPAM annotations were refused (the annotation, its value, the reason):
    /// its ADD fails with this instead of allocating as if the pod had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipam_error: Option<String>,
}

/// Calico's namespace and pod annotations: pools to allocate from (JSON lists of pool names or
/// CIDRs), a pod's fixed addresses, its addresses without IPAM and its floating addresses (JSON
/// lists of addresses).
pub const IPV4_POOLS: &str = "cni.projectcalico.org/ipv4pools";
pub const IPV6_POOLS: &str = "cni.projectcalico.org/ipv6pools";
pub const IP_ADDRS: &str = "cni.projectcalico.org/ipAddrs";
pub const IP_ADDRS_NO_IPAM: &str = "cni.projectcalico.org/ipAddrsNoIpam";
pub const FLOATING_IPS: &str = "cni.projectcalico.org/floatingIPs";

/// A JSON list of strings (Calico's annotation format).
fn string_list(value: &str) -> Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(value)
        .map_err(|e| format!("{value:?} is not a JSON list of strings: {e}"))
}

/// Parses `ipv4pools` / `ipv6pools`: pool names or CIDRs of the family.
pub fn parse_pools(value: &str, v4: bool) -> Result<Vec<String>, String> {
    let list = string_list(value)?;
    check_pools(&list, v4)?;
    Ok(list)
}

/// Parses `ipAddrs` / `ipAddrsNoIpam` / `floatingIPs`: addresses, at most one per family (as
/// Calico's CNI plugin requires).
pub fn parse_ip_addrs(value: &str) -> Result<Vec<IpAddr>, String> {
    let list = string_list(value)?;
    let mut out: Vec<IpAddr> = Vec::new();
    for (i, a) in list.iter().enumerate() {
        let ip: IpAddr = a
            .parse()
            .map_err(|_| format!("[{i}] {a:?} is not an IP address"))?;
        out.push(ip);
    }
    check_ip_addrs(&out)?;
    Ok(out)
}

impl PodSpec {
    /// Whether this record can be the pod a CNI ADD on `node` is for: a record scheduled on
    /// another node is an earlier pod of the same name (a StatefulSet's), not this one.
    pub fn may_run_on(&self, node: &str) -> bool {
        self.node_name.as_deref().is_none_or(|n| n == node)
    }
}

/// The annotation of a static pod's mirror pod naming the static pod's UID — the one the kubelet
/// passes to CNI as `K8S_POD_UID` (the mirror pod's own `metadata.uid` differs).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

impl Object<PodSpec> {
    /// Whether this record is the pod a CNI ADD on `node` is for: not scheduled on another
    /// node ([`PodSpec::may_run_on`]), and — when both the runtime (`K8S_POD_UID`) and the
    /// record name the pod's UID — of the same UID. A pod deleted and created again under
    /// its name (a StatefulSet's) has a new UID; until the kube-controller has written the new
    /// pod's record, the old one's labels and ports are not the new pod's.
    pub fn is_for(&self, node: &str, uid: Option<&str>) -> bool {
        let mirrored = self.metadata.annotations.get(MIRROR_ANNOTATION);
        let same_pod = match (uid, self.metadata.uid.as_deref()) {
            (Some(asked), Some(recorded)) => {
                asked == recorded || mirrored.is_some_and(|m| m == asked)
            }
            _ => true,
        };
        same_pod && self.spec.may_run_on(node)
    }
}

/// Gives a workload endpoint its pod's labels, service account and named ports (nothing else
/// of the endpoint changes). The agent does it when it creates the endpoint at ADD, and the
/// kube-controller whenever the pod changes afterwards.
pub fn stamp_endpoint(
    pod: &Object<PodSpec>,
    labels: &mut std::collections::BTreeMap<String, String>,
    endpoint: &mut WorkloadEndpointSpec,
) {
    labels.clone_from(&pod.metadata.labels);
    endpoint
        .service_account_name
        .clone_from(&pod.spec.service_account_name);
    endpoint.ports.clone_from(&pod.spec.ports);
}

/// Checks a pool list (`ipv4Pools` / `ipv6Pools`): each entry a pool name or a CIDR of the
/// family without host bits. `Err` names the entry by index.
pub fn check_pools(list: &[String], v4: bool) -> Result<(), String> {
    for (i, p) in list.iter().enumerate() {
        if let Ok(net) = p.parse::<ipnet::IpNet>() {
            if matches!(net, ipnet::IpNet::V4(_)) != v4 {
                return Err(format!(
                    "[{i}] {p:?} is not an IPv{} CIDR",
                    if v4 { 4 } else { 6 }
                ));
            }
            if net.trunc() != net {
                return Err(format!("[{i}] {p:?} has host bits set"));
            }
            continue;
        }
        let name_ok = !p.is_empty()
            && p.len() <= 253
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !name_ok {
            return Err(format!("[{i}] {p:?} is neither a CIDR nor a pool name"));
        }
    }
    Ok(())
}

/// Checks fixed addresses (`ipAddrs`): at most one per family, as Calico's plugin requires.
pub fn check_ip_addrs(list: &[IpAddr]) -> Result<(), String> {
    for (i, ip) in list.iter().enumerate() {
        // A pod's address (or floating address: DNATed in prerouting and output, routed to its
        // node from every other) must be one a pod can hold: 127.0.0.1 would take the node's
        // own loopback services, 169.254.169.254 a cloud's metadata service, 0.0.0.0 or a
        // multicast group every node's.
        if let Some(what) = not_unicast(ip) {
            return Err(format!("[{i}] {ip} is {what}, not a pod's unicast address"));
        }
        if list[..i].iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
            return Err(format!("[{i}] {ip}: at most one address per IP family"));
        }
    }
    Ok(())
}

/// Why `ip` can be no pod's address, if it cannot.
fn not_unicast(ip: &IpAddr) -> Option<&'static str> {
    let link_local = match ip {
        IpAddr::V4(v) => v.is_link_local(),
        IpAddr::V6(v) => v.segments()[0] & 0xffc0 == 0xfe80,
    };
    let broadcast = matches!(ip, IpAddr::V4(v) if v.is_broadcast());
    [
        (ip.is_unspecified(), "unspecified"),
        (ip.is_loopback(), "a loopback address"),
        (ip.is_multicast(), "a multicast address"),
        (broadcast, "the broadcast address"),
        (link_local, "link-local"),
    ]
    .into_iter()
    .find_map(|(bad, what)| bad.then_some(what))
}

/// The kind's semantic rules (the names, labels and ports are checked like an endpoint's).
pub(crate) fn validate(o: &Object<PodSpec>) -> Result<(), ResourceError> {
    let err = |f: &str, r: String| ResourceError::field(f, r);
    if o.metadata.namespace.is_none() {
        return Err(err("metadata.namespace", "is required for Pod".into()));
    }
    crate::labels::check("metadata.labels", &o.metadata.labels)?;
    if let Some(n) = &o.spec.node_name {
        crate::validate::name(n, false).map_err(|e| err("spec.nodeName", e.reason))?;
    }
    check_pools(&o.spec.ipv4_pools, true).map_err(|r| err("spec.ipv4Pools", r))?;
    check_pools(&o.spec.ipv6_pools, false).map_err(|r| err("spec.ipv6Pools", r))?;
    check_ip_addrs(&o.spec.ip_addrs).map_err(|r| err("spec.ipAddrs", r))?;
    check_ip_addrs(&o.spec.ip_addrs_no_ipam).map_err(|r| err("spec.ipAddrsNoIpam", r))?;
    check_ip_addrs(&o.spec.floating_ips).map_err(|r| err("spec.floatingIPs", r))?;
    if !o.spec.ip_addrs.is_empty() && !o.spec.ip_addrs_no_ipam.is_empty() {
        return Err(err(
            "spec.ipAddrsNoIpam",
            "cannot be given together with ipAddrs".into(),
        ));
    }
    // The same service account and port rules as the endpoint the record is copied onto.
    let mut endpoint = Object {
        metadata: o.metadata.clone(),
        spec: WorkloadEndpointSpec::default(),
        status: None,
    };
    stamp_endpoint(o, &mut endpoint.metadata.labels, &mut endpoint.spec);
    crate::policy_validate::endpoint_policy_fields(&endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse_documents, Resource};

    fn parse(spec: &str) -> Result<Resource, ResourceError> {
        parse_documents(&format!(
            "apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {{name: db-0, namespace: shop, labels: {{app: db}}, uid: u1}}\nspec: {spec}\n"
        ))
        .map(|mut v| v.remove(0))
    }

    #[test]
    fn a_pod_record_round_trips_under_its_own_prefix() {
        let r = parse("{nodeName: n1, serviceAccountName: db, ports: [{name: pg, protocol: TCP, port: 5432}], ipAddrs: [10.0.0.5], ipv4Pools: [p1, 10.1.0.0/16]}").unwrap();
        assert_eq!(r.key(), "/trellis/v1/pods/shop/db-0");
        let again = Resource::from_value(&r.to_value()).unwrap();
        assert_eq!(again, r);
        let Resource::Pod(p) = r else { panic!() };
        assert!(p.spec.may_run_on("n1") && !p.spec.may_run_on("n2"));
        let mut labels = Default::default();
        let mut w = WorkloadEndpointSpec {
            node: "n1".into(),
            container_id: Some("c".into()),
            ..Default::default()
        };
        stamp_endpoint(&p, &mut labels, &mut w);
        assert_eq!(labels, p.metadata.labels);
        assert_eq!(w.service_account_name.as_deref(), Some("db"));
        assert_eq!(w.ports, p.spec.ports);
        assert_eq!(w.container_id.as_deref(), Some("c"), "the rest is kept");
    }

    #[test]
    fn a_record_is_the_pod_of_its_uid_or_of_the_static_pod_it_mirrors() {
        let Resource::Pod(mut p) = parse("{nodeName: n1}").unwrap() else {
            panic!()
        };
        assert!(p.is_for("n1", Some("u1")) && p.is_for("n1", None));
        assert!(
            !p.is_for("n1", Some("u2")),
            "an earlier pod of the same name"
        );
        assert!(!p.is_for("n2", Some("u1")), "scheduled elsewhere");
        // A mirror pod: the kubelet passes the static pod's UID, which the mirror names.
        p.metadata
            .annotations
            .insert(MIRROR_ANNOTATION.into(), "static-hash".into());
        assert!(p.is_for("n1", Some("static-hash")));
        assert!(!p.is_for("n1", Some("other-hash")));
    }

    #[test]
    fn bad_records_are_refused_naming_the_field() {
        for (spec, field) in [
            ("{ipv4Pools: [fd00::/64]}", "spec.ipv4Pools"),
            ("{ipv6Pools: [Bad_Name]}", "spec.ipv6Pools"),
            ("{ipAddrs: [10.0.0.1, 10.0.0.2]}", "spec.ipAddrs"),
            ("{nodeName: \"a b\"}", "spec.nodeName"),
            ("{floatingIPs: [1.1.1.1, 2.2.2.2]}", "spec.floatingIPs"),
            ("{floatingIPs: [127.0.0.1]}", "spec.floatingIPs"),
            ("{floatingIPs: [169.254.169.254]}", "spec.floatingIPs"),
            ("{floatingIPs: [\"::1\"]}", "spec.floatingIPs"),
            ("{floatingIPs: [\"fe80::1\"]}", "spec.floatingIPs"),
            ("{floatingIPs: [0.0.0.0]}", "spec.floatingIPs"),
            ("{ipAddrsNoIpam: [224.0.0.1]}", "spec.ipAddrsNoIpam"),
            ("{ipAddrsNoIpam: [255.255.255.255]}", "spec.ipAddrsNoIpam"),
            (
                "{ipAddrs: [10.0.0.1], ipAddrsNoIpam: [10.0.0.2]}",
                "spec.ipAddrsNoIpam",
            ),
            ("{bogus: 1}", "bogus"),
        ] {
            let e = parse(spec).expect_err(spec);
            assert!(e.to_string().contains(field), "{spec}: {e}");
        }
        let no_ns = parse_documents(
            "apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {name: a}\nspec: {}\n",
        );
        // Namespaced kinds default to `default`, as the API server does.
        assert_eq!(no_ns.unwrap()[0].key(), "/trellis/v1/pods/default/a");
    }
}
