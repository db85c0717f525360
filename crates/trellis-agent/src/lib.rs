//! `trellis agent`, first shape: registers its Node (address by autodetection) and keeps it
//! alive, serves IPAM and endpoint registration to the CNI plugin on a Unix socket, and gives
//! empty blocks back after a grace period. Does I/O: datastore, socket, netlink (autodetection).

pub mod autodetect;
pub mod bgp;
pub mod dataplane;
pub mod flows;
pub mod health;
pub mod metrics;
pub mod nat;
pub mod offload;
pub mod policy;
mod server;
pub mod view;

pub use server::{
    MAX_CLIENTS, MAX_CONNECTIONS, MAX_REQUEST_LINE, QUEUE_DEADLINE, REPLY_DEADLINE,
    REQUEST_DEADLINE,
};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use trellis_cluster::ipam::NodeIpam;
use trellis_cluster::objects;
use trellis_resources::{Kind, Metadata, NodeAddress, NodeSpec, NodeStatus, Object, Resource};
use trellis_store::Datastore;

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: String,
    pub datastore: String,
    pub socket: PathBuf,
    pub ip: autodetect::Method,
    pub labels: BTreeMap<String, String>,
    pub heartbeat: Duration,
    /// How long a block must stay empty before it is given back.
    pub block_grace: Duration,
    pub vxlan: dataplane::VxlanConfig,
    /// Seconds between dataplane resyncs (drift repair).
    pub resync: Duration,
    /// Whether the BGP speaker runs.
    pub bgp: bgp::Mode,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Kubernetes mode (`--kubernetes`): an ADD naming a pod is served only from the pod's
    /// record (waiting for it up to [`POD_RECORD_DEADLINE`]), never with an unlabelled endpoint.
    pub kubernetes: bool,
    /// Flow logs (`--flow-logs`): the deciding policy rules copy each new connection's first
    /// packet to this NFLOG group, and the agent aggregates them (`trellis flows`).
    pub flow_logs: Option<flows::FlowSettings>,
    /// Calico annotations honoured beyond plain IPAM (`--allow-ip-addrs-no-ipam`,
    /// `--allow-floating-ips`).
    pub features: trellis_cluster::annotations::Features,
    /// `--use-pod-cidr`: the node's blocks are exactly its Kubernetes podCIDRs
    /// ([`NodeIpam::with_pod_cidr_blocks`]).
    pub use_pod_cidr: bool,
}

/// How long an ADD in Kubernetes mode waits for its pod's record to reach the agent's view.
pub const POD_RECORD_DEADLINE: Duration = Duration::from_secs(10);

/// Agent failures.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("node address autodetection failed: {0}")]
    Autodetect(String),
    #[error(transparent)]
    Cluster(#[from] trellis_cluster::ClusterError),
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
    #[error("dataplane: {0}")]
    Dataplane(String),
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's shared state.
pub struct Agent {
    pub config: AgentConfig,
    pub store: Arc<dyn Datastore>,
    pub ipam: NodeIpam,
    pub address: IpNet,
    pub vxlan: dataplane::VxlanConfig,
    /// Whether the VTEP keeps transmit checksum offload, decided once at start.
    pub vxlan_offload: offload::Decision,
    /// MTU handed to new pods; 0 until the first dataplane pass has measured the uplink.
    pub pod_mtu: std::sync::atomic::AtomicU32,
    /// The BGP speaker's routes and state.
    pub bgp: Arc<bgp::Shared>,
    /// The cluster as the dataplane and BGP loops see it, kept current by one watch.
    pub view: Arc<view::SharedView>,
    /// Dataplane passes completed (each read the kernel and applied the difference).
    pub dataplane_passes: std::sync::atomic::AtomicU64,
    /// The policy applier's state (enforcement, synced revision, programmed interfaces).
    pub policy: Arc<policy::Status>,
    /// What the loops last saw, for `/healthz`, `/readyz` and `trellis node status`.
    pub health: health::Tracker,
    /// The flow log, when flow logs are on.
    pub flows: Option<Arc<std::sync::Mutex<flows::FlowLog>>>,
}

/// The loop whose turns make the agent live (see [`health`]).
pub const LIVENESS_LOOP: &str = "dataplane";

impl Agent {
    /// The health checks as of now.
    pub fn health_report(&self) -> trellis_agent_api::HealthReport {
        let bgp = self
            .bgp
            .active
            .load(std::sync::atomic::Ordering::Relaxed)
            .then(|| {
                self.bgp.status.borrow().as_ref().map(|s| {
                    s.peers
                        .iter()
                        .map(|p| (p.address.clone(), p.kind.clone(), p.state.clone()))
                        .collect()
                })
            });
        let enforced = self
            .policy
            .enforced
            .load(std::sync::atomic::Ordering::Acquire);
        health::readiness(
            &self.health.inputs(enforced, bgp, self.bgp.listen_error()),
            std::time::Instant::now(),
        )
    }
}

/// Limits malloc to two arenas: the agent's many short-lived blocking threads otherwise each get
/// an arena that keeps freed memory (measured: 119 MB instead of 64–86 MB with a 100k-route
/// table). glibc only.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before the runtime starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does, and
/// returns the limit in force. A service manager's default soft limit (1024) is below what the
/// agent may hold by design — up to [`MAX_CONNECTIONS`] socket clients besides its datastore,
/// netlink and metrics descriptors — so a flood of socket clients left it none for anything
/// else: passes could not open netlink, watches could not reconnect.
pub fn raise_fd_limit() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 1024;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l = raised;
            }
        }
    }
    l.rlim_cur
}

/// Returns free memory held by malloc to the system (glibc only).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Changes this node's Node object with `f`, keeping fields others manage (CAS on the revision
/// read, so a heartbeat never undoes a VTEP update or the reverse).
///
/// A stored Node of this name that does not decode (garbage, or a version this agent cannot
/// read) is this node's own record, unusable by every reader: it is logged and replaced by one
/// built afresh, with a precondition on the bad revision. Failing on it instead kept the agent
/// from ever starting (registration is its first step) or heartbeating again.
pub async fn update_node(
    store: &dyn Datastore,
    name: &str,
    f: impl Fn(&mut Object<NodeSpec>),
) -> Result<(), AgentError> {
    let build = |old: Option<Resource>| {
        let mut node = match old {
            Some(Resource::Node(n)) => n,
            _ => Object {
                metadata: Metadata {
                    name: name.to_string(),
                    ..Default::default()
                },
                spec: NodeSpec::default(),
                status: None,
            },
        };
        f(&mut node);
        Resource::Node(node)
    };
    for _ in 0..20 {
        match objects::update(store, Kind::Node, None, name, &build).await {
            Err(trellis_cluster::ClusterError::Corrupt { key, reason }) => {
                if replace_invalid(store, &key, &reason, build(None)).await? {
                    return Ok(());
                }
                // Rewritten meanwhile: read it again.
            }
            r => {
                r?;
                return Ok(());
            }
        }
    }
    Err(trellis_cluster::ClusterError::Contention {
        what: trellis_resources::key_for(Kind::Node, None, name),
        attempts: 20,
    }
    .into())
}

/// Replaces the record at `key` with `fresh` if it still does not decode (a precondition on
/// the revision read). Returns whether it was replaced.
async fn replace_invalid(
    store: &dyn Datastore,
    key: &str,
    reason: &str,
    fresh: Resource,
) -> Result<bool, AgentError> {
    let Some(kv) = store.get(key).await? else {
        return Ok(false);
    };
    if objects::decode(&kv).is_ok() {
        return Ok(false);
    }
    tracing::error!(%key, revision = kv.mod_revision, "this node's own record does not decode ({reason}); replacing it");
    fresh
        .validate()
        .map_err(trellis_cluster::ClusterError::from)?;
    let put = trellis_store::TxnOp::Put(key.to_string(), objects::encode(&fresh));
    let pre = trellis_store::Precondition::ModRevision(key.to_string(), kv.mod_revision);
    Ok(matches!(
        store.txn(vec![pre], vec![put]).await?,
        trellis_store::TxnOutcome::Committed { .. }
    ))
}

/// Creates or updates this node's Node object: address, labels, heartbeat.
pub async fn register_node(
    store: &dyn Datastore,
    name: &str,
    address: IpNet,
    labels: &BTreeMap<String, String>,
) -> Result<(), AgentError> {
    update_node(store, name, |node| {
        node.metadata.labels.extend(labels.clone());
        node.spec.addresses = vec![NodeAddress {
            address: address.to_string(),
            kind: Some("InternalIP".into()),
        }];
        let bgp = node.spec.bgp.get_or_insert_with(Default::default);
        if address.addr().is_ipv4() {
            bgp.ipv4_address = Some(address);
        }
        node.status = Some(NodeStatus {
            last_heartbeat: Some(trellis_cluster::now_secs()),
        });
    })
    .await
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let files = raise_fd_limit();
    if files < (MAX_CONNECTIONS + server::RESERVED_FILES) as u64 {
        tracing::warn!(
            limit = files,
            "the open-files limit is low: the socket accepts fewer clients to keep descriptors for the rest"
        );
    }
    let store = trellis_store::open(&config.datastore).await?;
    let method = config.ip.clone();
    let address = tokio::task::spawn_blocking(move || autodetect::detect(&method))
        .await
        .map_err(|e| AgentError::Autodetect(e.to_string()))?
        .map_err(AgentError::Autodetect)?;
    register_node(&*store, &config.node, address, &config.labels).await?;
    tracing::info!(node = %config.node, %address, datastore = %store.describe(), "node registered");
    let vxlan = config.vxlan;
    let vxlan_offload = vxlan_offload(vxlan.checksum_offload);
    let pod_mtu = std::sync::atomic::AtomicU32::new(0);
    // The loops start from a complete view; from here on one watch keeps it current, and the
    // allocator's own writes go in as they commit.
    let cluster = view::SharedView::new();
    view::load(&*store, &cluster).await?;
    let ipam = NodeIpam::new(store.clone(), &config.node, config.labels.clone())
        .with_observer(cluster.clone())
        .with_pod_records(cluster.clone(), config.kubernetes)
        .with_features(config.features)
        .with_pod_cidr_blocks(config.use_pod_cidr);
    let bgp_shared = bgp::Shared::default();
    bgp_shared.active.store(
        bgp::starts_active(&cluster.read(), config.bgp),
        std::sync::atomic::Ordering::Relaxed,
    );
    let health = health::Tracker::new(
        &[(LIVENESS_LOOP, config.resync)],
        config.heartbeat,
        std::time::Instant::now(),
    );
    let flows = config.flow_logs.as_ref().map(|s| {
        Arc::new(std::sync::Mutex::new(flows::FlowLog::new(
            &config.node,
            s.clone(),
            flows::now_ms(),
        )))
    });
    let agent = Arc::new(Agent {
        config,
        store,
        ipam,
        address,
        vxlan,
        vxlan_offload,
        pod_mtu,
        bgp: Arc::new(bgp_shared),
        view: cluster,
        dataplane_passes: std::sync::atomic::AtomicU64::new(0),
        policy: Arc::new(policy::Status::default()),
        health,
        flows,
    });
    // Registration just wrote the Node.
    agent
        .health
        .datastore::<AgentError>(std::time::Instant::now(), Ok(()));
    let listener = server::bind(&agent.config.socket)?;
    tracing::info!(socket = %agent.config.socket.display(), "serving the CNI plugin");
    let follower = tokio::spawn(view::follow(agent.store.clone(), agent.view.clone()));
    let housekeeping = tokio::spawn(housekeeping(agent.clone()));
    let dataplane = tokio::spawn(dataplane::run(agent.clone(), agent.config.resync));
    let bgp = tokio::spawn(bgp::run(agent.clone(), agent.config.bgp));
    let flow_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let (Some(s), Some(log)) = (&agent.config.flow_logs, &agent.flows) {
        start_flow_log(
            s.clone(),
            log.clone(),
            agent.view.clone(),
            flow_stop.clone(),
        )?;
    }
    let policy = tokio::spawn(policy::run(
        agent.config.node.clone(),
        agent.view.clone(),
        agent.policy.clone(),
        Arc::new(policy::Nft::default()),
        policy::Settings {
            resync: agent.config.resync,
            flow_log_group: agent.config.flow_logs.as_ref().map(|s| s.group),
        },
    ));
    let metrics = agent.config.metrics.map(|addr| {
        let a = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(a, addr).await {
                tracing::warn!(%addr, error = %e, "metrics endpoint failed");
            }
        })
    });
    tokio::select! {
        r = server::serve(agent.clone(), listener, files) => r?,
        _ = shutdown => tracing::info!("shutting down"),
    }
    follower.abort();
    housekeeping.abort();
    dataplane.abort();
    bgp.abort();
    policy.abort();
    flow_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&agent.config.socket);
    Ok(())
}

/// Binds the flow log's NFLOG group (failing the start when it cannot: another process holds
/// the group, or the kernel has no nfnetlink_log) and reads it on a thread of its own.
fn start_flow_log(
    settings: flows::FlowSettings,
    log: Arc<std::sync::Mutex<flows::FlowLog>>,
    view: Arc<view::SharedView>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), AgentError> {
    let (bound_tx, bound_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("flow-log".into())
        .spawn(move || {
            let r = flows::run(&settings, log, view, stop, || {
                let _ = bound_tx.send(Ok(()));
            });
            if let Err(e) = r {
                let _ = bound_tx.send(Err(e));
            }
        })
        .map_err(|e| AgentError::Dataplane(format!("starting the flow-log thread: {e}")))?;
    match bound_rx.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(AgentError::Dataplane(format!(
            "flow logs: {e} (is another process reading this NFLOG group? --flow-log-group picks another)"
        ))),
        Err(_) => Err(AgentError::Dataplane("the flow-log thread ended".into())),
    }
}

/// Decides the VTEP's transmit checksum offload from `setting` and the running kernel, and
/// logs which applies and why (the kernel release is read once: it cannot change under us).
fn vxlan_offload(setting: offload::ChecksumOffload) -> offload::Decision {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the kernel release");
        String::new()
    });
    let d = offload::decide(setting, &release);
    tracing::info!(
        %setting,
        reason = %d.reason,
        "VXLAN tx checksum offload {}",
        if d.enabled { "on" } else { "off" }
    );
    d
}

/// Whether the view shows a block of `node` that has been empty for `grace` at `now`: only then
/// is the datastore asked to release (a listing of every block per heartbeat would make the
/// cluster's read load grow with nodes × blocks).
fn release_due(
    view: &trellis_cluster::view::ClusterView,
    node: &str,
    now: u64,
    grace: u64,
) -> bool {
    view.blocks().any(|b| {
        trellis_ipam::cluster::block_node(&b.spec) == Some(node)
            && trellis_ipam::cluster::releasable(&b.spec, now, grace)
    })
}

/// Heartbeats and empty-block release.
async fn housekeeping(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(agent.config.heartbeat);
    // After a stall (an unreachable datastore) beat once, not once per missed period: each
    // beat is a write every agent's view receives.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = register_node(
            &*agent.store,
            &agent.config.node,
            agent.address,
            &agent.config.labels,
        )
        .await;
        if let Err(e) = &beat {
            tracing::warn!(error = %e, "heartbeat failed");
        }
        agent.health.datastore(std::time::Instant::now(), beat);
        let due = release_due(
            &agent.view.read(),
            &agent.config.node,
            trellis_cluster::now_secs(),
            agent.config.block_grace.as_secs(),
        );
        if !due {
            continue;
        }
        match agent
            .ipam
            .release_empty_blocks(agent.config.block_grace)
            .await
        {
            Ok(released) if !released.is_empty() => {
                tracing::info!(blocks = ?released, "released empty blocks")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "releasing empty blocks failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_cluster::view::ClusterView;
    use trellis_store::{KeyValue, Listing};

    fn block(cidr: &str, node: &str, empty_since: Option<u64>) -> KeyValue {
        let mut spec = trellis_ipam::cluster::new_block(cidr.parse().unwrap(), node);
        spec.empty_since = empty_since;
        let r = Resource::IpamBlock(Object {
            metadata: Metadata {
                name: cidr.replace(['.', '/'], "-"),
                ..Default::default()
            },
            spec,
            status: None,
        });
        KeyValue {
            key: r.key(),
            value: trellis_cluster::objects::encode(&r),
            create_revision: 1,
            mod_revision: 1,
        }
    }

    /// This node's own Node record no longer decodes (garbage, or a format this version cannot
    /// read): registration replaces it instead of failing, which kept the agent from starting.
    /// Another node's bad record is not touched.
    #[tokio::test]
    async fn an_undecodable_own_node_record_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let spec = format!("sqlite:{}", dir.path().join("t.db").display());
        let store = trellis_store::open(&spec).await.unwrap();
        let mine = trellis_resources::key_for(Kind::Node, None, "n1");
        let other = trellis_resources::key_for(Kind::Node, None, "n2");
        let garbage = |k: &str| trellis_store::TxnOp::Put(k.to_string(), b"{not json".to_vec());
        store
            .txn(vec![], vec![garbage(&mine), garbage(&other)])
            .await
            .unwrap();
        let address = "192.0.2.5/24".parse().unwrap();
        register_node(&*store, "n1", address, &BTreeMap::new())
            .await
            .expect("registered over the bad record");
        let stored = objects::get(&*store, Kind::Node, None, "n1")
            .await
            .unwrap()
            .unwrap();
        let Resource::Node(node) = stored.resource else {
            panic!("not a node");
        };
        assert_eq!(node.spec.addresses[0].address, "192.0.2.5/24");
        assert!(node.status.unwrap().last_heartbeat.is_some());
        // A heartbeat afterwards is an ordinary update.
        register_node(&*store, "n1", address, &BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(
            store.get(&other).await.unwrap().unwrap().value,
            b"{not json",
            "another node's record was touched"
        );
    }

    #[test]
    fn release_is_due_only_for_own_blocks_empty_long_enough() {
        let mut view = ClusterView::new(&[Kind::IpamBlock]);
        let items = vec![
            block("10.1.0.0/26", "other", Some(0)),
            block("10.1.0.64/26", "me", Some(100)),
            block("10.1.0.128/26", "me", None),
        ];
        let (_, errors) = view.load(Kind::IpamBlock, &Listing { items, revision: 1 });
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!release_due(&view, "me", 150, 300), "empty for 50 s only");
        assert!(release_due(&view, "me", 400, 300));
        assert!(!release_due(&view, "nobody", 400, 300));
    }
}
