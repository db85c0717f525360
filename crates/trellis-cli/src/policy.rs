//! `trellis policy trace|show`: reads the policy objects, builds the model
//! ([`trellis_policy::translate`]) and asks the evaluator. I/O: datastore reads, stdout.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use trellis_cluster::objects;
use trellis_policy::eval::{self, Flow, Peer};
use trellis_policy::model::{Direction, Endpoint, IcmpMatch, Model, Protocol};
use trellis_resources::{Kind, Resource};
use trellis_store::Datastore;

use crate::trace;

/// The kinds the model is built from.
const POLICY_KINDS: [Kind; 14] = trellis_policy::translate::INPUT_KINDS;

/// The model, and every node's addresses (to tell host traffic apart). Records that do not
/// decode, and objects the model leaves out, are reported on stderr.
pub async fn load(store: &dyn Datastore) -> Result<(Model, BTreeMap<String, Vec<IpAddr>>)> {
    let mut all: Vec<Resource> = Vec::new();
    for k in POLICY_KINDS {
        let l = objects::list_checked(store, k).await?;
        for i in &l.invalid {
            eprintln!(
                "warning: stored record {} is invalid and left out: {}",
                i.key, i.reason
            );
        }
        all.extend(l.items.into_iter().map(|s| s.resource));
    }
    let t = trellis_policy::translate::translate(&all);
    for s in &t.skipped {
        eprintln!(
            "warning: {} is left out of the policy model: {}",
            s.object, s.reason
        );
    }
    let mut nodes = BTreeMap::new();
    for (n, _) in objects::nodes(store).await? {
        let addrs = trellis_policy::translate::node_addresses(&n.spec);
        nodes.insert(n.metadata.name, addrs);
    }
    Ok((t.model, nodes))
}

/// A pod's endpoint: `NS/POD` names the pod (or an endpoint by name). A pod with several
/// interfaces has several endpoints; the first by name is taken.
pub fn pod_endpoint<'m>(model: &'m Model, text: &str) -> Result<&'m Endpoint> {
    let Some((ns, pod)) = text.split_once('/') else {
        bail!("{text:?}: give a pod as NAMESPACE/NAME");
    };
    let in_ns = || model.endpoints.values().filter(|e| e.namespace == ns);
    in_ns()
        .find(|e| e.pod.as_deref() == Some(pod))
        .or_else(|| in_ns().find(|e| e.name == pod))
        .with_context(|| format!("no endpoint of pod {ns}/{pod} (is it running?)"))
}

/// `NS/POD`, a pod's address, a node's address, or any address.
fn peer(model: &Model, nodes: &BTreeMap<String, Vec<IpAddr>>, text: &str) -> Result<Peer> {
    if let Ok(a) = text.parse::<IpAddr>() {
        if eval::endpoint_at(model, a).is_some() {
            return Ok(Peer::Address(a));
        }
        if let Some((n, _)) = nodes.iter().find(|(_, addrs)| addrs.contains(&a)) {
            return Ok(Peer::Node {
                node: n.clone(),
                address: a,
            });
        }
        return Ok(Peer::Address(a));
    }
    let e = pod_endpoint(model, text)?;
    Ok(Peer::Endpoint {
        namespace: e.namespace.clone(),
        name: e.name.clone(),
    })
}

pub struct TraceArgs {
    pub src: String,
    pub dst: String,
    pub port: Option<u16>,
    pub protocol: String,
    pub source_port: Option<u16>,
    pub icmp_type: Option<u8>,
    pub icmp_code: Option<u8>,
    pub output: String,
    /// `--kernel`: read the deciding rules' counters (`Some(lab)` when a lab is targeted).
    pub kernel: Option<Option<String>>,
}

/// Builds the flow a trace asks about; the text names it.
fn flow(
    model: &Model,
    nodes: &BTreeMap<String, Vec<IpAddr>>,
    a: &TraceArgs,
) -> Result<(Flow, String)> {
    let protocol = match a.protocol.as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "icmp" => Protocol::Icmp,
        _ => Protocol::Icmpv6,
    };
    let icmp = matches!(protocol, Protocol::Icmp | Protocol::Icmpv6);
    if icmp && (a.port.is_some() || a.source_port.is_some()) {
        bail!("--port and --source-port are for TCP, UDP and SCTP; ICMP has --icmp-type and --icmp-code");
    }
    if !icmp && (a.icmp_type.is_some() || a.icmp_code.is_some()) {
        bail!("--icmp-type and --icmp-code go with --protocol icmp or icmpv6");
    }
    if !icmp && a.port.is_none() {
        bail!("--port is required for --protocol {}", a.protocol);
    }
    let icmp_match = icmp.then(|| IcmpMatch {
        icmp_type: a
            .icmp_type
            .unwrap_or(if protocol == Protocol::Icmp { 8 } else { 128 }),
        code: Some(a.icmp_code.unwrap_or(0)),
    });
    let what = match (&icmp_match, a.port) {
        (Some(m), _) => format!(
            "{} type {} code {}",
            trace::protocol(protocol),
            m.icmp_type,
            m.code.unwrap_or(0)
        ),
        (None, Some(p)) => format!("{} port {p}", trace::protocol(protocol)),
        (None, None) => trace::protocol(protocol),
    };
    let f = Flow {
        source: peer(model, nodes, &a.src)?,
        destination: peer(model, nodes, &a.dst)?,
        protocol,
        port: a.port,
        source_port: a.source_port,
        icmp: icmp_match,
    };
    Ok((f, what))
}

/// `policy trace`: exit 0 when allowed, 1 when denied.
pub async fn trace_cmd(store: &dyn Datastore, a: TraceArgs) -> Result<ExitCode> {
    let (model, nodes) = load(store).await?;
    let (f, what) = flow(&model, &nodes, &a)?;
    let t = eval::evaluate(&model, &f);
    let kernel = match &a.kernel {
        Some(lab) => Some(crate::kernel::read(&t, lab.as_deref())?),
        None => None,
    };
    if a.output == "json" {
        let mut out = serde_json::json!({"flow": f, "trace": t});
        if let Some(k) = &kernel {
            out["kernel"] = serde_json::to_value(k)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", trace::render(&t, &what));
        if let Some(k) = &kernel {
            print!("{}", crate::kernel::render(k));
        }
    }
    Ok(if t.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `policy show`.
pub async fn show_cmd(store: &dyn Datastore, pod: &str, output: &str) -> Result<ExitCode> {
    let (model, _) = load(store).await?;
    let e = pod_endpoint(&model, pod)?;
    let dirs: Vec<(&str, Vec<_>)> = [
        ("ingress", Direction::Ingress),
        ("egress", Direction::Egress),
    ]
    .into_iter()
    .map(|(n, d)| {
        let tiers: Vec<_> = eval::applying(&model, e, d)
            .into_iter()
            .map(|(t, ps)| {
                (
                    t,
                    ps.into_iter()
                        .map(|p| (p.id.clone(), p.order))
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        (n, tiers)
    })
    .collect();
    if output == "json" {
        let j: serde_json::Map<String, serde_json::Value> = dirs
            .iter()
            .map(|(n, tiers)| {
                let v: Vec<_> = tiers
                    .iter()
                    .map(|(t, ps)| serde_json::json!({"tier": t, "policies": ps.iter().map(|(id, o)| serde_json::json!({"policy": id, "order": o})).collect::<Vec<_>>()}))
                    .collect();
                (n.to_string(), serde_json::Value::Array(v))
            })
            .collect();
        let out = serde_json::json!({
            "endpoint": {"namespace": e.namespace, "name": e.name, "pod": e.pod, "node": e.node, "addresses": e.addresses},
            "ingress": j["ingress"], "egress": j["egress"], "profiles": e.profiles,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let addrs: Vec<String> = e.addresses.iter().map(|a| a.to_string()).collect();
    let mut out = format!(
        "pod {}/{} (endpoint {}, node {}, {})\n",
        e.namespace,
        e.pod.as_deref().unwrap_or(&e.name),
        e.name,
        e.node,
        if addrs.is_empty() {
            "no address".into()
        } else {
            addrs.join(", ")
        }
    );
    for (n, tiers) in &dirs {
        trace::applying(&mut out, n, tiers);
    }
    if !e.profiles.is_empty() {
        out.push_str(&format!(
            "profiles, after the tiers: {}\n",
            e.profiles.join(", ")
        ));
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
