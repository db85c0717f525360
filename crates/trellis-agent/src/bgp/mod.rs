//! The agent's BGP speaker: [`config`] decides (pure) what to run from the datastore's
//! BGPConfiguration, BGPPeer and Node objects; [`speaker`] runs the sessions around the pure
//! core in `trellis-bgp`; [`net`] owns the sockets. Learned routes reach the kernel through the
//! dataplane loop, which asks the speaker for them ([`Shared::learned_routes`]) when a pass
//! starts. This module's task computes the speaker's
//! configuration from the agent's view of the cluster ([`crate::view`]) whenever an input of
//! it changed, and publishes the node's BGPStatus. Does I/O.

pub mod config;
pub mod net;
pub mod speaker;

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use trellis_cluster::objects;
use trellis_cluster::view::ClusterView;
use trellis_ipam::cluster as alloc;
use trellis_resources::{BgpStatusSpec, Metadata, Object, Resource};

use crate::{Agent, AgentError};

/// How long a dataplane pass waits for the speaker's routes (it answers between two batches of
/// messages, well within a second even while a full table arrives).
const TABLE_WAIT: Duration = Duration::from_secs(30);

/// `--bgp`: on when the datastore has BGP objects (auto), always, or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    On,
    Off,
}

impl Mode {
    /// Whether the speaker runs, given whether the datastore holds a BGPConfiguration or BGPPeer.
    pub fn runs(self, bgp_objects_exist: bool) -> bool {
        match self {
            Mode::On => true,
            Mode::Off => false,
            Mode::Auto => bgp_objects_exist,
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "auto" => Ok(Mode::Auto),
            "on" => Ok(Mode::On),
            "off" => Ok(Mode::Off),
            _ => Err(format!("--bgp {s:?}: expected auto, on or off")),
        }
    }
}

/// What the speaker shares with the rest of the agent.
pub struct Shared {
    /// Requests for the learned routes, answered by the speaker from its RIB: a table is built
    /// only for a pass that reads it, never while an older one is still read (a full table
    /// is 3.5 MB a copy; built at every change it also cost time while a table arrives).
    table_requests: mpsc::Sender<TableRequest>,
    /// The receiving end, until the speaker takes it.
    pub(crate) table_receiver: Mutex<Option<mpsc::Receiver<TableRequest>>>,
    /// The speaker runs: BGP owns routes to directly reachable nodes.
    pub active: AtomicBool,
    /// Every peer has sent its table (or the start-up grace passed): stale kernel routes may go.
    pub converged: AtomicBool,
    pub status: watch::Sender<Option<BgpStatusSpec>>,
    /// Why the speaker cannot listen (address and error) while it cannot; `None` while it
    /// listens or does not run. Readiness fails on it: a peer that connects to this node
    /// (every Trellis peer with a higher router ID, any passive peer) never gets a session.
    pub listen_error: Mutex<Option<String>>,
    /// The node's routes of other protocols through its uplink (destination → gateway), which
    /// next hops beyond its subnet resolve through; kept current by the dataplane loop.
    pub igp: watch::Sender<Arc<Vec<(IpNet, IpAddr)>>>,
    /// Wakes the dataplane loop.
    pub kick: Notify,
}

/// Best routes learned from peers (prefix → next hop), for the kernel: sorted by prefix, one
/// per prefix (what [`trellis_routing::LearnedPlanner`] reads).
pub type LearnedRoutes = Arc<Vec<(IpNet, IpAddr)>>;

/// A request for the [`LearnedRoutes`], with where to answer.
pub(crate) type TableRequest = oneshot::Sender<LearnedRoutes>;

impl Default for Shared {
    fn default() -> Self {
        let (table_requests, rx) = mpsc::channel(4);
        Shared {
            table_requests,
            table_receiver: Mutex::new(Some(rx)),
            active: AtomicBool::new(false),
            converged: AtomicBool::new(false),
            status: watch::channel(None).0,
            listen_error: Mutex::new(None),
            igp: watch::channel(Arc::new(Vec::new())).0,
            kick: Notify::new(),
        }
    }
}

impl Shared {
    /// Records whether the speaker listens (`None`) or why it cannot.
    pub(crate) fn set_listen_error(&self, error: Option<String>) {
        *self.listen_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Why the speaker cannot listen, if it cannot.
    pub fn listen_error(&self) -> Option<String> {
        self.listen_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The learned routes changed: the dataplane loop runs a pass, which asks for them.
    pub(crate) fn routes_changed(&self) {
        self.kick.notify_one();
    }

    /// The speaker's learned routes now (for a pass while BGP is active). Empty if the speaker
    /// runs no configuration, or is gone (its routes go with it); an error if it does not
    /// answer in time (the pass is retried and the kernel keeps what it has meanwhile).
    pub async fn learned_routes(&self) -> Result<LearnedRoutes, AgentError> {
        let (tx, rx) = oneshot::channel();
        let ask = async {
            self.table_requests.send(tx).await.ok()?;
            rx.await.ok()
        };
        match tokio::time::timeout(TABLE_WAIT, ask).await {
            Ok(Some(routes)) => Ok(routes),
            Ok(None) => {
                tracing::warn!("the BGP speaker is gone; its routes are removed");
                Ok(LearnedRoutes::default())
            }
            Err(_) => Err(AgentError::Dataplane(format!(
                "the BGP speaker did not hand over its routes within {TABLE_WAIT:?}"
            ))),
        }
    }

    /// The host's gateway routes as the dataplane loop last read them; the speaker hears only
    /// of real changes.
    pub(crate) fn set_igp(&self, mut routes: Vec<(IpNet, IpAddr)>) {
        routes.sort();
        self.igp.send_if_modified(|have| {
            let changed = **have != routes;
            if changed {
                *have = Arc::new(routes);
            }
            changed
        });
    }
}

/// What the speaker's configuration is computed from, copied out of the view: every object
/// the computation reads, Nodes without their status (heartbeats change nothing here), blocks
/// as (block, affine node). Two equal `Inputs` give the same configuration, so a view change
/// that leaves them equal (a pod's address in some block) costs no recomputation.
#[derive(Debug, Clone, PartialEq)]
struct Inputs {
    configs: Vec<Object<trellis_resources::BgpConfigurationSpec>>,
    peers: Vec<Object<trellis_resources::BgpPeerSpec>>,
    nodes: Vec<Object<trellis_resources::NodeSpec>>,
    pools: Vec<trellis_resources::IpPoolSpec>,
    blocks: Vec<(IpNet, String)>,
    filters: Vec<Object<trellis_resources::BgpFilterSpec>>,
    /// Pods' addresses outside their node's blocks (see [`crate::dataplane::host_routes`]).
    hosts: Vec<trellis_routing::HostRoute>,
}

impl Inputs {
    fn read(view: &ClusterView) -> Inputs {
        let blocks: Vec<(IpNet, String)> = view
            .blocks()
            .filter_map(|b| alloc::block_node(&b.spec).map(|n| (b.spec.cidr, n.to_string())))
            .collect();
        // Every node's (the node is not known here); exports keeps this node's.
        let hosts = crate::dataplane::host_routes(view, "", &blocks).0;
        Inputs {
            hosts,
            configs: view.bgp_configurations().cloned().collect(),
            peers: view.bgp_peers().cloned().collect(),
            nodes: view
                .nodes()
                .map(|n| Object {
                    status: None,
                    ..n.clone()
                })
                .collect(),
            pools: view.pools().map(|p| p.spec.clone()).collect(),
            blocks,
            filters: view.bgp_filters().cloned().collect(),
        }
    }
}

/// The speaker's configuration from its inputs; `None` when BGP is off.
fn desired(node: &str, i: &Inputs, mode: Mode) -> Result<Option<config::SpeakerConfig>, String> {
    if !mode.runs(!i.configs.is_empty() || !i.peers.is_empty()) {
        return Ok(None);
    }
    let cfg = i
        .configs
        .iter()
        .find(|c| c.metadata.name == "default")
        .map(|c| &c.spec);
    config::compute(&config::Inputs {
        node,
        nodes: &i.nodes,
        config: cfg,
        peers: &i.peers,
        pools: &i.pools,
        blocks: &i.blocks,
        filters: &i.filters,
        hosts: &i.hosts,
    })
    .map(Some)
}

/// Whether BGP will run, decided from the loaded view before the dataplane loop's first pass so
/// a restarting agent does not briefly program direct routes in place of its BGP-learned ones.
pub fn starts_active(view: &ClusterView, mode: Mode) -> bool {
    mode.runs(view.bgp_configurations().next().is_some() || view.bgp_peers().next().is_some())
}

/// Runs the speaker for the agent's lifetime; its configuration is recomputed from the agent's
/// view when, and only when, something it is computed from changed.
pub async fn run(agent: Arc<Agent>, mode: Mode) {
    if mode == Mode::Off {
        tracing::info!("BGP is off (--bgp=off)");
        return;
    }
    let (cfg_tx, cfg_rx) = watch::channel(None);
    tokio::spawn(speaker::Speaker::run(agent.bgp.clone(), cfg_rx));
    tokio::spawn(publish_status(agent.clone()));
    let mut changes = agent.view.subscribe();
    // Endpoints' floating addresses are exported too; their changes come with policy's kinds.
    let mut endpoint_changes = agent.view.subscribe_policy();
    let mut last_inputs: Option<Inputs> = None;
    let mut last_problem = None;
    loop {
        let inputs = Inputs::read(&agent.view.read());
        if last_inputs.as_ref() != Some(&inputs) {
            match desired(&agent.config.node, &inputs, mode) {
                Ok(want) => {
                    let active = want.is_some();
                    if agent.bgp.active.swap(active, Ordering::Relaxed) != active {
                        tracing::info!(active, "BGP speaker switched");
                        agent.bgp.kick.notify_one();
                    }
                    let warnings = want
                        .as_ref()
                        .map(|w| w.warnings.clone())
                        .unwrap_or_default();
                    let changed = cfg_tx.send_if_modified(|cur| {
                        let changed = *cur != want;
                        *cur = want;
                        changed
                    });
                    if changed {
                        for w in warnings {
                            tracing::warn!("{w}");
                        }
                    }
                    last_problem = None;
                }
                Err(e) => {
                    if last_problem.as_ref() != Some(&e) {
                        tracing::warn!(error = %e, "BGP configuration not usable yet");
                    }
                    last_problem = Some(e);
                }
            }
            last_inputs = Some(inputs);
        }
        let changed = tokio::select! {
            r = changes.changed() => r,
            r = endpoint_changes.changed() => r,
        };
        if changed.is_err() {
            return; // the agent is stopping
        }
        // Let a burst of changes settle into one computation.
        tokio::time::sleep(Duration::from_millis(50)).await;
        changes.borrow_and_update();
        endpoint_changes.borrow_and_update();
    }
}

/// Writes the speaker's status to the node's BGPStatus object when it changes.
async fn publish_status(agent: Arc<Agent>) {
    let mut rx = agent.bgp.status.subscribe();
    while rx.changed().await.is_ok() {
        let Some(mut spec) = rx.borrow_and_update().clone() else {
            continue;
        };
        spec.node = agent.config.node.clone();
        spec.updated = trellis_cluster::now_secs();
        let obj = Resource::BgpStatus(Object {
            metadata: Metadata {
                name: agent.config.node.clone(),
                ..Default::default()
            },
            spec,
            status: None,
        });
        if let Err(e) = objects::apply(&*agent.store, &obj, false).await {
            tracing::warn!(error = %e, "writing BGP status failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::tests::{block, node};

    /// A pass gets the learned routes from whoever holds the receiving end (the speaker), and
    /// an empty table, not a wait, once the speaker is gone.
    #[tokio::test]
    async fn learned_routes_come_from_the_speaker_and_go_with_it() {
        let shared = Shared::default();
        let mut rx = shared.table_receiver.lock().unwrap().take().unwrap();
        let table = vec![("10.8.0.0/24".parse().unwrap(), "192.0.2.1".parse().unwrap())];
        let answer = table.clone();
        let speaker = tokio::spawn(async move {
            let reply = rx.recv().await.unwrap();
            reply.send(Arc::new(answer)).unwrap();
            rx // gone after one answer
        });
        assert_eq!(*shared.learned_routes().await.unwrap(), table);
        drop(speaker.await.unwrap());
        assert!(shared.learned_routes().await.unwrap().is_empty());
    }

    /// The speaker's inputs ignore heartbeats and pod addresses, so neither recomputes its
    /// configuration; a node's labels (peer selectors) and block ownership do count.
    #[test]
    fn bgp_inputs_ignore_heartbeats_and_pods() {
        let labelled = |beat: u64, rack: &str| {
            let mut n = node("n2", "192.0.2.2/24", beat);
            if let Resource::Node(o) = &mut n {
                o.metadata.labels.insert("rack".into(), rack.into());
            }
            n
        };
        let world = |beat: u64, pods: &[&str], rack: &str, owner: &str| {
            crate::view::view_of(&[
                node("n1", "192.0.2.1/24", beat),
                labelled(beat, rack),
                block("10.1.0.0/26", owner, pods),
            ])
        };
        let base = Inputs::read(&world(1, &[], "r1", "n2"));
        assert_eq!(base, Inputs::read(&world(7, &[], "r1", "n2")));
        assert_eq!(base, Inputs::read(&world(1, &["pod"], "r1", "n2")));
        assert_ne!(base, Inputs::read(&world(1, &[], "r2", "n2")));
        assert_ne!(base, Inputs::read(&world(1, &[], "r1", "n1")));
    }
}
