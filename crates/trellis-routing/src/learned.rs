//! Routes learned by BGP, planned against the kernel without copying either side: the
//! speaker's table (destination → next hop, sorted, shared) is read in place, and the kernel's
//! routes at [`BGP_METRIC`] are fed one by one as a route dump decodes them
//! ([`LearnedPlanner::observe`]), so a 100 000-route table costs the plan a bit per route
//! instead of two sets of routes, and the routes to add are table positions until applied.
//! Pure.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{Desired, LocalNode, Op, Route, RouteKind, BGP_METRIC};

/// Plans the learned routes: `new`, then [`observe`](LearnedPlanner::observe) every Trellis
/// route at [`BGP_METRIC`] the kernel holds, then [`finish`](LearnedPlanner::finish).
#[derive(Debug)]
pub struct LearnedPlanner<'a> {
    /// (destination, next hop), sorted by destination, one entry per destination.
    table: &'a [(IpNet, IpAddr)],
    /// Destinations a route of the node's own plan holds: learned routes yield to it.
    taken: BTreeSet<IpNet>,
    subnet: IpNet,
    uplink: u32,
    /// Per table entry: the kernel holds it, or an op for it was planned.
    done: Vec<u64>,
    replace: Vec<u32>,
    delete: Vec<Route>,
}

/// What [`LearnedPlanner::finish`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedPlan<'a> {
    table: &'a [(IpNet, IpAddr)],
    uplink: u32,
    /// Table positions to add or replace (in place: no gap), in the order decided.
    pub replace: Vec<u32>,
    /// Routes the kernel holds that are no longer learned, or yield to the node's own plan.
    pub delete: Vec<Route>,
    /// Learned routes whose next hop is not on the node's subnet (Trellis installs directly
    /// connected next hops only).
    pub off_subnet: Vec<(IpNet, IpAddr)>,
    /// Learned routes left out because a route Trellis does not own holds their destination
    /// and metric ([`crate::Observed::foreign`]).
    pub conflicts: Vec<Route>,
}

impl<'a> LearnedPlanner<'a> {
    /// `table` must be sorted by destination with one entry per destination (what the speaker
    /// publishes); `desired` is the rest of the node's plan, whose destinations win.
    pub fn new(local: &LocalNode, table: &'a [(IpNet, IpAddr)], desired: &Desired) -> Self {
        debug_assert!(table.windows(2).all(|w| w[0].0 < w[1].0), "sorted, unique");
        LearnedPlanner {
            table,
            taken: desired.routes.iter().map(|r| r.dst).collect(),
            subnet: local.address,
            uplink: local.uplink_ifindex,
            done: vec![0; table.len().div_ceil(64)],
            replace: Vec::new(),
            delete: Vec::new(),
        }
    }

    /// The kernel route for table entry `i`, if one is wanted.
    fn want(&self, i: usize) -> Option<Route> {
        let (dst, nh) = self.table[i];
        if self.taken.contains(&dst) || !self.subnet.contains(&nh) {
            return None;
        }
        Some(route(dst, nh, self.uplink))
    }

    fn is_done(&self, i: usize) -> bool {
        self.done[i / 64] & (1 << (i % 64)) != 0
    }

    fn set_done(&mut self, i: usize) {
        self.done[i / 64] |= 1 << (i % 64);
    }

    /// A route the kernel holds with Trellis's protocol at [`BGP_METRIC`]. One no longer
    /// learned is deleted; one with another next hop is replaced in place (no gap).
    pub fn observe(&mut self, have: Route) {
        let found = self.table.binary_search_by(|(d, _)| d.cmp(&have.dst)).ok();
        match found.map(|i| (i, self.want(i))) {
            Some((i, Some(want))) => {
                if want != have && !self.is_done(i) {
                    self.replace.push(i as u32);
                }
                self.set_done(i);
            }
            _ => self.delete.push(have),
        }
    }

    /// The ops for what the kernel lacks and for what it holds in excess; `foreign` as in
    /// [`crate::Observed::foreign`].
    pub fn finish(mut self, foreign: &BTreeSet<(IpNet, u32)>) -> LearnedPlan<'a> {
        let mut plan = LearnedPlan {
            table: self.table,
            uplink: self.uplink,
            replace: Vec::new(),
            delete: Vec::new(),
            off_subnet: Vec::new(),
            conflicts: Vec::new(),
        };
        for i in 0..self.table.len() {
            if self.is_done(i) {
                continue;
            }
            let (dst, nh) = self.table[i];
            match self.want(i) {
                Some(r) if foreign.contains(&(r.dst, r.metric)) => plan.conflicts.push(r),
                Some(_) => self.replace.push(i as u32),
                None if !self.taken.contains(&dst) => plan.off_subnet.push((dst, nh)),
                None => {}
            }
        }
        plan.replace = self.replace;
        plan.delete = self.delete;
        plan
    }
}

impl LearnedPlan<'_> {
    /// The ops, made as they are taken: replacements, then deletions.
    pub fn ops(&self) -> impl Iterator<Item = Op> + '_ {
        let replace = self.replace.iter().map(|&i| {
            let (dst, nh) = self.table[i as usize];
            Op::ReplaceRoute(route(dst, nh, self.uplink))
        });
        replace.chain(self.delete.iter().cloned().map(Op::DelRoute))
    }

    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.delete.is_empty()
    }
}

/// A learned route as Trellis installs it: through the uplink, at [`BGP_METRIC`].
fn route(dst: IpNet, nh: IpAddr, uplink: u32) -> Route {
    Route {
        dst,
        metric: BGP_METRIC,
        kind: RouteKind::Via {
            gateway: nh,
            ifindex: uplink,
            onlink: false,
        },
    }
}

/// The node's ops and the learned ones in one safe order: every replacement (the node's, then
/// the learned) before any deletion, so a destination moving between them (a direct route
/// becoming a BGP one, or back) is never without a route.
pub fn merge_ops<'a>(
    node: &'a [Op],
    learned: &'a LearnedPlan<'_>,
) -> impl Iterator<Item = Op> + 'a {
    let is_del = |op: &Op| matches!(op, Op::DelRoute(_) | Op::DelNeighbour(_) | Op::DelFdb(_));
    let (head, tail) = node.split_at(node.iter().position(is_del).unwrap_or(node.len()));
    head.iter()
        .cloned()
        .chain(learned.ops())
        .chain(tail.iter().cloned())
}
