//! The routing information bases: Adj-RIB-In (accepted paths per peer), the Loc-RIB (best path
//! per prefix by the decision process of RFC 4271 §9.1.2), and Adj-RIB-Out (what each peer was
//! last sent; held back and coalesced for a peer whose transport is behind), with the export
//! rules of RFC 4271 §9.1.3 and route reflection (RFC 4456), and per-peer prefix limits.
//! Graceful restart (RFC 4724): a restarting peer's paths of the families it preserves are kept
//! as stale until End-of-RIB.
//! Next hops not on a connected network resolve recursively through the host's other routes
//! ([`Rib::set_igp_routes`], RFC 4271 §5.1.3), as BIRD's `gateway recursive` does.
//! A full table is held compactly: a prefix is a packed key and one pointer to the path its
//! UPDATE shared with the rest ([`paths`], [`prefix_map`]), and its kernel route is an index
//! into the few distinct next hops, read in place through [`Rib::installed`].
//! Pure: the shell feeds updates and sends what [`Rib::flush`] returns.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::attrs::PathAttrs;
use crate::message::Update;
use crate::nlri::afi_of;
#[cfg(test)]
use crate::nlri::AFI_IPV4;
use crate::policy::{self, Rule};

mod paths;
mod prefix_map;
use paths::{NextHops, NhId, Path, PathInfo, Paths, Source, NOT_INSTALLED};
use prefix_map::{PrefixMap, PrefixSet};

/// A peer's handle in the RIB.
pub type PeerId = u32;

/// LOCAL_PREF assumed when none is carried (RFC 4271 §5.1.5 leaves the default to policy).
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// Our identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RibConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Set when this speaker is a route reflector (RFC 4456 §7).
    pub cluster_id: Option<Ipv4Addr>,
    /// Directly connected networks: a next hop in one of them is its own immediate next hop.
    /// One in none of them must resolve through an IGP route ([`Rib::set_igp_routes`]) or the
    /// path is unresolvable and takes no part in the decision (RFC 4271 §9.1.2.1). Empty means
    /// every next hop is taken as directly reachable.
    pub connected: Vec<IpNet>,
}

/// An established peer as the RIB needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub address: IpAddr,
    /// Our address on the session: the next hop we advertise as "self".
    pub local_address: IpAddr,
    /// A route reflector client of ours.
    pub rr_client: bool,
    /// Which next hop this peer is sent for learned routes.
    pub next_hop: NextHopMode,
    /// Families negotiated (AFIs).
    pub families: Vec<u16>,
    /// How many times our AS may appear in a path from this (external) peer before it counts
    /// as a loop (BIRD's `allow local as`; 0 is the RFC 4271 §9.1.2 rule).
    pub allow_local_as: usize,
    /// Filters on what is accepted from and sent to this peer ([`policy`]).
    pub import: Vec<Rule>,
    pub export: Vec<Rule>,
    /// The most prefixes held for this peer, if limited.
    pub max_prefixes: Option<PrefixLimit>,
}

/// A cap on the prefixes held for one peer (a BGPPeer's `maxPrefixes`): it counts every prefix
/// the peer announced and did not withdraw, accepted or rejected, so the memory a peer can make
/// the RIB use is bounded by it (unless the action is [`LimitAction::Warn`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLimit {
    pub limit: usize,
    pub action: LimitAction,
}

/// What happens to an announcement of a new prefix beyond a peer's [`PrefixLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitAction {
    /// Kept anyway; reported.
    Warn,
    /// Not kept; the session stays (BIRD's `block`).
    Reject,
    /// Not kept; the shell resets the session (Cease / Maximum Number of Prefixes Reached,
    /// RFC 4486).
    Restart,
}

/// The next hop sent to a peer for routes learned from others (Calico's `nextHopMode`, BIRD's
/// `next hop self` / `next hop keep`). Routes this speaker originates always carry its own
/// address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NextHopMode {
    /// RFC 4271 §5.1.3: own address towards external peers and for routes learned over eBGP;
    /// reflected iBGP routes keep theirs (RFC 4456 §10).
    #[default]
    Auto,
    /// Always our own address, reflected routes included: this speaker joins their data path.
    SetSelf,
    /// Never rewritten, external peers included (third-party next hop).
    Keep,
}

/// Index of each (attributes, next hop) group in an [`Outbound`] being built.
type Groups = HashMap<(usize, IpAddr), usize>;

/// Announcements and withdrawals for one peer, grouped by attributes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbound {
    /// (attributes, next hop, prefixes).
    pub announce: Vec<(Arc<PathAttrs>, IpAddr, Vec<IpNet>)>,
    pub withdraw: Vec<IpNet>,
}

impl Outbound {
    pub fn is_empty(&self) -> bool {
        self.announce.is_empty() && self.withdraw.is_empty()
    }
}

/// Per-peer counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: usize,
    pub accepted: usize,
    pub advertised: usize,
}

/// Why announcements were not accepted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub accepted: usize,
    pub withdrawn: usize,
    pub rejected: Vec<(IpNet, &'static str)>,
    /// Announcements of new prefixes beyond the peer's [`PrefixLimit`].
    pub over_limit: usize,
    /// The family (AFI) of the first of them, for the NOTIFICATION's data (RFC 4486 §4).
    pub over_limit_afi: Option<u16>,
}

/// The RIBs.
#[derive(Debug, Default)]
pub struct Rib {
    config: Option<RibConfig>,
    peers: HashMap<PeerId, PeerInfo>,
    /// Per prefix: its paths and the next hop of its kernel route, if it has one (the best path
    /// learned from a peer, by its immediate next hop: what the kernel should route).
    paths: PrefixMap<Paths>,
    next_hops: NextHops,
    /// Prefixes with a kernel route.
    installed: usize,
    rejected: HashMap<PeerId, HashSet<IpNet>>,
    accepted: HashMap<PeerId, usize>,
    adj_out: HashMap<PeerId, HashMap<IpNet, (Arc<PathAttrs>, IpAddr)>>,
    dirty: PrefixSet,
    /// Per peer not ready to be sent more (its transport is behind): the prefixes changed since
    /// it was last sent anything. Sending waits, and many changes to one prefix become one
    /// UPDATE — a slow peer costs at most one entry per prefix, whatever the churn.
    pending: HashMap<PeerId, HashSet<IpNet>>,
    /// Per peer that asked for the table again (ROUTE-REFRESH): the prefixes it was sent, to be
    /// announced again even though unchanged. Its Adj-RIB-Out stays as it was, so a prefix
    /// withdrawn before the resend is still withdrawn from it.
    resend: HashMap<PeerId, HashSet<IpNet>>,
    /// The host's routes that next hops resolve through, by prefix length (longest first).
    igp: BTreeMap<Reverse<u8>, HashMap<IpNet, IpAddr>>,
}

impl Rib {
    pub fn new(config: RibConfig) -> Rib {
        Rib {
            config: Some(config),
            ..Default::default()
        }
    }

    fn cfg(&self) -> &RibConfig {
        self.config.as_ref().expect("built with new")
    }

    /// Changes identity (e.g. becoming a route reflector); every prefix is re-exported.
    pub fn set_config(&mut self, config: RibConfig) {
        self.config = Some(config);
        self.dirty.extend(self.paths.keys());
    }

    /// Routes for the kernel: best paths from peers, by their immediate next hops.
    pub fn installed(&self) -> Installed<'_> {
        Installed { rib: self }
    }

    /// Sets the host's routes (destination → gateway, not BGP's own) through which next hops
    /// beyond the connected networks resolve. Prefixes whose paths have such next hops are
    /// decided again at the next [`flush`](Rib::flush) when the set changed.
    pub fn set_igp_routes(&mut self, routes: impl IntoIterator<Item = (IpNet, IpAddr)>) {
        let mut igp: BTreeMap<Reverse<u8>, HashMap<IpNet, IpAddr>> = BTreeMap::new();
        for (dst, gw) in routes {
            igp.entry(Reverse(dst.prefix_len()))
                .or_default()
                .insert(dst.trunc(), gw);
        }
        if igp == self.igp {
            return;
        }
        self.igp = igp;
        let recursive = |p: &Path| p.source != Source::Local && !self.is_direct(p.next_hop);
        let affected: Vec<IpNet> = self
            .paths
            .iter()
            .filter(|(_, ps)| ps.iter().any(recursive))
            .map(|(k, _)| k)
            .collect();
        self.dirty.extend(affected);
    }

    /// Whether a next hop is on a connected network (or every one is taken to be).
    fn is_direct(&self, next_hop: IpAddr) -> bool {
        let connected = &self.cfg().connected;
        connected.is_empty() || connected.iter().any(|n| n.contains(&next_hop))
    }

    /// The immediate next hop for a path's NEXT_HOP: itself on a connected network, otherwise
    /// the gateway of the longest IGP route covering it (RFC 4271 §5.1.3).
    fn resolve(&self, next_hop: IpAddr) -> Option<IpAddr> {
        if self.is_direct(next_hop) {
            return Some(next_hop);
        }
        let host_len = if next_hop.is_ipv4() { 32 } else { 128 };
        self.igp
            .iter()
            .filter(|(Reverse(len), _)| *len <= host_len)
            .find_map(|(Reverse(len), routes)| {
                routes
                    .get(&IpNet::new(next_hop, *len).ok()?.trunc())
                    .copied()
            })
    }

    pub fn counters(&self, peer: PeerId) -> Counters {
        let accepted = self.accepted.get(&peer).copied().unwrap_or(0);
        Counters {
            received: accepted + self.rejected.get(&peer).map_or(0, |r| r.len()),
            accepted,
            advertised: self.adj_out.get(&peer).map_or(0, |o| o.len()),
        }
    }

    /// Prefixes held for a peer: accepted plus rejected (what its [`PrefixLimit`] counts).
    fn held(&self, id: PeerId) -> usize {
        self.accepted.get(&id).copied().unwrap_or(0) + self.rejected.get(&id).map_or(0, |r| r.len())
    }

    /// Whether the peer announced `prefix` before (accepted or rejected) and not withdrawn it.
    fn holds(&self, id: PeerId, prefix: &IpNet) -> bool {
        self.rejected.get(&id).is_some_and(|r| r.contains(prefix))
            || self
                .paths
                .get(prefix)
                .is_some_and(|ps| ps.iter().any(|x| x.source == Source::Peer(id)))
    }

    /// Number of prefixes with at least one path.
    pub fn len(&self) -> usize {
        self.paths
            .values()
            .filter(|ps| ps.iter().next().is_some())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Originates (or changes) a local route.
    pub fn originate(&mut self, prefix: IpNet, attrs: Arc<PathAttrs>, next_hop: IpAddr) {
        self.put(
            prefix,
            Path::new(PathInfo {
                source: Source::Local,
                attrs,
                next_hop,
                stale: false,
            }),
        );
    }

    /// Withdraws a local route.
    pub fn withdraw_local(&mut self, prefix: IpNet) {
        self.remove(prefix, Source::Local);
    }

    /// Locally originated prefixes.
    pub fn local_prefixes(&self) -> Vec<IpNet> {
        self.paths
            .iter()
            .filter(|(_, ps)| ps.iter().any(|p| p.source == Source::Local))
            .map(|(k, _)| k)
            .collect()
    }

    fn put(&mut self, prefix: IpNet, path: Path) {
        match self.paths.get_mut(&prefix) {
            Some(ps) => ps.put(path),
            None => {
                self.paths.insert(prefix, Paths::new(path));
            }
        }
        self.dirty.add(prefix);
    }

    fn remove(&mut self, prefix: IpNet, source: Source) -> bool {
        let Some(ps) = self.paths.get_mut(&prefix) else {
            return false;
        };
        let removed = ps.retain(|p| p.source != source);
        if ps.is_dead() {
            self.paths.remove(&prefix);
        }
        if removed > 0 {
            self.dirty.add(prefix);
        }
        removed > 0
    }

    /// A session came up: the peer gets the whole table at the next [`flush`](Rib::flush).
    pub fn peer_up(&mut self, id: PeerId, info: PeerInfo) {
        self.peers.insert(id, info);
        self.adj_out.insert(id, HashMap::new());
        self.resend.remove(&id);
        self.dirty.extend(self.paths.keys());
    }

    /// New filters for an established peer: what it is sent is decided again at the next
    /// [`flush`](Rib::flush). Returns whether the import filter changed — its paths then need
    /// sending again (ROUTE-REFRESH, RFC 2918) to be filtered anew.
    pub fn set_peer_filters(&mut self, id: PeerId, import: Vec<Rule>, export: Vec<Rule>) -> bool {
        let Some(peer) = self.peers.get_mut(&id) else {
            return false;
        };
        let import_changed = peer.import != import;
        if peer.export != export {
            peer.export = export;
            self.dirty.extend(self.paths.keys());
        }
        peer.import = import;
        import_changed
    }

    /// A session went down. The peer's paths of the families in `retain` stay, marked stale,
    /// until [`sweep_stale`](Rib::sweep_stale) (it restarts gracefully, RFC 4724 §4.2, and
    /// preserves forwarding for them — see [`crate::restart`]); all others go now.
    pub fn peer_down(&mut self, id: PeerId, retain: &[u16]) {
        self.peers.remove(&id);
        self.adj_out.remove(&id);
        self.rejected.remove(&id);
        self.pending.remove(&id);
        self.resend.remove(&id);
        let mut stale = HashMap::new();
        for (prefix, ps) in self.paths.iter_mut() {
            if retain.contains(&afi_of(&prefix)) {
                ps.mark_stale(|p| p.source == Source::Peer(id), &mut stale);
            }
        }
        self.drop_paths(id, |prefix, _| !retain.contains(&afi_of(prefix)));
    }

    /// Removes the peer's paths still stale (End-of-RIB received, or the restart time passed).
    pub fn sweep_stale(&mut self, id: PeerId) {
        self.drop_paths(id, |_, p| p.stale);
    }

    /// Removes the peer's stale paths of one family (its End-of-RIB, or it no longer preserves
    /// forwarding for it, RFC 4724 §4.2).
    pub fn sweep_stale_family(&mut self, id: PeerId, afi: u16) {
        self.drop_paths(id, |prefix, p| p.stale && afi_of(prefix) == afi);
    }

    fn drop_paths(&mut self, id: PeerId, which: impl Fn(&IpNet, &Path) -> bool) {
        let src = Source::Peer(id);
        let mut gone = 0;
        self.paths.retain(|prefix, ps| {
            let removed = ps.retain(|p| !(p.source == src && which(&prefix, p)));
            if removed > 0 {
                gone += 1;
                self.dirty.add(prefix);
            }
            !ps.is_dead()
        });
        if let Some(a) = self.accepted.get_mut(&id) {
            *a = a.saturating_sub(gone);
        }
    }

    /// The peer asked for the table again (ROUTE-REFRESH, RFC 2918): everything it was sent
    /// goes again at the next flush that finds it ready. The peer keeps what it holds until
    /// then, so its Adj-RIB-Out is kept too: a prefix withdrawn meanwhile is withdrawn from it
    /// (forgetting what it was sent would leave that route with the peer for good).
    pub fn refresh(&mut self, id: PeerId) {
        if let Some(o) = self.adj_out.get(&id) {
            self.resend.entry(id).or_default().extend(o.keys().copied());
        }
    }

    /// Applies an UPDATE from a peer (after RFC 7606 processing in the decoder).
    pub fn apply_update(&mut self, id: PeerId, u: &Update) -> ImportReport {
        let mut report = ImportReport::default();
        let Some(peer) = self.peers.get(&id).cloned() else {
            return report;
        };
        for p in u.withdrawals() {
            self.rejected.entry(id).or_default().remove(p);
            if self.remove(*p, Source::Peer(id)) {
                report.withdrawn += 1;
                {
                    let a = self.accepted.entry(id).or_default();
                    *a = a.saturating_sub(1);
                }
            }
        }
        if u.announced().next().is_none() {
            return report;
        }
        let mut attrs = u.attrs.clone();
        attrs.layout.0.clear();
        let ibgp = peer.asn == self.cfg().asn;
        if !ibgp {
            attrs.local_pref = None;
        }
        let reason = self.loop_check(&attrs, ibgp, peer.allow_local_as);
        let attrs = Arc::new(attrs);
        // One shared path per next hop: every prefix of the UPDATE points at it.
        let path_via = |nh: Option<IpAddr>| {
            nh.map(|next_hop| {
                Path::new(PathInfo {
                    source: Source::Peer(id),
                    attrs: attrs.clone(),
                    next_hop,
                    stale: false,
                })
            })
        };
        let v4_path = path_via(u.attrs.next_hop.map(IpAddr::V4));
        let mp_path = path_via(u.mp_reach.as_ref().and_then(|m| m.next_hop_addr()));
        let with_nh = u.nlri.iter().map(|p| (*p, &v4_path));
        let with_mp = u
            .mp_reach
            .iter()
            .flat_map(|m| m.nlri.iter())
            .map(|p| (*p, &mp_path));
        for (p, path) in with_nh.chain(with_mp) {
            if let Some(l) = peer.max_prefixes {
                if self.held(id) >= l.limit && !self.holds(id, &p) {
                    report.over_limit += 1;
                    report.over_limit_afi.get_or_insert(afi_of(&p));
                    if l.action != LimitAction::Warn {
                        continue;
                    }
                }
            }
            let why = reason.or(match path {
                None => Some("no next hop"),
                Some(x) if x.next_hop == peer.local_address => Some("next hop is this node"),
                _ if !policy::accepts(&peer.import, &p, true) => Some("rejected by a BGPFilter"),
                _ => None,
            });
            if let Some(why) = why {
                self.rejected.entry(id).or_default().insert(p);
                if self.remove(p, Source::Peer(id)) {
                    {
                        let a = self.accepted.entry(id).or_default();
                        *a = a.saturating_sub(1);
                    }
                }
                report.rejected.push((p, why));
                continue;
            }
            self.rejected.entry(id).or_default().remove(&p);
            let fresh = !self
                .paths
                .get(&p)
                .is_some_and(|ps| ps.iter().any(|x| x.source == Source::Peer(id)));
            if fresh {
                *self.accepted.entry(id).or_default() += 1;
            }
            self.put(p, path.clone().expect("checked"));
            report.accepted += 1;
        }
        report
    }

    /// Loop prevention: our AS in the path (eBGP), our ID as originator or our cluster in the
    /// cluster list (RFC 4456 §8).
    fn loop_check(&self, a: &PathAttrs, ibgp: bool, allow_local_as: usize) -> Option<&'static str> {
        let c = self.cfg();
        if !ibgp && a.as_path.count(c.asn) > allow_local_as {
            return Some("AS path contains our AS");
        }
        if a.originator_id == Some(c.router_id) {
            return Some("ORIGINATOR_ID is ours");
        }
        if a.cluster_list
            .contains(&c.cluster_id.unwrap_or(c.router_id))
        {
            return Some("CLUSTER_LIST contains our cluster");
        }
        None
    }

    fn better(&self, a: &Path, b: &Path) -> Ordering {
        let info = |p: &Path| match p.source {
            Source::Peer(id) => self.peers.get(&id),
            Source::Local => None,
        };
        let (ia, ib) = (info(a), info(b));
        let ebgp = |i: Option<&PeerInfo>| i.is_some_and(|i| i.asn != self.cfg().asn);
        let lp = |p: &Path| p.attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF);
        let rid = |p: &Path, i: Option<&PeerInfo>| {
            p.attrs
                .originator_id
                .or(i.map(|i| i.router_id))
                .map(u32::from)
                .unwrap_or(0)
        };
        let addr = |i: Option<&PeerInfo>| i.map(|i| i.address);
        (b.source == Source::Local)
            .cmp(&(a.source == Source::Local))
            .then(a.stale.cmp(&b.stale))
            .then(lp(b).cmp(&lp(a)))
            .then(
                a.attrs
                    .as_path
                    .decision_len()
                    .cmp(&b.attrs.as_path.decision_len()),
            )
            .then(a.attrs.origin.cmp(&b.attrs.origin))
            .then(
                if a.attrs.as_path.first_as() == b.attrs.as_path.first_as() {
                    a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
                } else {
                    Ordering::Equal
                },
            )
            .then(ebgp(ib).cmp(&ebgp(ia)))
            .then(rid(a, ia).cmp(&rid(b, ib)))
            .then(a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()))
            .then(addr(ia).cmp(&addr(ib)))
    }

    fn best(&self, prefix: &IpNet) -> Option<&Path> {
        let resolvable =
            |p: &&Path| p.source == Source::Local || self.resolve(p.next_hop).is_some();
        self.paths
            .get(prefix)?
            .iter()
            .filter(resolvable)
            .min_by(|a, b| self.better(a, b))
    }

    /// What `best` looks like when sent to peer `to`, or `None` if it must not be sent.
    fn export(&self, best: &Path, to: PeerId, prefix: &IpNet) -> Option<(PathAttrs, IpAddr)> {
        let c = self.cfg();
        let peer = self.peers.get(&to)?;
        if !peer.families.contains(&afi_of(prefix))
            || peer.local_address.is_ipv4() != prefix.addr().is_ipv4()
        {
            return None;
        }
        let from = match best.source {
            Source::Peer(id) if id == to => return None,
            Source::Peer(id) => self.peers.get(&id).map(|i| (id, i)),
            Source::Local => None,
        };
        if !policy::accepts(&peer.export, prefix, best.source != Source::Local) {
            return None;
        }
        let to_ibgp = peer.asn == c.asn;
        let from_ibgp = from.is_some_and(|(_, i)| i.asn == c.asn);
        if to_ibgp && from_ibgp {
            // RFC 4456 §6: only a reflector passes iBGP routes on, and only client↔any.
            let client_src = from.is_some_and(|(_, i)| i.rr_client);
            if c.cluster_id.is_none() || !(client_src || peer.rr_client) {
                return None;
            }
        }
        let mut a = (*best.attrs).clone();
        a.layout.0.clear();
        let nh = match (from, peer.next_hop) {
            (None, _) | (Some(_), NextHopMode::SetSelf) => peer.local_address,
            (Some(_), NextHopMode::Keep) => best.next_hop,
            (Some(_), NextHopMode::Auto) if to_ibgp && from_ibgp => best.next_hop,
            (Some(_), NextHopMode::Auto) => peer.local_address,
        };
        if to_ibgp {
            a.local_pref = Some(a.local_pref.unwrap_or(DEFAULT_LOCAL_PREF));
            if from_ibgp {
                let (_, src) = from.expect("from_ibgp");
                a.originator_id.get_or_insert(src.router_id);
                a.cluster_list.insert(0, c.cluster_id.expect("reflector"));
            }
        } else {
            if a.as_path.contains(peer.asn) {
                return None; // the peer would drop it as a loop
            }
            a.as_path = a.as_path.prepend(c.asn);
            a.local_pref = None;
            a.originator_id = None;
            a.cluster_list.clear();
            if from.is_some() {
                a.med = None; // RFC 4271 §5.1.4: MED is not passed to other ASes
            }
        }
        a.next_hop = match nh {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        };
        Some((a, nh))
    }

    /// Records `prefix`'s kernel route (its immediate next hop, or none); whether it changed. A
    /// prefix left with neither paths nor a kernel route goes.
    fn install(&mut self, prefix: IpNet, want: Option<IpAddr>) -> bool {
        let Some(ps) = self.paths.get_mut(&prefix) else {
            return false; // no paths, so nothing wanted, and nothing was installed
        };
        let old: NhId = ps.installed();
        if self.next_hops.get(old).copied() == want {
            return false;
        }
        let new = want.map_or(NOT_INSTALLED, |nh| self.next_hops.acquire(nh));
        self.next_hops.release(old);
        ps.set_installed(new);
        self.installed += usize::from(new != NOT_INSTALLED);
        self.installed -= usize::from(old != NOT_INSTALLED);
        if ps.is_dead() {
            self.paths.remove(&prefix);
        }
        true
    }

    /// Runs the decision process for every changed prefix and returns what each peer must be
    /// sent, plus whether the kernel routes changed.
    pub fn flush(&mut self) -> (Vec<(PeerId, Outbound)>, bool) {
        self.flush_when(|_| true)
    }

    /// [`flush`](Rib::flush) for the peers `ready` names; for the others the changed prefixes
    /// are remembered (coalesced) and sent by a later flush that finds them ready.
    pub fn flush_when(
        &mut self,
        ready: impl Fn(PeerId) -> bool,
    ) -> (Vec<(PeerId, Outbound)>, bool) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut kernel_changed = false;
        let (peers, waiting): (Vec<PeerId>, Vec<PeerId>) =
            self.peers.keys().copied().partition(|id| ready(*id));
        for id in waiting {
            self.pending.entry(id).or_default().extend(dirty.keys());
        }
        let mut catch_up: HashMap<PeerId, HashSet<IpNet>> = HashMap::new();
        let mut forced: HashMap<PeerId, HashSet<IpNet>> = HashMap::new();
        for id in &peers {
            if let Some(p) = self.pending.remove(id) {
                catch_up.insert(*id, p);
            }
            if let Some(p) = self.resend.remove(id) {
                forced.insert(*id, p);
            }
        }
        // The changed prefixes and, not among them, those a peer is owed: each decided once
        // (a full table is dirty at once when it arrives; no copy of the set is made).
        let owed: HashSet<IpNet> = catch_up
            .values()
            .chain(forced.values())
            .flatten()
            .filter(|p| !dirty.contains(p))
            .copied()
            .collect();
        let mut outs: HashMap<PeerId, (Groups, Outbound)> = HashMap::new();
        let mut interned: HashMap<(usize, PeerId), Arc<PathAttrs>> = HashMap::new();
        for prefix in dirty.keys().chain(owed.iter().copied()) {
            let best = self.best(&prefix).cloned();
            let want = best.as_ref().and_then(|b| match b.source {
                Source::Peer(_) => self.resolve(b.next_hop),
                Source::Local => None,
            });
            kernel_changed |= self.install(prefix, want);
            for &to in &peers {
                let force = forced.get(&to).is_some_and(|f| f.contains(&prefix));
                if !force
                    && !dirty.contains(&prefix)
                    && !catch_up.get(&to).is_some_and(|c| c.contains(&prefix))
                {
                    continue;
                }
                let new = best.as_ref().and_then(|b| {
                    let (a, nh) = self.export(b, to, &prefix)?;
                    let key = (Arc::as_ptr(&b.attrs) as usize, to);
                    let arc = match interned.get(&key) {
                        Some(x) if **x == a => x.clone(),
                        _ => {
                            let x = Arc::new(a);
                            interned.insert(key, x.clone());
                            x
                        }
                    };
                    Some((arc, nh))
                });
                let out = self.adj_out.entry(to).or_default();
                let same = match (&new, out.get(&prefix)) {
                    (Some(n), Some(o)) => {
                        !force && n.1 == o.1 && (Arc::ptr_eq(&n.0, &o.0) || n.0 == o.0)
                    }
                    (None, None) => true,
                    _ => false,
                };
                if same {
                    continue;
                }
                let (groups, ob) = outs.entry(to).or_default();
                match new {
                    Some((a, nh)) => {
                        let g = (Arc::as_ptr(&a) as usize, nh);
                        let i = *groups.entry(g).or_insert_with(|| {
                            ob.announce.push((a.clone(), nh, Vec::new()));
                            ob.announce.len() - 1
                        });
                        ob.announce[i].2.push(prefix);
                        out.insert(prefix, (a, nh));
                    }
                    None => {
                        out.remove(&prefix);
                        ob.withdraw.push(prefix);
                    }
                }
            }
        }
        let mut v: Vec<(PeerId, Outbound)> = outs.into_iter().map(|(k, (_, o))| (k, o)).collect();
        v.sort_by_key(|(k, _)| *k);
        (v, kernel_changed)
    }
}

/// The kernel routes a [`Rib`] decided at its last flush (prefix → immediate next hop), read in
/// place.
#[derive(Debug, Clone, Copy)]
pub struct Installed<'a> {
    rib: &'a Rib,
}

impl<'a> Installed<'a> {
    pub fn len(&self) -> usize {
        self.rib.installed
    }

    pub fn is_empty(&self) -> bool {
        self.rib.installed == 0
    }

    pub fn get(&self, prefix: &IpNet) -> Option<IpAddr> {
        let ps = self.rib.paths.get(prefix)?;
        self.rib.next_hops.get(ps.installed()).copied()
    }

    pub fn contains_key(&self, prefix: &IpNet) -> bool {
        self.get(prefix).is_some()
    }

    /// In no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, IpAddr)> + 'a {
        let rib = self.rib;
        rib.paths
            .iter()
            .filter_map(|(k, ps)| Some((k, *rib.next_hops.get(ps.installed())?)))
    }

    pub fn keys(&self) -> impl Iterator<Item = IpNet> + 'a {
        let rib = self.rib;
        rib.paths
            .iter()
            .filter(|(_, ps)| ps.installed() != NOT_INSTALLED)
            .map(|(k, _)| k)
    }
}

impl std::ops::Index<&IpNet> for Installed<'_> {
    type Output = IpAddr;
    fn index(&self, prefix: &IpNet) -> &IpAddr {
        let id = self
            .rib
            .paths
            .get(prefix)
            .map_or(NOT_INSTALLED, Paths::installed);
        self.rib
            .next_hops
            .get(id)
            .expect("no kernel route for this prefix")
    }
}

#[cfg(test)]
mod tests;
