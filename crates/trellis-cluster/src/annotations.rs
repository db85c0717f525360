//! What an attachment asks of IPAM once its pod's and namespace's records are read: Calico's
//! annotations, with Calico's precedence — the pod's `ipv4pools`/`ipv6pools` over its
//! namespace's over the CNI configuration's; the pod's `ipAddrs` when the runtime asked for no
//! address; `ipAddrsNoIpam` and `floatingIPs` only where the agent enables them (Calico's
//! `feature_control`). Every refusal names the object, the annotation and its value. Pure.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use trellis_ipam::cluster::Pool;
use trellis_resources::pod::{self, PodSpec};
use trellis_resources::{IpNat, NamespaceSpec, NodeSpec, Object, WorkloadEndpointSpec};
use trellis_store::Precondition;

use crate::ipam::Request;
use crate::ClusterError;

/// What the agent enables beyond plain IPAM (Calico's CNI `feature_control`); both off by
/// default, as in Calico.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `cni.projectcalico.org/ipAddrsNoIpam` (Calico: `ip_addrs_no_ipam`).
    pub ip_addrs_no_ipam: bool,
    /// `cni.projectcalico.org/floatingIPs` (Calico: `floating_ips`).
    pub floating_ips: bool,
}

/// The agent flag that enables `ipAddrsNoIpam`.
pub const NO_IPAM_FLAG: &str = "--allow-ip-addrs-no-ipam";
/// The agent flag that enables `floatingIPs`.
pub const FLOATING_IPS_FLAG: &str = "--allow-floating-ips";

/// An annotation an allocation follows, for naming it in errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// `pod NS/NAME` or `namespace NS`.
    pub object: String,
    pub annotation: &'static str,
    pub value: String,
}

impl Source {
    /// The error of this annotation for `reason`.
    pub fn error(&self, reason: impl Into<String>) -> ClusterError {
        ClusterError::Annotation {
            annotation: Box::new(self.clone()),
            reason: reason.into(),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: annotation {}={}",
            self.object, self.annotation, self.value
        )
    }
}

/// What the allocation asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Asked {
    /// The request with the annotations' pools and fixed addresses filled in.
    pub req: Request,
    /// Where the IPv4 and IPv6 pool lists came from, when from an annotation.
    pub pools_from: [Option<Source>; 2],
    /// `ipAddrsNoIpam`: the pod's addresses, given without any allocation.
    pub no_ipam: Vec<IpAddr>,
    /// The `ipAddrsNoIpam` annotation, when given.
    pub no_ipam_from: Option<Source>,
    /// `floatingIPs`, with the annotation (its pod's address of each family is the internal
    /// address).
    pub floating: Option<(Vec<IpAddr>, Source)>,
}

fn list_value<T: ToString>(list: &[T]) -> String {
    let strings: Vec<String> = list.iter().map(ToString::to_string).collect();
    serde_json::to_string(&strings).unwrap_or_default()
}

/// A namespace record's pool annotation of one family, parsed; a value that does not parse is
/// an error naming it (the record may have been written by `trellis apply`, unchecked).
fn namespace_pools(
    ns: &Object<NamespaceSpec>,
    v4: bool,
) -> Result<Option<(Vec<String>, Source)>, ClusterError> {
    let annotation = if v4 { pod::IPV4_POOLS } else { pod::IPV6_POOLS };
    let Some(value) = ns.metadata.annotations.get(annotation) else {
        return Ok(None);
    };
    let source = Source {
        object: format!("namespace {}", ns.metadata.name),
        annotation,
        value: value.clone(),
    };
    let pools = pod::parse_pools(value, v4).map_err(|r| source.error(r))?;
    Ok((!pools.is_empty()).then_some((pools, source)))
}

/// What `req` asks for with its pod's record (`pod`) and its namespace's (`namespace`) read,
/// under `features`.
pub fn asked(
    req: &Request,
    pod: Option<&Object<PodSpec>>,
    namespace: Option<&Object<NamespaceSpec>>,
    features: Features,
) -> Result<Asked, ClusterError> {
    let mut out = Asked {
        req: req.clone(),
        ..Default::default()
    };
    let pod_name = |p: &Object<PodSpec>| {
        format!(
            "pod {}/{}",
            p.metadata.namespace.as_deref().unwrap_or("default"),
            p.metadata.name
        )
    };
    if let Some(p) = pod {
        if let Some(e) = &p.spec.ipam_error {
            return Err(ClusterError::PodIpamRefused {
                pod: pod_name(p),
                reason: e.clone(),
            });
        }
    }
    for v4 in [true, false] {
        let (asked, i) = match v4 {
            true => (&mut out.req.ipv4_pools, 0),
            false => (&mut out.req.ipv6_pools, 1),
        };
        let own = pod.map(|p| match v4 {
            true => (&p.spec.ipv4_pools, pod::IPV4_POOLS),
            false => (&p.spec.ipv6_pools, pod::IPV6_POOLS),
        });
        if let (Some((list, annotation)), Some(p)) = (own, pod) {
            if !list.is_empty() {
                asked.clone_from(list);
                out.pools_from[i] = Some(Source {
                    object: pod_name(p),
                    annotation,
                    value: list_value(list),
                });
                continue;
            }
        }
        if let Some(ns) = namespace {
            if let Some((list, source)) = namespace_pools(ns, v4)? {
                *asked = list;
                out.pools_from[i] = Some(source);
            }
        }
    }
    let Some(p) = pod else { return Ok(out) };
    if out.req.requested_ips.is_empty() {
        out.req.requested_ips.clone_from(&p.spec.ip_addrs);
    }
    if !p.spec.ip_addrs_no_ipam.is_empty() {
        let source = Source {
            object: pod_name(p),
            annotation: pod::IP_ADDRS_NO_IPAM,
            value: list_value(&p.spec.ip_addrs_no_ipam),
        };
        if !features.ip_addrs_no_ipam {
            return Err(disabled(&source, "ip_addrs_no_ipam", NO_IPAM_FLAG));
        }
        if !req.requested_ips.is_empty() {
            return Err(source.error(format!(
                "the runtime asked for addresses too ({})",
                list_value(&req.requested_ips)
            )));
        }
        out.no_ipam.clone_from(&p.spec.ip_addrs_no_ipam);
        out.no_ipam_from = Some(source);
    }
    if !p.spec.floating_ips.is_empty() {
        let source = Source {
            object: pod_name(p),
            annotation: pod::FLOATING_IPS,
            value: list_value(&p.spec.floating_ips),
        };
        if !features.floating_ips {
            return Err(disabled(&source, "floating_ips", FLOATING_IPS_FLAG));
        }
        out.floating = Some((p.spec.floating_ips.clone(), source));
    }
    Ok(out)
}

fn disabled(source: &Source, feature: &'static str, flag: &'static str) -> ClusterError {
    ClusterError::FeatureDisabled {
        annotation: Box::new(source.clone()),
        feature,
        flag,
    }
}

/// The endpoint's `ipNATs` for the floating addresses asked: each NATed to the pod's address of
/// its family; a floating address of a family the pod has no address of is an error.
pub fn ip_nats(asked: &Asked, ips: &[(IpAddr, IpNet)]) -> Result<Vec<IpNat>, ClusterError> {
    let Some((floating, source)) = &asked.floating else {
        return Ok(Vec::new());
    };
    floating
        .iter()
        .map(|ext| {
            let internal = ips
                .iter()
                .map(|(ip, _)| *ip)
                .find(|ip| ip.is_ipv4() == ext.is_ipv4())
                .ok_or_else(|| {
                    source.error(format!(
                        "{ext}: the pod has no IPv{} address to NAT it to",
                        if ext.is_ipv4() { 4 } else { 6 }
                    ))
                })?;
            if ips.iter().any(|(ip, _)| ip == ext) {
                return Err(source.error(format!("{ext} is the pod's own address")));
            }
            Ok(IpNat {
                internal_ip: internal,
                external_ip: *ext,
            })
        })
        .collect()
}

/// What an address taken outside IPAM (`ipAddrsNoIpam`, `floatingIPs`) requires so that no
/// other live attachment holds it: it lies in no block any node has claimed (`claimed`: IPAM
/// has handed it out, or may — refused naming the annotation), and, at commit, none is claimed
/// over it since (for each pool containing it, the block of the pool's size is absent). Without
/// this a pod takes another's address, and a floating address's /32 host route — more specific
/// than the block's — draws the other pod's traffic on every node.
pub fn outside_ipam(
    asked: &Asked,
    claimed: &HashSet<IpNet>,
    pools: &[Pool],
) -> Result<Vec<Precondition>, ClusterError> {
    let given = asked
        .no_ipam_from
        .iter()
        .flat_map(|s| asked.no_ipam.iter().map(move |ip| (ip, s)));
    let floating = asked
        .floating
        .iter()
        .flat_map(|(ips, s)| ips.iter().map(move |ip| (ip, s)));
    let mut guards = Vec::new();
    for (ip, source) in given.chain(floating) {
        if let Some(block) = claimed.iter().find(|b| b.contains(ip)) {
            return Err(source.error(format!(
                "{ip} is inside IPAM block {block}: IPAM hands its addresses to other pods"
            )));
        }
        for p in pools.iter().filter(|p| p.spec.cidr.contains(ip)) {
            if let Ok(block) = IpNet::new(*ip, p.spec.block_prefix()) {
                let g = Precondition::Absent(crate::ipam::block_key(&block.trunc()));
                if !guards.contains(&g) {
                    guards.push(g);
                }
            }
        }
    }
    Ok(guards)
}

/// Who else holds an address taken outside IPAM (`ipAddrsNoIpam`, `floatingIPs`): a node
/// (any of its addresses: its /32 route to the pod's node, on every other node, would take the
/// node's traffic), or another endpoint (`others`: its addresses and floating addresses).
/// Refused naming the annotation.
pub fn not_held_elsewhere(
    asked: &Asked,
    nodes: &[Object<NodeSpec>],
    others: &[Object<WorkloadEndpointSpec>],
) -> Result<(), ClusterError> {
    let given = asked
        .no_ipam_from
        .iter()
        .flat_map(|s| asked.no_ipam.iter().map(move |ip| (ip, s)));
    let floating = asked
        .floating
        .iter()
        .flat_map(|(ips, s)| ips.iter().map(move |ip| (ip, s)));
    for (ip, source) in given.chain(floating) {
        if let Some(n) = nodes.iter().find(|n| node_addresses(&n.spec).contains(ip)) {
            return Err(source.error(format!("{ip} is node {}'s address", n.metadata.name)));
        }
        let held = |w: &&Object<WorkloadEndpointSpec>| {
            w.spec.ip_networks.iter().any(|n| n.addr() == *ip)
                || w.spec.ip_nats.iter().any(|n| n.external_ip == *ip)
        };
        if let Some(w) = others.iter().find(held) {
            return Err(source.error(format!(
                "{ip} is held by workload endpoint {}/{}",
                w.metadata.namespace.as_deref().unwrap_or("default"),
                w.metadata.name
            )));
        }
    }
    Ok(())
}

/// Every address a node is known by.
fn node_addresses(n: &NodeSpec) -> Vec<IpAddr> {
    let listed = n.addresses.iter().filter_map(|a| {
        a.address
            .parse::<IpAddr>()
            .ok()
            .or_else(|| a.address.parse::<IpNet>().ok().map(|n| n.addr()))
    });
    let bgp = n
        .bgp
        .iter()
        .flat_map(|b| [b.ipv4_address, b.ipv6_address])
        .flatten()
        .map(|n| n.addr());
    listed.chain(bgp).chain(n.ipv4_vxlan_tunnel_addr).collect()
}

/// The host prefix of `ip` (/32 or /128): how an address given without IPAM is reported.
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resources::Metadata;

    fn pod(spec: PodSpec) -> Object<PodSpec> {
        Object {
            metadata: Metadata {
                name: "p".into(),
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec,
            status: None,
        }
    }

    fn ns(annotations: &[(&str, &str)]) -> Object<NamespaceSpec> {
        Object {
            metadata: Metadata {
                name: "shop".into(),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            },
            spec: NamespaceSpec::default(),
            status: None,
        }
    }

    #[test]
    fn the_pods_pools_beat_the_namespaces_which_beat_the_configurations() {
        let req = Request {
            ipv4_pools: vec!["conf".into()],
            ..Default::default()
        };
        let n = ns(&[(pod::IPV4_POOLS, "[\"b\"]"), (pod::IPV6_POOLS, "[\"b6\"]")]);
        let plain = pod(PodSpec::default());
        let a = asked(&req, Some(&plain), Some(&n), Features::default()).unwrap();
        assert_eq!(a.req.ipv4_pools, ["b"]);
        assert_eq!(a.req.ipv6_pools, ["b6"]);
        assert_eq!(a.pools_from[0].as_ref().unwrap().object, "namespace shop");
        let own = pod(PodSpec {
            ipv4_pools: vec!["a".into()],
            ..Default::default()
        });
        let a = asked(&req, Some(&own), Some(&n), Features::default()).unwrap();
        assert_eq!(a.req.ipv4_pools, ["a"]);
        assert_eq!(a.req.ipv6_pools, ["b6"], "per family");
        let a = asked(&req, None, None, Features::default()).unwrap();
        assert_eq!(a.req.ipv4_pools, ["conf"]);
        assert_eq!(a.pools_from, [None, None]);
    }

    #[test]
    fn a_bad_namespace_annotation_is_an_error_naming_it() {
        let n = ns(&[(pod::IPV4_POOLS, "b")]);
        let e = asked(&Request::default(), None, Some(&n), Features::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("namespace shop")
                && msg.contains(pod::IPV4_POOLS)
                && msg.contains("\"b\""),
            "{msg}"
        );
    }

    #[test]
    fn features_off_refuse_their_annotations() {
        let p = pod(PodSpec {
            ip_addrs_no_ipam: vec!["192.0.2.7".parse().unwrap()],
            ..Default::default()
        });
        let e = asked(&Request::default(), Some(&p), None, Features::default()).unwrap_err();
        assert!(e.to_string().contains(NO_IPAM_FLAG), "{e}");
        let on = Features {
            ip_addrs_no_ipam: true,
            ..Default::default()
        };
        let a = asked(&Request::default(), Some(&p), None, on).unwrap();
        assert_eq!(a.no_ipam, p.spec.ip_addrs_no_ipam);
        let f = pod(PodSpec {
            floating_ips: vec!["203.0.113.9".parse().unwrap()],
            ..Default::default()
        });
        let e = asked(&Request::default(), Some(&f), None, Features::default()).unwrap_err();
        assert!(e.to_string().contains(FLOATING_IPS_FLAG), "{e}");
    }

    #[test]
    fn floating_addresses_need_a_pod_address_of_their_family() {
        let f = pod(PodSpec {
            floating_ips: vec!["fd00::9".parse().unwrap()],
            ..Default::default()
        });
        let on = Features {
            floating_ips: true,
            ..Default::default()
        };
        let a = asked(&Request::default(), Some(&f), None, on).unwrap();
        let v4: IpAddr = "10.0.0.5".parse().unwrap();
        let e = ip_nats(&a, &[(v4, "10.0.0.0/26".parse().unwrap())]).unwrap_err();
        assert!(e.to_string().contains("no IPv6 address"), "{e}");
        let v6: IpAddr = "fd00:1::5".parse().unwrap();
        let nats = ip_nats(&a, &[(v4, host_net(v4)), (v6, host_net(v6))]).unwrap();
        assert_eq!(nats[0].internal_ip, v6);
    }
}
