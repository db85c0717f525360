//! What the lab writes for a topology: the resources it applies (IPPools, the BGPConfiguration,
//! Nodes with BGP settings, a BGPPeer per daemon–node session, Namespaces, the topology's own
//! documents) and the policies it applies once the pods serve, built as typed
//! `trellis_resources` values and validated as `trellis apply` would validate them, and the
//! configuration its BGP daemons get. Pure.

use std::collections::BTreeMap;

use serde_json::Value;
use trellis_resources::{
    validate::check_pool_overlap, BgpConfigurationSpec, BgpPassword, BgpPeerSpec, Encapsulation,
    IpPoolSpec, Metadata, NodeBgpSpec, NodeSpec, Object, Resource, ResourceError,
};

use crate::daemons::{DaemonConfig, DaemonPeer};
use crate::topology::{host, Addrs, DaemonSpec, LabNamespace, Topology, ROUTER_HOST};
use crate::LabError;

/// Calico's default AS, used by nodes without one of their own or the lab's.
const DEFAULT_ASN: u32 = 64512;

/// The values `encapsulation` may take (Calico's).
pub const ENCAPSULATIONS: &str = "None, VXLAN, VXLANCrossSubnet, IPIP or IPIPCrossSubnet";

/// A pool's `encapsulation` as the typed value.
pub fn encapsulation(s: &str) -> Option<Encapsulation> {
    serde_json::from_value(Value::String(s.to_string())).ok()
}

fn object<S>(name: &str, labels: BTreeMap<String, String>, spec: S) -> Object<S> {
    Object {
        metadata: Metadata {
            name: name.to_string(),
            labels,
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// A resource and the topology field it comes from (`pools[0]`, `external[1].bgp`, ...), for
/// errors that point at what the user wrote.
struct Made {
    origin: String,
    resource: Resource,
}

/// Maps a resource's validation error onto the topology field it was built from.
fn from_resource(origin: &str, e: ResourceError) -> LabError {
    let leaf = ["spec.bgp.", "spec.", "metadata."]
        .iter()
        .find_map(|p| e.field.strip_prefix(p))
        .unwrap_or(&e.field);
    LabError::invalid(format!("{origin}.{leaf}"), "", e.reason)
}

/// Every resource `up` applies, in order, each validated; pools may not overlap and no two
/// objects may share a key.
pub fn build(t: &Topology, addrs: &Addrs) -> Result<Vec<Resource>, LabError> {
    let mut made = generated(t, addrs)?;
    for m in &made {
        m.resource
            .validate()
            .map_err(|e| from_resource(&m.origin, e))?;
    }
    if let Some(text) = &t.resources {
        let docs = trellis_resources::parse_documents(text)
            .map_err(|e| LabError::invalid("resources", "", e.to_string()))?;
        for (i, r) in docs.into_iter().enumerate() {
            made.push(Made {
                origin: format!("resources document {}", i + 1),
                resource: r,
            });
        }
    }
    let mut keys: BTreeMap<String, String> = BTreeMap::new();
    let mut pools: Vec<Object<IpPoolSpec>> = Vec::new();
    for m in &made {
        claim_key(&mut keys, m)?;
        if let Resource::IpPool(p) = &m.resource {
            check_pool_overlap(p, &pools).map_err(|e| from_resource(&m.origin, e))?;
            pools.push(p.clone());
        }
    }
    Ok(made.into_iter().map(|m| m.resource).collect())
}

/// Records a resource's datastore key; a second object with the same key is an error naming
/// both origins.
fn claim_key(keys: &mut BTreeMap<String, String>, m: &Made) -> Result<(), LabError> {
    if let Some(first) = keys.insert(m.resource.key(), m.origin.clone()) {
        return Err(LabError::invalid(
            m.origin.clone(),
            "",
            format!(
                "{}/{} is already made by {first}",
                m.resource.kind(),
                m.resource.metadata().name
            ),
        ));
    }
    Ok(())
}

/// The topology's `policies:` documents, each validated as `trellis apply` would, none with the
/// key of a resource the lab makes.
pub fn policies(t: &Topology, resources: &[Resource]) -> Result<Vec<Resource>, LabError> {
    let Some(text) = &t.policies else {
        return Ok(Vec::new());
    };
    let docs = trellis_resources::parse_documents(text)
        .map_err(|e| LabError::invalid("policies", "", e.to_string()))?;
    let mut keys: BTreeMap<String, String> = resources
        .iter()
        .map(|r| (r.key(), "the lab's resources".to_string()))
        .collect();
    for (i, r) in docs.iter().enumerate() {
        claim_key(
            &mut keys,
            &Made {
                origin: format!("policies document {}", i + 1),
                resource: r.clone(),
            },
        )?;
    }
    Ok(docs)
}

/// The `v1` Namespace object for a lab namespace (its labels; the implicit
/// `kubernetes.io/metadata.name` is the translator's to add), so namespace selectors see the
/// labels the topology gives.
pub fn namespace_resource(ns: &LabNamespace) -> Option<Resource> {
    Some(Resource::Namespace(object(
        &ns.name,
        ns.labels.clone(),
        trellis_resources::k8s::NamespaceSpec::default(),
    )))
}

/// The resources the topology asks for (not yet validated).
fn generated(t: &Topology, addrs: &Addrs) -> Result<Vec<Made>, LabError> {
    let mut out = Vec::new();
    // On the Kubernetes path the namespaces are API objects, mirrored by the kube-controller.
    let namespaces = if t.kubernetes.is_some() {
        &[][..]
    } else {
        &t.namespaces[..]
    };
    for (i, n) in namespaces.iter().enumerate() {
        if let Some(resource) = namespace_resource(n) {
            out.push(Made {
                origin: format!("namespaces[{i}]"),
                resource,
            });
        }
    }
    for (i, p) in t.pools.iter().enumerate() {
        let enc = encapsulation(&p.encapsulation).ok_or_else(|| {
            LabError::invalid(
                format!("pools[{i}].encapsulation"),
                format!("{:?}", p.encapsulation),
                format!("must be {ENCAPSULATIONS}"),
            )
        })?;
        let spec = IpPoolSpec {
            cidr: p.cidr,
            block_size: p.block_size,
            encapsulation: Some(enc),
            ipip_mode: None,
            vxlan_mode: None,
            nat_outgoing: p.nat_outgoing,
            disabled: false,
            node_selector: p.node_selector.clone(),
            disable_bgp_export: false,
            allowed_uses: Vec::new(),
            assignment_mode: None,
        };
        out.push(Made {
            origin: format!("pools[{i}]"),
            resource: Resource::IpPool(object(&p.name, BTreeMap::new(), spec)),
        });
    }
    if let Some(b) = &t.bgp {
        let spec = BgpConfigurationSpec {
            as_number: b.as_number,
            node_to_node_mesh_enabled: Some(b.node_to_node_mesh),
            ..Default::default()
        };
        out.push(Made {
            origin: "bgp".into(),
            resource: Resource::BgpConfiguration(object("default", BTreeMap::new(), spec)),
        });
    }
    for (i, n) in t.nodes.iter().enumerate() {
        if n.as_number.is_none() && n.route_reflector_cluster_id.is_none() {
            continue;
        }
        let spec = NodeSpec {
            bgp: Some(NodeBgpSpec {
                as_number: n.as_number,
                route_reflector_cluster_id: n.route_reflector_cluster_id.clone(),
                ..Default::default()
            }),
            ..Default::default()
        };
        out.push(Made {
            origin: format!("nodes[{i}]"),
            resource: Resource::Node(object(&n.name, n.labels.clone(), spec)),
        });
    }
    for (origin, name, b) in speakers(t) {
        let conf = daemon_config(t, addrs, name, b);
        for p in conf
            .peers
            .iter()
            .filter(|p| t.nodes.iter().any(|n| n.name == p.name))
        {
            let spec = BgpPeerSpec {
                node: Some(p.name.clone()),
                peer_ip: Some(p.local.to_string()),
                as_number: Some(b.as_number),
                password: b.password.clone().map(BgpPassword::Inline),
                ttl_security: b.ttl_security.map(u32::from),
                ..Default::default()
            };
            out.push(Made {
                origin: origin.clone(),
                resource: Resource::BgpPeer(object(
                    &format!("lab-{name}-{}", p.name),
                    BTreeMap::new(),
                    spec,
                )),
            });
        }
    }
    Ok(out)
}

/// The members running a BGP daemon: (topology field, member name, daemon settings).
pub fn speakers(t: &Topology) -> Vec<(String, &str, &DaemonSpec)> {
    let externals = t.external.iter().enumerate().filter_map(|(i, e)| {
        e.bgp
            .as_ref()
            .map(|b| (format!("external[{i}].bgp"), e.name.as_str(), b))
    });
    let router = t
        .router
        .as_ref()
        .and_then(|r| r.bgp.as_ref())
        .map(|b| ("router.bgp".to_string(), "router", b));
    externals.chain(router).collect()
}

/// The AS a node uses: its own, the lab's, or Calico's default.
fn node_asn(t: &Topology, node: &str) -> u32 {
    t.nodes
        .iter()
        .find(|n| n.name == node)
        .and_then(|n| n.as_number)
        .or(t.bgp.as_ref().and_then(|b| b.as_number))
        .unwrap_or(DEFAULT_ASN)
}

/// The subnets a member is on: the router is on all of them (as .1).
fn member_nets(t: &Topology, addrs: &Addrs, member: &str) -> Vec<(ipnet::IpNet, std::net::IpAddr)> {
    if member == "router" {
        t.subnets
            .iter()
            .map(|s| (s.cidr, host(&s.cidr, ROUTER_HOST)))
            .collect()
    } else {
        vec![addrs[member]]
    }
}

/// What a BGP daemon on `name` (an external or the router) peers with, and from which address.
/// The topology must be validated (every peer is a node or a speaker).
pub fn daemon_config(t: &Topology, addrs: &Addrs, name: &str, b: &DaemonSpec) -> DaemonConfig {
    let mine = member_nets(t, addrs, name);
    let speaker_asn = |p: &str| {
        speakers(t)
            .into_iter()
            .find(|(_, n, _)| *n == p)
            .map(|(_, _, d)| d.as_number)
    };
    let peers = b
        .peers
        .iter()
        .map(|p| {
            let theirs = member_nets(t, addrs, p);
            // A shared subnet if there is one (direct session), else first addresses (multihop).
            let shared = mine.iter().find_map(|(net, local)| {
                theirs
                    .iter()
                    .find(|(_, a)| net.contains(a))
                    .map(|(_, a)| (*local, *a))
            });
            let (local, address) = shared.unwrap_or((mine[0].1, theirs[0].1));
            DaemonPeer {
                name: p.clone(),
                address,
                local,
                asn: speaker_asn(p).unwrap_or_else(|| node_asn(t, p)),
                multihop: shared.is_none(),
            }
        })
        .collect();
    DaemonConfig {
        address: mine[0].1,
        asn: b.as_number,
        route_reflector: b.route_reflector,
        route_server: b.route_server,
        password: b.password.clone(),
        ttl_security: b.ttl_security,
        peers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{addresses, decode};

    fn built(yaml: &str) -> Result<Vec<Resource>, LabError> {
        let t = decode(yaml).unwrap();
        build(&t, &addresses(&t))
    }

    const BASE: &str =
        "name: x\nsubnets: [{name: s, cidr: 192.168.0.0/24}]\nnodes: [{name: n, subnet: s}]\n";

    #[test]
    fn pools_are_typed_and_a_newline_in_a_name_is_refused() {
        let r = built(&format!(
            "{BASE}pools: [{{name: p, cidr: 10.0.0.0/16, blockSize: 28, nodeSelector: \"a == 'b'\"}}]\n"
        ))
        .unwrap();
        let v = r[0].to_value();
        assert_eq!(v["spec"]["encapsulation"], "VXLAN");
        assert_eq!(v["spec"]["blockSize"], 28);
        assert_eq!(v["spec"]["nodeSelector"], "a == 'b'");
        let e = built(&format!(
            "{BASE}pools: [{{name: \"p\\nkind: BGPPeer\", cidr: 10.0.0.0/16}}]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("pools[0].name: "), "{e}");
    }

    #[test]
    fn user_resources_may_not_redefine_the_labs_own() {
        let e = built(&format!(
            "{BASE}pools: [{{name: p, cidr: 10.0.0.0/16}}]\nresources: |\n  apiVersion: trellis.dev/v1\n  kind: IPPool\n  metadata: {{name: p}}\n  spec: {{cidr: 10.1.0.0/16}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resources document 1") && e.contains("already made by pools[0]"),
            "{e}"
        );
        let e = built(&format!(
            "{BASE}pools: [{{name: p, cidr: 10.0.0.0/16}}]\nresources: |\n  apiVersion: trellis.dev/v1\n  kind: IPPool\n  metadata: {{name: q}}\n  spec: {{cidr: 10.0.128.0/17}}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("resources document 1.cidr") && e.contains("overlaps pool p"),
            "{e}"
        );
    }
}
