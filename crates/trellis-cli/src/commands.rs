//! The subcommands: each opens the datastore, calls the library, prints.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use trellis_cluster::objects::{self, Applied};
use trellis_cluster::{ipam, report};
use trellis_resources::{parse_documents, Kind, Resource};

use crate::table;
use crate::{Cli, Command, IpamCommand};

/// `trellis agent` flags.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This node's name (defaults to the hostname).
    #[arg(long, env = "NODENAME")]
    pub node: Option<String>,
    /// Unix socket for the CNI plugin.
    #[arg(long, default_value = trellis_agent_api_socket())]
    pub socket: PathBuf,
    /// Node address: first-found, interface=REGEX, can-reach=IP, or an address.
    #[arg(long, env = "IP_AUTODETECTION_METHOD", default_value = "first-found")]
    pub ip: String,
    /// Node labels (KEY=VALUE), used by pool nodeSelectors.
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Seconds between heartbeats (and empty-block checks); fractions allowed (benchmarks run
    /// agents at 100x speed).
    #[arg(long, default_value_t = 10.0)]
    pub heartbeat: f64,
    /// Seconds a block must stay empty before it is released to the pool.
    #[arg(long, default_value_t = 300)]
    pub block_grace: u64,
    /// VXLAN network identifier (4096 like Calico; 1 to mimic Flannel).
    #[arg(long, default_value_t = 4096)]
    pub vxlan_vni: u32,
    /// VXLAN UDP port (4789 like Calico; 8472 to mimic Flannel).
    #[arg(long, default_value_t = 4789)]
    pub vxlan_port: u16,
    /// MTU for the VTEP and pods; default: the uplink's minus the encapsulation overhead.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// Seconds between dataplane resyncs (drift repair).
    #[arg(long, default_value_t = 2)]
    pub resync: u64,
    /// VXLAN transmit checksum offload on the VTEP: auto (on unless the kernel predates the fix
    /// of the VXLAN/NAT checksum bug, 5.7 and the stable releases that carry it), on, off.
    #[arg(long, env = "TRELLIS_VXLAN_CHECKSUM_OFFLOAD", default_value = "auto")]
    pub vxlan_checksum_offload: String,
    /// BGP speaker: auto (on when the datastore has a BGPConfiguration or BGPPeer), on, off.
    #[arg(long, env = "TRELLIS_BGP", default_value = "auto")]
    pub bgp: String,
    /// Serve Prometheus metrics on this address (e.g. 0.0.0.0:9091).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The cluster is Kubernetes, synced by `trellis kube-controller`: an ADD naming a pod
    /// (K8S_POD_NAME) waits up to 10 s for the pod's record and fails without it, so no pod's
    /// endpoint is created without its labels.
    #[arg(long, env = "TRELLIS_KUBERNETES")]
    pub kubernetes: bool,
    /// Flow logs: the deciding policy rules copy each new connection's first packet (headers
    /// only) to an NFLOG group; the agent aggregates them per interval for `trellis flows` and
    /// counts denied packets per policy (metric trellis_flow_denied_packets).
    #[arg(long, env = "TRELLIS_FLOW_LOGS")]
    pub flow_logs: bool,
    /// The NFLOG group of the flow logs (one reader per group in a network namespace).
    #[arg(long, default_value_t = 20)]
    pub flow_log_group: u16,
    /// Seconds per flow-log aggregation interval (1..=3600).
    #[arg(long, default_value_t = 5)]
    pub flow_log_interval: u64,
    /// Honour pods' `cni.projectcalico.org/ipAddrsNoIpam` (Calico's `feature_control:
    /// {ip_addrs_no_ipam: true}`): the pod gets those addresses without IPAM. Without it such
    /// an ADD fails naming the annotation.
    #[arg(long, env = "TRELLIS_ALLOW_IP_ADDRS_NO_IPAM")]
    pub allow_ip_addrs_no_ipam: bool,
    /// Honour pods' `cni.projectcalico.org/floatingIPs` (Calico's `feature_control:
    /// {floating_ips: true}`): DNAT to the pod, routed to this node. Without it such an ADD
    /// fails naming the annotation.
    #[arg(long, env = "TRELLIS_ALLOW_FLOATING_IPS")]
    pub allow_floating_ips: bool,
    /// Flannel-style IPAM (Calico's `USE_POD_CIDR`): each of this node's Kubernetes
    /// `spec.podCIDRs` (mirrored by `trellis kube-controller`) is its only block of that family;
    /// no other block is claimed or borrowed, and an ADD fails while the node has no podCIDR.
    #[arg(long, env = "USE_POD_CIDR")]
    pub use_pod_cidr: bool,
}

const fn trellis_agent_api_socket() -> &'static str {
    "/run/trellis/agent.sock"
}

/// Reads a resource or topology file (`-`: stdin), refusing more than the parser accepts
/// without reading the rest (so `-f /dev/zero` or a huge file cannot exhaust memory).
pub(crate) fn read_input(file: &str) -> Result<String> {
    let max = trellis_resources::yaml::MAX_INPUT_BYTES;
    let mut bytes = Vec::new();
    let limit = max as u64 + 1;
    if file == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("reading {file}"))?;
    }
    if bytes.len() > max {
        bail!("{file}: larger than {max} bytes (4 MiB), the most an input file may hold");
    }
    String::from_utf8(bytes).with_context(|| format!("{file}: not UTF-8"))
}

fn kind_arg(s: &str) -> Result<Kind> {
    Kind::parse(s).with_context(|| {
        format!(
            "unknown kind {s:?}; one of {}",
            Kind::ALL
                .iter()
                .map(|k| k.plural())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

pub async fn run(cli: Cli, datastore: String) -> Result<ExitCode> {
    if let Command::Agent(a) = cli.command {
        return agent(&datastore, a).await;
    }
    if let Command::Lab { command } = cli.command {
        return tokio::task::spawn_blocking(move || crate::lab::run(command)).await?;
    }
    let store = trellis_store::open(&datastore).await?;
    let store = &*store;
    let lab = cli.lab.clone();
    match cli.command {
        Command::Apply { file } => write_all(store, &file, false).await,
        Command::Create { file } => write_all(store, &file, true).await,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
        } => {
            let kind = kind_arg(&kind)?;
            // `networkpolicies` shows Calico's and Kubernetes' NetworkPolicies together.
            let kinds: &[Kind] = match kind {
                Kind::NetworkPolicy => &[Kind::NetworkPolicy, Kind::KubernetesNetworkPolicy],
                _ => std::slice::from_ref(&kind),
            };
            let mut items: Vec<Resource> = Vec::new();
            let mut invalid = Vec::new();
            for k in kinds {
                let listing = objects::list_checked(store, *k).await?;
                items.extend(listing.items.into_iter().map(|s| s.resource));
                invalid.extend(listing.invalid);
            }
            // Namespaced kinds: one namespace (`default` unless -n), or all with -A.
            let ns = (kind.namespaced() && !all_namespaces)
                .then(|| namespace.clone().unwrap_or_else(|| "default".into()));
            if !kind.namespaced() && namespace.is_some() {
                bail!("{} are not namespaced; leave out -n", kind.plural());
            }
            let in_ns = |key: &str| {
                ns.as_ref()
                    .is_none_or(|ns| key.split('/').rev().nth(1) == Some(ns.as_str()))
            };
            // Records that do not decode are shown on stderr, by key, and make the exit code 1:
            // the valid ones are still printed, but the output is not the whole truth.
            let bad: Vec<_> = invalid
                .iter()
                .filter(|i| {
                    in_ns(&i.key)
                        && name
                            .as_ref()
                            .is_none_or(|n| i.key.rsplit('/').next() == Some(n.as_str()))
                })
                .collect();
            for i in &bad {
                eprintln!(
                    "warning: stored record {} (revision {}) is invalid and not shown: {}",
                    i.key, i.revision, i.reason
                );
            }
            let elsewhere = items.len();
            if let Some(ns) = &ns {
                items.retain(|r| r.metadata().namespace.as_deref() == Some(ns.as_str()));
            }
            let elsewhere = elsewhere - items.len();
            if let Some(n) = &name {
                items.retain(|r| &r.metadata().name == n);
                if items.is_empty() && bad.is_empty() {
                    match &ns {
                        Some(ns) => bail!("{kind} {n} not found in namespace {ns}"),
                        None => bail!("{kind} {n} not found"),
                    }
                }
            }
            if items.is_empty() && name.is_none() && elsewhere > 0 && output == "table" {
                eprintln!("({elsewhere} in other namespaces; -A shows every namespace)");
            }
            match output.as_str() {
                "yaml" => print!("{}", trellis_resources::to_yaml(&items)),
                "json" => {
                    let v: Vec<_> = items.iter().map(Resource::to_value).collect();
                    let out = if name.is_some() && v.len() == 1 {
                        v[0].clone()
                    } else {
                        serde_json::json!({"kind": "List", "items": v})
                    };
                    println!("{}", serde_json::to_string_pretty(&out)?);
                }
                _ => print!("{}", table::resources(kind, &items)),
            }
            Ok(if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Bgp {
            command: crate::BgpCommand::Status { node, output },
        } => {
            let mut all: Vec<_> = objects::bgp_statuses(store)
                .await?
                .into_iter()
                .map(|(s, _)| s.spec)
                .collect();
            if let Some(n) = &node {
                all.retain(|s| &s.node == n);
                if all.is_empty() {
                    bail!("node {n} has no BGP status (is BGP on and its agent running?)");
                }
            }
            if all.is_empty() {
                bail!("no node has reported BGP status (is BGP on? it runs when a BGPConfiguration or BGPPeer exists, or with `trellis agent --bgp on`)");
            }
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                print!("{}", table::bgp_status(&all, trellis_cluster::now_secs()));
            }
            let all_up = all
                .iter()
                .all(|s| s.peers.iter().all(|p| p.state == "Established"));
            Ok(if all_up {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Delete {
            kind,
            name,
            namespace,
            file,
        } => {
            if let Some(file) = file {
                return delete_file(store, &file).await;
            }
            let (kind, name) = (
                kind.expect("clap requires it"),
                name.expect("clap requires it"),
            );
            let kind = kind_arg(&kind)?;
            let namespace = match (kind.namespaced(), namespace) {
                (true, ns) => Some(ns.unwrap_or_else(|| "default".into())),
                (false, Some(_)) => bail!("{} are not namespaced; leave out -n", kind.plural()),
                (false, None) => None,
            };
            let kind = network_policy_kind(store, kind, namespace.as_deref(), &name).await?;
            objects::delete(store, kind, namespace.as_deref(), &name).await?;
            println!("{kind} {name} deleted");
            if kind == Kind::Node {
                // A node's addresses and blocks go with it (what Calico's kube-controllers do) —
                // each release on condition that the node is still absent when it commits, so a
                // node whose agent registers it again keeps its pods' addresses.
                let scope = report::GcScope::Node(name.clone());
                let r = report::gc(store, trellis_cluster::now_secs(), u64::MAX, &scope).await?;
                println!(
                    "released {} attachment(s) and {} block(s) of node {name}",
                    r.released_handles.len(),
                    r.deleted_blocks.len()
                );
                if objects::get(store, Kind::Node, None, &name)
                    .await?
                    .is_some()
                {
                    println!("node {name} registered again (its agent is running); what it still holds stays");
                }
                // And its BGP status report, if BGP ran there.
                match objects::delete(store, Kind::BgpStatus, None, &name).await {
                    Ok(()) | Err(trellis_cluster::ClusterError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ipam { command } => ipam_cmd(store, command).await,
        Command::Label {
            kind,
            name,
            labels,
            namespace,
            overwrite,
        } => label(store, &kind, &name, namespace, &labels, overwrite).await,
        Command::Policy { command } => match command {
            crate::PolicyCommand::Trace {
                src,
                dst,
                port,
                protocol,
                source_port,
                icmp_type,
                icmp_code,
                output,
                kernel,
            } => {
                let a = crate::policy::TraceArgs {
                    src,
                    dst,
                    port,
                    protocol,
                    source_port,
                    icmp_type,
                    icmp_code,
                    output,
                    kernel: kernel.then(|| lab.clone()),
                };
                crate::policy::trace_cmd(store, a).await
            }
            crate::PolicyCommand::Show { pod, output } => {
                crate::policy::show_cmd(store, &pod, &output).await
            }
        },
        Command::Agent(_) | Command::Lab { .. } | Command::KubeController(_) => unreachable!(),
        Command::InstallCni(_) | Command::Node { .. } | Command::Flows(_) => {
            unreachable!("run without a datastore")
        }
    }
}

/// Applies (or creates) every document of `file` in one transaction, or none; prints what
/// happened to each only once it committed.
async fn write_all(
    store: &dyn trellis_store::Datastore,
    file: &str,
    create_only: bool,
) -> Result<ExitCode> {
    let text = read_input(file)?;
    let resources = parse_documents(&text).with_context(|| format!("{file}: nothing applied"))?;
    if resources.is_empty() {
        println!("{file}: no resources");
        return Ok(ExitCode::SUCCESS);
    }
    let applied = objects::apply_all(store, &resources, create_only)
        .await
        .with_context(|| format!("{file}: nothing applied"))?;
    for (r, a) in resources.iter().zip(applied) {
        let what = match a {
            Applied::Created => "created",
            Applied::Updated => "configured",
            Applied::Unchanged => "unchanged",
        };
        println!("{}/{} {what}", r.kind(), r.metadata().name);
    }
    Ok(ExitCode::SUCCESS)
}

/// `delete networkpolicy NAME`: Calico's kind, or Kubernetes' when only a Kubernetes
/// NetworkPolicy has that name (`kubernetesnetworkpolicy` always names Kubernetes').
async fn network_policy_kind(
    store: &dyn trellis_store::Datastore,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Kind> {
    if kind != Kind::NetworkPolicy
        || objects::get(store, Kind::NetworkPolicy, namespace, name)
            .await?
            .is_some()
    {
        return Ok(kind);
    }
    let k8s = objects::get(store, Kind::KubernetesNetworkPolicy, namespace, name).await?;
    Ok(if k8s.is_some() {
        Kind::KubernetesNetworkPolicy
    } else {
        kind
    })
}

/// `delete -f`: every object of the file that exists, in one transaction; those that do not
/// are reported and make the exit code 1 (as kubectl does).
async fn delete_file(store: &dyn trellis_store::Datastore, file: &str) -> Result<ExitCode> {
    let text = read_input(file)?;
    let resources = parse_documents(&text).with_context(|| format!("{file}: nothing deleted"))?;
    let targets: Vec<objects::Target> = resources.iter().map(objects::Target::of).collect();
    let existed = objects::delete_all(store, &targets)
        .await
        .with_context(|| format!("{file}: nothing deleted"))?;
    let mut missing = 0;
    for (t, e) in targets.iter().zip(existed) {
        let what = match &t.namespace {
            Some(ns) => format!("{}/{} (namespace {ns})", t.kind, t.name),
            None => format!("{}/{}", t.kind, t.name),
        };
        if e {
            println!("{what} deleted");
        } else {
            missing += 1;
            eprintln!("{what} not found");
        }
    }
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `label pod|namespace NAME k=v k2- [--overwrite]`.
async fn label(
    store: &dyn trellis_store::Datastore,
    kind: &str,
    name: &str,
    namespace: Option<String>,
    args: &[String],
    overwrite: bool,
) -> Result<ExitCode> {
    use trellis_cluster::label::LabelTarget;
    let changes = args
        .iter()
        .map(|a| trellis_resources::labels::LabelChange::parse(a))
        .collect::<Result<Vec<_>, _>>()?;
    let target = if kind.starts_with('p') {
        LabelTarget::Pod {
            namespace: namespace.unwrap_or_else(|| "default".into()),
            pod: name.to_string(),
        }
    } else {
        if namespace.is_some() {
            bail!("namespaces are not namespaced; leave out -n");
        }
        LabelTarget::Namespace(name.to_string())
    };
    let out = trellis_cluster::label::label(store, &target, &changes, overwrite).await?;
    for k in &out.not_found {
        println!("label {k:?} not found.");
    }
    for (object, changed) in &out.objects {
        println!(
            "{object} {}",
            if *changed { "labeled" } else { "not labeled" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One line of `ipam check` for an address whose pod is gone.
fn pod_leak_line(l: &trellis_kube::gc::PodLeak) -> String {
    let age = |s: u64| format!("{}m{:02}s", s / 60, s % 60);
    let gc = match (l.seen_gone_secs, l.grace_secs) {
        (Some(s), Some(g)) => format!(
            "kube-controller GC has seen it gone for {}, releases it after {}",
            age(s),
            age(g)
        ),
        _ => "kube-controller GC has not seen it gone yet".to_string(),
    };
    format!(
        "leaked address {} of pod {}/{} (uid {}, node {}, handle {}): no such pod in Kubernetes; {gc}",
        l.addresses.join(","),
        l.namespace,
        l.pod,
        l.uid.as_deref().unwrap_or("unknown"),
        l.node,
        l.handle
    )
}

async fn ipam_cmd(store: &dyn trellis_store::Datastore, command: IpamCommand) -> Result<ExitCode> {
    match command {
        IpamCommand::Show => {
            let (pools, stray) = report::show(store).await?;
            print!("{}", table::ipam_show(&pools, &stray));
            Ok(ExitCode::SUCCESS)
        }
        IpamCommand::Check { output } => {
            let problems = report::check(store).await?;
            let leaks = trellis_kube::gc::pod_leaks(store, trellis_cluster::now_secs()).await?;
            let n = problems.len() + leaks.as_ref().map_or(0, Vec::len);
            if output == "json" {
                let doc = serde_json::json!({
                    "consistent": n == 0,
                    "problems": problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "kubernetes": leaks.is_some(),
                    "podLeaks": leaks.unwrap_or_default(),
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else if n == 0 {
                println!("IPAM is consistent: no leaks, duplicates or orphans");
            } else {
                for p in &problems {
                    println!("{p}");
                }
                for l in leaks.iter().flatten() {
                    println!("{}", pod_leak_line(l));
                }
                println!("{n} problem(s) found");
            }
            Ok(if n == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        IpamCommand::Release { ip, handle } => {
            if let Some(h) = handle {
                let released = ipam::release_handle(store, &h, trellis_cluster::now_secs()).await?;
                if released.is_empty() {
                    bail!("handle {h} holds no addresses");
                }
                println!(
                    "released {} from handle {h}",
                    released
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            } else if let Some(ip) = ip {
                match ipam::release_ip(store, ip, trellis_cluster::now_secs()).await? {
                    Some(trellis_cluster::release::IpRelease::Handle(h)) => {
                        println!("released {ip} (handle {h})")
                    }
                    Some(trellis_cluster::release::IpRelease::Leak(h)) => {
                        println!("released leaked {ip} (its handle {h} did not exist)")
                    }
                    None => bail!("{ip} is not allocated"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        IpamCommand::Gc { grace } => {
            let now = trellis_cluster::now_secs();
            let r = report::gc(store, now, grace, &report::GcScope::All).await?;
            println!(
                "released {} handle(s) of missing nodes, {} leaked address(es); deleted {} block(s), {} affinit(y/ies)",
                r.released_handles.len(),
                r.released_leaks.len(),
                r.deleted_blocks.len(),
                r.deleted_affinities.len()
            );
            if r.abandoned > 0 {
                println!(
                    "{} decision(s) conflicted with concurrent changes and were left; run again",
                    r.abandoned
                );
            }
            for h in &r.released_handles {
                println!("  released handle {h}");
            }
            for ip in &r.released_leaks {
                println!("  released leaked {ip}");
            }
            for b in &r.deleted_blocks {
                println!("  deleted block {b}");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn agent(datastore: &str, a: AgentArgs) -> Result<ExitCode> {
    let node = match a.node {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the hostname")?
            .trim()
            .to_string(),
    };
    let ip = trellis_agent::autodetect::Method::parse(&a.ip)
        .map_err(|e| anyhow::anyhow!("--ip: {e}"))?;
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("--label {l:?}: expected KEY=VALUE"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    if !(a.heartbeat.is_finite() && a.heartbeat >= 0.01) {
        bail!("--heartbeat {} must be at least 0.01 seconds", a.heartbeat);
    }
    let config = trellis_agent::AgentConfig {
        node,
        datastore: datastore.to_string(),
        socket: a.socket,
        ip,
        labels,
        heartbeat: Duration::from_secs_f64(a.heartbeat),
        block_grace: Duration::from_secs(a.block_grace),
        vxlan: trellis_agent::dataplane::VxlanConfig {
            vni: a.vxlan_vni,
            port: a.vxlan_port,
            mtu: a.mtu,
            checksum_offload: a.vxlan_checksum_offload.parse()?,
        },
        resync: Duration::from_secs(a.resync.max(1)),
        bgp: a.bgp.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        metrics: a.metrics_listen,
        kubernetes: a.kubernetes,
        flow_logs: a.flow_logs.then(|| trellis_agent::flows::FlowSettings {
            group: a.flow_log_group,
            interval: Duration::from_secs(a.flow_log_interval),
            ..Default::default()
        }),
        features: trellis_cluster::annotations::Features {
            ip_addrs_no_ipam: a.allow_ip_addrs_no_ipam,
            floating_ips: a.allow_floating_ips,
        },
        use_pod_cidr: a.use_pod_cidr,
    };
    if !(1..=3600).contains(&a.flow_log_interval) {
        bail!(
            "--flow-log-interval {} is outside 1..=3600 seconds",
            a.flow_log_interval
        );
    }
    if !(1..=16_777_215).contains(&a.vxlan_vni) {
        bail!("--vxlan-vni {} is outside 1..16777215", a.vxlan_vni);
    }
    if let Some(m) = a.mtu {
        if !(576..=65535).contains(&m) {
            bail!("--mtu {m} is outside 576..65535");
        }
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
    };
    trellis_agent::run(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}
