//! The policy compiler (pure, no I/O): the model and this node's name → Trellis's nftables
//! table as data ([`Ruleset`]), and an incremental engine ([`PolicyEngine`]) that turns each
//! change of the model into a small batch of nftables operations ([`Ops`]).
//!
//! # API (for the agent's applier)
//!
//! ```text
//! let mut engine = PolicyEngine::new("node-1");           // or PolicyEngine::with_model(node, model)
//! apply(engine.full().to_nft_json())?;                     // startup: one atomic replace of the table
//! loop {
//!     let ops = engine.handle(Change::EndpointUpsert(ep)); // one change of the model
//!     if !ops.is_empty() { apply(ops.to_nft_json())? }     // one atomic `nft -j -f -` transaction
//! }
//! // resync: drift::differs(Some(&listing), engine.full()) → apply(engine.full().to_nft_json())
//! ```
//!
//! - [`compile`]`(&model, node) -> Ruleset`: the whole table, from scratch.
//! - [`PolicyEngine::handle`]`(change) -> Ops`: endpoint upsert/remove, namespace labels, policy,
//!   tier, network set, profile and service account upsert/remove. A pod appearing or changing
//!   labels yields set-element changes and at most its own small chains; a policy change
//!   rebuilds that policy's chains and the tier chains of the endpoints it applies to. After
//!   `handle`, [`PolicyEngine::full`] equals `compile(model)` (a property test checks that the
//!   ops carry the previous ruleset exactly there). When the node's IP families change (its
//!   first IPv6 endpoint), the ops are one whole-table replace.
//! - [`Ops::to_nft_json`] / [`Ruleset::to_nft_json`]: the nft JSON batch (`{"nftables": [...]}`)
//!   for `nft -j -f -` (`trellis_dataplane::nft::apply_document`). nft applies a batch
//!   atomically: if it fails, the previous ruleset stays fully in force, and the engine's state is
//!   already the desired one — replace the table with `engine.full()` to converge.
//! - [`Ops::element_keys`] ([`elements`]): a batch that only changes hash-set elements, as the
//!   key bytes `trellis_dataplane::nft_elements::apply_elements` sends over netlink (no `nft`
//!   run, no cache fetch): the fast path for label changes and remote pods.
//! - [`drift::differs`]`(listing, &ruleset)`: whether the kernel's table (`nft -j -n list table
//!   inet trellis_policy`, i.e. `trellis_dataplane::nft::list_table_numeric`) differs from the
//!   expected ruleset; [`drift::differences`] says how.
//! - [`names::rule_label`]: the comment and log prefix of a rule; [`drift::rule_counters`] sums
//!   the kernel's per-rule counters by it (metrics, `policy trace --kernel`).
//!
//! # Layout (POLICY.md "nftables layout")
//!
//! Table `inet trellis_policy`. Base chain `forward`: `ct state established,related accept`,
//! `iifname "trl*" ct state invalid drop`, `iifname vmap @from_endpoint`, `iifname "trl*" drop`,
//! `goto dispatch_in`; `dispatch_in`: `oifname "trl*" ct state invalid drop`, `oifname vmap
//! @to_endpoint`, `oifname "trl*" drop`, `accept`. Invalid packets are dropped only from and to
//! endpoints: a node that merely routes (an asymmetric return path) sees mid-flow packets
//! conntrack calls invalid, and they are not policy's business. Per programmed local endpoint: `ep_out_<id>` / `ep_in_<id>` (clear the mark bits;
//! jump each applying tier's chain `ep_<id>_<dir>_t<n>` and leave when the allow bit is set;
//! then profiles; then allowed, or drop when it lists profiles), entered by `goto` from the
//! maps. A tier chain jumps each applying policy's chain `pol_<hash>_<dir>` (shared by every
//! endpoint) and returns once a bit is set; then the tier's default. Policy rules set the allow
//! or pass bit and return, drop, or log and continue; each carries a named counter and comment
//! with its rule label (the `counter` in each rule is anonymous, identified by that comment). Selectors become interval sets `sel_<hash>_v4|v6` holding the addresses
//! of matching endpoints cluster-wide and matching NetworkSets' nets; named ports become
//! `np_<hash>_v4|v6` sets of `addr . proto . port`.
//!
//! Local endpoints are programmed when they have a valid interface name (see
//! [`names::valid_interface`]); when two claim one interface, the first by (namespace, name)
//! owns it. Rules and sets exist for the IP families the programmed endpoints have addresses in.

pub mod drift;
pub mod elements;
mod engine;
pub mod intervals;
pub mod names;
mod nft_json;
pub mod rules;
pub mod ruleset;
mod text;

use std::collections::{BTreeMap, BTreeSet};

pub use engine::{Change, PolicyEngine};
pub use rules::Families;
pub use ruleset::{
    ApplyError, Chain, Element, Expr, Family, NftOp, Op, Ops, Rule, Ruleset, Set, SetKind, Stmt,
    Verdict, VerdictMap,
};

use crate::model::{Direction, Endpoint, Model, PolicyId};
use rules::{CompiledChain, Gen, SetSpec};
use ruleset::{FROM_ENDPOINT, TO_ENDPOINT};

/// Settings of the compiled table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileConfig {
    /// The packet-mark bit a policy's Allow sets.
    pub allow_mark: u32,
    /// The packet-mark bit a Pass (or a tier's Pass default) sets.
    pub pass_mark: u32,
    /// The NFLOG group that the deciding rules (Allow, Deny, tier and endpoint defaults) copy
    /// each packet they decide to, for the agent's flow log; `None`: flow logs off. Only the
    /// first packet of a connection reaches those rules (established traffic is accepted
    /// first), so this costs one copy per new connection.
    pub flow_log_group: Option<u16>,
}

/// Bytes of a packet the flow log copies (headers and ports).
pub const FLOW_LOG_SNAPLEN: u32 = 128;

impl Default for CompileConfig {
    fn default() -> Self {
        CompileConfig {
            allow_mark: 0x0001_0000,
            pass_mark: 0x0002_0000,
            flow_log_group: None,
        }
    }
}

/// The whole table for `node`, with the default settings.
pub fn compile(model: &Model, node: &str) -> Ruleset {
    compile_with(model, node, &CompileConfig::default())
}

/// A chain shared by every endpoint that uses it: a policy's or a profile's, per direction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Shared {
    Policy(PolicyId, Direction),
    Profile(String, Direction),
}

impl Shared {
    pub(crate) fn chain_name(&self) -> String {
        match self {
            Shared::Policy(id, d) => names::policy_chain(id, *d),
            Shared::Profile(p, d) => names::profile_chain(p, *d),
        }
    }

    /// Its chain; `None` when the policy or profile no longer exists.
    pub(crate) fn compile(&self, model: &Model, gen: &Gen) -> Option<CompiledChain> {
        match self {
            Shared::Policy(id, d) => model
                .policies
                .get(id)
                .map(|p| rules::policy_chain(p, *d, gen)),
            Shared::Profile(name, d) => model
                .profiles
                .get(name)
                .map(|p| rules::profile_chain(p, *d, gen)),
        }
    }
}

/// The local endpoints that get programmed, by interface: on `node`, with a valid interface
/// name; the first by (namespace, name) among several claiming one interface.
pub(crate) fn programmed<'a>(model: &'a Model, node: &str) -> BTreeMap<&'a str, &'a Endpoint> {
    let mut out = BTreeMap::new();
    for ep in model.endpoints.values() {
        if ep.node != node {
            continue;
        }
        if let Some(i) = ep
            .interface
            .as_deref()
            .filter(|i| names::valid_interface(i))
        {
            out.entry(i).or_insert(ep);
        }
    }
    out
}

/// An endpoint's chains (both directions) and the shared chains they jump to.
pub(crate) fn endpoint_program(
    model: &Model,
    ep: &Endpoint,
    applying: &[&crate::model::Policy],
    cfg: &CompileConfig,
) -> (Vec<(String, Chain)>, BTreeSet<Shared>) {
    let id = names::endpoint_id(&ep.namespace, &ep.name);
    let profiles: Vec<&str> = ep
        .profiles
        .iter()
        .filter(|p| model.profiles.contains_key(*p))
        .map(String::as_str)
        .collect();
    let mut chains = Vec::new();
    let mut shared = BTreeSet::new();
    for d in [Direction::Ingress, Direction::Egress] {
        let tiers = rules::group_by_tier(
            model,
            applying.iter().copied().filter(|p| p.rules(d).is_some()),
        );
        for (_, ps) in &tiers {
            shared.extend(ps.iter().map(|p| Shared::Policy(p.id.clone(), d)));
        }
        shared.extend(profiles.iter().map(|p| Shared::Profile(p.to_string(), d)));
        let lists = !ep.profiles.is_empty();
        let mut ep_chains = rules::endpoint_chains(&id, d, &tiers, &profiles, lists, cfg);
        if d == Direction::Egress {
            let main = names::endpoint_chain(&id, d);
            if let Some((_, c)) = ep_chains.iter_mut().find(|(n, _)| *n == main) {
                c.rules.splice(0..0, rules::source_guard(&ep.addresses));
            }
        }
        chains.extend(ep_chains);
    }
    (chains, shared)
}

/// The whole table for `node`.
pub fn compile_with(model: &Model, node: &str, cfg: &CompileConfig) -> Ruleset {
    let owners = programmed(model, node);
    let fams = Families::of(owners.values().flat_map(|e| &e.addresses));
    let mut rs = rules::skeleton();
    let mut shared = BTreeSet::new();
    for (iface, ep) in &owners {
        let labels = ep.effective_labels(&model.profiles);
        let applying: Vec<_> = model
            .policies
            .values()
            .filter(|p| model.policy_applies(p, ep, &labels))
            .collect();
        let (chains, uses) = endpoint_program(model, ep, &applying, cfg);
        rs.chains.extend(chains);
        shared.extend(uses);
        let id = names::endpoint_id(&ep.namespace, &ep.name);
        for (map, d) in [
            (FROM_ENDPOINT, Direction::Egress),
            (TO_ENDPOINT, Direction::Ingress),
        ] {
            let m = rs.maps.get_mut(map).expect("skeleton map");
            m.elements
                .insert(iface.to_string(), names::endpoint_chain(&id, d));
        }
    }
    // Which sets the shared chains look up (their names wait for the contents: a set that
    // holds nets is an interval set with another name).
    let no_nets = |_: &str, _: Family| false;
    let gen = Gen {
        cfg,
        fams,
        nets: &no_nets,
    };
    let mut specs: BTreeMap<String, SetSpec> = BTreeMap::new();
    for s in &shared {
        for spec in s
            .compile(model, &gen)
            .map(|cc| cc.specs)
            .unwrap_or_default()
        {
            specs.entry(spec.key.clone()).or_insert(spec);
        }
    }
    let labelled: Vec<_> = model
        .endpoints
        .values()
        .map(|e| (e, e.effective_labels(&model.profiles)))
        .collect();
    let mut with_nets: BTreeMap<&str, Families> = BTreeMap::new();
    let mut contents = Vec::new();
    for spec in specs.values() {
        let mut pieces = Vec::new();
        for (ep, labels) in &labelled {
            pieces.extend(spec.endpoint_pieces(model, ep, labels, fams));
        }
        for set in &model.network_sets {
            let nets = spec.network_set_pieces(model, set, fams);
            let f = with_nets.entry(spec.key.as_str()).or_default();
            for p in &nets {
                match p {
                    rules::Piece::Addr(Family::V4, _) => f.v4 = true,
                    rules::Piece::Addr(Family::V6, _) => f.v6 = true,
                    rules::Piece::Port(..) => {}
                }
            }
            pieces.extend(nets);
        }
        contents.push((spec, pieces));
    }
    let has_nets = |k: &str, f: Family| with_nets.get(k).is_some_and(|n| n.contains(f));
    for (spec, pieces) in contents {
        for f in fams.list() {
            let nets = has_nets(&spec.key, f);
            let kind = spec.kind(f, nets);
            let elements = rules::elements_of(kind, &pieces);
            rs.sets.insert(spec.name(f, nets), Set { kind, elements });
        }
    }
    let gen = Gen {
        cfg,
        fams,
        nets: &has_nets,
    };
    for s in &shared {
        if let Some(cc) = s.compile(model, &gen) {
            rs.chains.insert(s.chain_name(), cc.chain);
        }
    }
    rs
}
