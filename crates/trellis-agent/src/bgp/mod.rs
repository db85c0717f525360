//! The agent's BGP speaker: [`config`] decides (pure) what to run from the datastore's
//! BGPConfiguration, BGPPeer and Node objects; [`speaker`] runs the sessions around the pure
//! core in `trellis-bgp`; [`net`] owns the sockets. Learned routes reach the kernel through the
//! dataplane loop, which reads [`Shared::routes`]. This module's task re-reads the datastore on
//! every change and publishes the node's BGPStatus. Does I/O.

pub mod config;
pub mod net;
pub mod speaker;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::{watch, Notify};
use trellis_cluster::objects;
use trellis_ipam::cluster as alloc;
use trellis_resources::{BgpStatusSpec, Metadata, Object, Resource};

use crate::Agent;

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
    /// Best routes learned from peers (prefix → next hop), for the kernel.
    pub routes: watch::Sender<Arc<BTreeMap<IpNet, IpAddr>>>,
    /// The speaker runs: BGP owns routes to directly reachable nodes.
    pub active: AtomicBool,
    /// Every peer has sent its table (or the start-up grace passed): stale kernel routes may go.
    pub converged: AtomicBool,
    pub status: watch::Sender<Option<BgpStatusSpec>>,
    /// The node's routes of other protocols through its uplink (destination → gateway), which
    /// next hops beyond its subnet resolve through; kept current by the dataplane loop.
    pub igp: watch::Sender<Arc<Vec<(IpNet, IpAddr)>>>,
    /// Wakes the dataplane loop.
    pub kick: Notify,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            routes: watch::channel(Arc::new(BTreeMap::new())).0,
            active: AtomicBool::new(false),
            converged: AtomicBool::new(false),
            status: watch::channel(None).0,
            igp: watch::channel(Arc::new(Vec::new())).0,
            kick: Notify::new(),
        }
    }
}

impl Shared {
    /// New learned routes for the dataplane loop (whether BGP runs at all is [`run`]'s call).
    pub(crate) fn publish(&self, routes: BTreeMap<IpNet, IpAddr>) {
        self.routes.send_replace(Arc::new(routes));
        self.kick.notify_one();
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

/// The objects of a typed list, without their revisions.
fn specs<T>(list: Vec<(trellis_resources::Object<T>, i64)>) -> Vec<trellis_resources::Object<T>> {
    list.into_iter().map(|(o, _)| o).collect()
}

/// Reads everything the speaker's configuration depends on; `None` when BGP is off.
async fn desired(agent: &Agent, mode: Mode) -> Result<Option<config::SpeakerConfig>, String> {
    let store = &*agent.store;
    let e = |e: trellis_cluster::ClusterError| e.to_string();
    let configs = objects::bgp_configurations(store).await.map_err(e)?;
    let peers: Vec<_> = specs(objects::bgp_peers(store).await.map_err(e)?);
    if !mode.runs(!configs.is_empty() || !peers.is_empty()) {
        return Ok(None);
    }
    let nodes: Vec<_> = specs(objects::nodes(store).await.map_err(e)?);
    let pools: Vec<_> = objects::pools(store)
        .await
        .map_err(e)?
        .into_iter()
        .map(|(p, _)| p.spec)
        .collect();
    let blocks: Vec<(IpNet, String)> = objects::blocks(store)
        .await
        .map_err(e)?
        .into_iter()
        .filter_map(|(b, _)| alloc::block_node(&b.spec).map(|n| (b.spec.cidr, n.to_string())))
        .collect();
    let filters: Vec<_> = specs(objects::bgp_filters(store).await.map_err(e)?);
    let cfg = configs
        .iter()
        .find(|(c, _)| c.metadata.name == "default")
        .map(|(c, _)| &c.spec);
    config::compute(&config::Inputs {
        node: &agent.config.node,
        nodes: &nodes,
        config: cfg,
        peers: &peers,
        pools: &pools,
        blocks: &blocks,
        filters: &filters,
    })
    .map(Some)
}

/// Whether BGP will run, decided before the dataplane loop's first pass so a restarting agent
/// does not briefly program direct routes in place of its BGP-learned ones.
pub async fn starts_active(store: &dyn trellis_store::Datastore, mode: Mode) -> bool {
    if mode != Mode::Auto {
        return mode.runs(false);
    }
    let configs = objects::bgp_configurations(store)
        .await
        .map(|v| v.len())
        .unwrap_or(0);
    let peers = objects::bgp_peers(store)
        .await
        .map(|v| v.len())
        .unwrap_or(0);
    mode.runs(configs + peers > 0)
}

/// Runs the speaker for the agent's lifetime.
pub async fn run(agent: Arc<Agent>, mode: Mode) {
    if mode == Mode::Off {
        tracing::info!("BGP is off (--bgp=off)");
        return;
    }
    let (cfg_tx, cfg_rx) = watch::channel(None);
    tokio::spawn(speaker::Speaker::run(agent.bgp.clone(), cfg_rx));
    tokio::spawn(publish_status(agent.clone()));
    let mut watch = match agent.store.revision().await {
        Ok(rev) => agent.store.watch("/trellis/v1/", rev + 1).await.ok(),
        Err(_) => None,
    };
    let mut last_problem = None;
    loop {
        match desired(&agent, mode).await {
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
        let tick = tokio::time::sleep(Duration::from_secs(2));
        match &mut watch {
            Some(w) => tokio::select! {
                _ = tick => {}
                ev = w.next() => if !matches!(ev, Some(Ok(_))) { watch = None } else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                },
            },
            None => tick.await,
        }
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
