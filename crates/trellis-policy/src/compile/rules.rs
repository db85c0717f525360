//! Model → chains and set specs (pure). Used by both the batch compiler and the engine, so a
//! chain's content never depends on which of them built it.
//!
//! A model rule becomes one nft rule per *variant*: per IP family when it matches anything
//! family-specific (addresses, selectors, named ports, ICMP, ipVersion), and per alternative
//! where nft has no OR inside a rule (numeric ports OR named ports; `notICMP` type AND code).
//! Alternatives are made disjoint (the named-port variant excludes the numeric ports), so a Log
//! rule logs a packet once. Statements are emitted in the form `nft -j -n list` prints back:
//! no `meta nfproto` before an `ip`/`icmp` payload and no `meta l4proto` before a `tcp`/`udp`
//! payload (nft adds those dependencies itself and hides them when listing).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::intervals::{self, Interval};
use super::names;
use super::ruleset::{
    Chain, Element, Expr, Family, Op, Rule as NftRule, Ruleset, SetKind, Stmt, Verdict, VerdictMap,
    DISPATCH_IN, ENDPOINT_IFACE_WILDCARD, FORWARD, FROM_ENDPOINT, TO_ENDPOINT,
};
use super::CompileConfig;
use crate::model::{
    order_key, Action, Direction, Endpoint, EntityMatch, IcmpMatch, Model, NamespaceScope,
    NetworkSet, Policy, PortMatch, Profile, Protocol, Rule, RuleId, Selection, Tier,
};

/// The IP families the node's programmed endpoints use; rules and sets exist only for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    pub fn of<'a>(addrs: impl IntoIterator<Item = &'a IpAddr>) -> Families {
        let mut f = Families::default();
        for a in addrs {
            match Family::of(a) {
                Family::V4 => f.v4 = true,
                Family::V6 => f.v6 = true,
            }
        }
        f
    }

    pub fn contains(self, f: Family) -> bool {
        match f {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    pub fn list(self) -> impl Iterator<Item = Family> {
        Family::BOTH.into_iter().filter(move |f| self.contains(*f))
    }
}

/// What generating a shared chain needs besides the model: settings, the node's families, and
/// which address sets hold nets (those are interval sets with another name).
pub struct Gen<'a> {
    pub cfg: &'a CompileConfig,
    pub fams: Families,
    /// Whether the set of this spec key holds nets in this family.
    pub nets: &'a dyn Fn(&str, Family) -> bool,
}

/// A named set a rule looks up, identified by its canonical key.
#[derive(Debug, Clone)]
pub struct SetSpec {
    pub key: String,
    hash: String,
    pub what: SpecKind,
}

#[derive(Debug, Clone)]
pub enum SpecKind {
    /// Addresses of the endpoints and nets of the network sets a selection covers.
    Addresses(Selection),
    /// `addr . proto . port` of the named ports (any of `names`, of `protocol` if set) that the
    /// endpoints of the selection (all endpoints when `None`) declare.
    NamedPorts {
        selection: Option<Selection>,
        names: Vec<String>,
        protocol: Option<Protocol>,
    },
}

/// What one contributor (an endpoint or a network set) puts into a set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Piece {
    Addr(Family, Interval),
    Port(IpAddr, u8, u16),
}

impl SetSpec {
    pub fn addresses(sel: Selection) -> SetSpec {
        let key = format!("addr {sel}");
        SetSpec {
            hash: names::short_hash(&key),
            key,
            what: SpecKind::Addresses(sel),
        }
    }

    pub fn named_ports(
        selection: Option<Selection>,
        mut port_names: Vec<String>,
        protocol: Option<Protocol>,
    ) -> SetSpec {
        port_names.sort();
        port_names.dedup();
        let sel = selection.as_ref().map(|s| s.to_string());
        let key = format!("ports {port_names:?} {protocol:?} of {sel:?}");
        SetSpec {
            hash: names::short_hash(&key),
            key,
            what: SpecKind::NamedPorts {
                selection,
                names: port_names,
                protocol,
            },
        }
    }

    /// The set's name for a family: `sel_<hash>_v4` (addresses), `seln_<hash>_v4` (addresses
    /// and nets), `np_<hash>_v4` (named ports).
    pub fn name(&self, f: Family, nets: bool) -> String {
        let prefix = match (&self.what, nets) {
            (SpecKind::Addresses(_), false) => "sel",
            (SpecKind::Addresses(_), true) => "seln",
            (SpecKind::NamedPorts { .. }, _) => "np",
        };
        format!("{prefix}_{}_{}", self.hash, f.suffix())
    }

    pub fn kind(&self, f: Family, nets: bool) -> SetKind {
        match (&self.what, nets) {
            (SpecKind::Addresses(_), false) => SetKind::Addresses(f),
            (SpecKind::Addresses(_), true) => SetKind::Networks(f),
            (SpecKind::NamedPorts { .. }, _) => SetKind::NamedPorts(f),
        }
    }

    /// What an endpoint (with effective labels `labels`) contributes, in `families`.
    pub fn endpoint_pieces(
        &self,
        model: &Model,
        ep: &Endpoint,
        labels: &crate::model::Labels,
        families: Families,
    ) -> Vec<Piece> {
        let addrs = ep
            .addresses
            .iter()
            .filter(|a| families.contains(Family::of(a)));
        match &self.what {
            SpecKind::Addresses(sel) => {
                if !sel.matches_endpoint(model, ep, labels) {
                    return Vec::new();
                }
                addrs
                    .map(|a| {
                        let v = intervals::addr_bits(a);
                        Piece::Addr(Family::of(a), (v, v))
                    })
                    .collect()
            }
            SpecKind::NamedPorts {
                selection,
                names,
                protocol,
            } => {
                let selected = selection
                    .as_ref()
                    .is_none_or(|s| s.matches_endpoint(model, ep, labels));
                if !selected {
                    return Vec::new();
                }
                let ports: Vec<_> = ep
                    .ports
                    .iter()
                    .filter(|p| names.contains(&p.name))
                    // By number: a rule may name TCP as `6` (Protocol::Number(6)).
                    .filter(|p| protocol.is_none_or(|want| want.number() == p.protocol.number()))
                    .collect();
                addrs
                    .flat_map(|a| {
                        ports
                            .iter()
                            .map(move |p| Piece::Port(*a, p.protocol.number(), p.port))
                    })
                    .collect()
            }
        }
    }

    /// What a network set contributes, in `families` (only to address sets).
    pub fn network_set_pieces(&self, model: &Model, set: &NetworkSet, f: Families) -> Vec<Piece> {
        match &self.what {
            SpecKind::Addresses(sel) if sel.matches_network_set(model, set) => set
                .nets
                .iter()
                .map(intervals::net_interval)
                .filter(|(fam, _)| f.contains(*fam))
                .map(|(fam, iv)| Piece::Addr(fam, iv))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// Turns pieces into the elements of the `f` set (batch: overlap components).
pub fn elements_of(kind: SetKind, pieces: &[Piece]) -> std::collections::BTreeSet<Element> {
    match kind {
        SetKind::Addresses(f) | SetKind::Networks(f) => {
            let ivs = pieces
                .iter()
                .filter_map(|p| match p {
                    Piece::Addr(fam, iv) if *fam == f => Some(*iv),
                    _ => None,
                })
                .collect();
            intervals::merge_overlapping(ivs)
                .into_iter()
                .map(|iv| intervals::element(f, iv))
                .collect()
        }
        SetKind::NamedPorts(f) => pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Port(a, proto, port) if Family::of(a) == f => Some(Element::NamedPort {
                    addr: *a,
                    proto: *proto,
                    port: *port,
                }),
                _ => None,
            })
            .collect(),
    }
}

/// A policy's or profile's chain, and the sets its rules look up.
#[derive(Debug, Clone, Default)]
pub struct CompiledChain {
    pub chain: Chain,
    pub specs: Vec<SetSpec>,
}

impl CompiledChain {
    /// Records that the chain looks up `s`'s set of family `f`, and returns its name.
    fn spec(&mut self, s: SetSpec, f: Family, gen: &Gen) -> String {
        let name = s.name(f, (gen.nets)(&s.key, f));
        if !self.specs.iter().any(|x| x.key == s.key) {
            self.specs.push(s);
        }
        name
    }
}

/// The chain of `policy` for direction `d`.
pub fn policy_chain(policy: &Policy, d: Direction, gen: &Gen) -> CompiledChain {
    let scope = policy.rule_scope();
    let mut out = CompiledChain::default();
    for (index, r) in policy.rules(d).unwrap_or(&[]).iter().enumerate() {
        let label = names::rule_label(&RuleId {
            policy: policy.id.clone(),
            direction: d,
            index,
        });
        compile_rule(r, &label, &scope, gen, &mut out);
    }
    out
}

/// The chain of `profile` for direction `d` (its selectors look everywhere).
pub fn profile_chain(profile: &Profile, d: Direction, gen: &Gen) -> CompiledChain {
    let rules = match d {
        Direction::Ingress => &profile.ingress,
        Direction::Egress => &profile.egress,
    };
    let mut out = CompiledChain::default();
    for (index, r) in rules.iter().enumerate() {
        let label = names::profile_rule_label(&profile.name, d, index);
        compile_rule(r, &label, &NamespaceScope::Any, gen, &mut out);
    }
    out
}

/// Whether any part of the rule needs a per-family variant.
fn family_specific(r: &Rule) -> bool {
    let side = |e: &EntityMatch| {
        !e.nets.is_empty()
            || !e.not_nets.is_empty()
            || e.selector.is_some()
            || e.not_selector.is_some()
            || e.namespaces.is_some()
            || e.service_accounts.is_some()
            || e.ports
                .iter()
                .chain(&e.not_ports)
                .any(|p| matches!(p, PortMatch::Named(_)))
    };
    r.ip_version.is_some()
        || r.icmp.is_some()
        || r.not_icmp.is_some()
        || matches!(r.protocol, Some(Protocol::Icmp | Protocol::Icmpv6))
        || side(&r.source)
        || side(&r.destination)
}

fn allows_family(r: &Rule, f: Family) -> bool {
    let version_ok = match r.ip_version {
        None => true,
        Some(4) => f == Family::V4,
        Some(6) => f == Family::V6,
        Some(_) => false,
    };
    let proto_ok = match r.protocol {
        Some(Protocol::Icmp) => f == Family::V4,
        Some(Protocol::Icmpv6) => f == Family::V6,
        _ => true,
    };
    version_ok && proto_ok
}

/// The payload protocol of port matches: the protocol when it has ports, else `th`.
fn port_proto(p: Option<Protocol>) -> &'static str {
    match p.map(Protocol::number) {
        Some(6) => "tcp",
        Some(17) => "udp",
        Some(132) => "sctp",
        Some(136) => "udplite",
        _ => "th",
    }
}

/// A rule with port matches but a protocol without ports (ICMP, ...) matches nothing
/// (validation refuses it, as Calico does; nft would read another header field).
fn ports_without_ports(r: &Rule) -> bool {
    let has = |e: &EntityMatch| !e.ports.is_empty() || !e.not_ports.is_empty();
    r.protocol.is_some_and(|p| !p.has_ports()) && (has(&r.source) || has(&r.destination))
}

/// What one variant of a rule is compiled for.
#[derive(Clone, Copy)]
struct Variant<'a> {
    r: &'a Rule,
    fam: Option<Family>,
    scope: &'a NamespaceScope,
    /// The payload protocol of port matches.
    pp: &'static str,
    gen: &'a Gen<'a>,
}

/// One side of one variant.
struct SideOut {
    addr: Vec<Stmt>,
    /// Port alternatives (at least one, possibly empty).
    alts: Vec<Vec<Stmt>>,
    /// Whether any port match (numeric or named) reads the port payload.
    ports: bool,
}

fn compile_rule(r: &Rule, label: &str, scope: &NamespaceScope, gen: &Gen, out: &mut CompiledChain) {
    if ports_without_ports(r) {
        return;
    }
    let families: Vec<Option<Family>> = if family_specific(r) {
        gen.fams
            .list()
            .filter(|f| allows_family(r, *f))
            .map(Some)
            .collect()
    } else {
        vec![None]
    };
    // Numeric ports without a protocol: one variant per protocol with ports, so every port
    // compare names its protocol (nft cannot list merged `th` compares back).
    let numeric = |e: &EntityMatch| {
        e.ports
            .iter()
            .chain(&e.not_ports)
            .any(|p| matches!(p, PortMatch::Range { .. }))
    };
    let protocols: Vec<Option<Protocol>> =
        if r.protocol.is_none() && (numeric(&r.source) || numeric(&r.destination)) {
            [
                Protocol::Tcp,
                Protocol::Udp,
                Protocol::Sctp,
                Protocol::UdpLite,
            ]
            .into_iter()
            .filter(|p| r.not_protocol != Some(*p))
            .map(Some)
            .collect()
        } else {
            vec![r.protocol]
        };
    for fam in families {
        for proto in &protocols {
            compile_variant(r, *proto, fam, label, scope, gen, out);
        }
    }
}

/// One family (or none) and one port protocol of a rule.
fn compile_variant(
    r: &Rule,
    proto: Option<Protocol>,
    fam: Option<Family>,
    label: &str,
    scope: &NamespaceScope,
    gen: &Gen,
    out: &mut CompiledChain,
) {
    let pp = port_proto(proto);
    let v = Variant {
        r,
        fam,
        scope,
        pp,
        gen,
    };
    let Some(src) = side(&v, &r.source, true, out) else {
        return;
    };
    let Some(dst) = side(&v, &r.destination, false, out) else {
        return;
    };
    let Some((icmp_base, icmp_alts)) = icmp_stmts(r, fam) else {
        return;
    };
    let icmp_payload = !icmp_base.is_empty() || r.not_icmp.is_some();
    let mut prelude = Vec::new();
    if let Some(p) = proto {
        let implied = (pp != "th" && (src.ports || dst.ports))
            || (icmp_payload && matches!(p, Protocol::Icmp | Protocol::Icmpv6));
        if !implied {
            prelude.push(l4proto(Op::Eq, p.number()));
        }
    }
    let mut tail = Vec::new();
    if let Some(p) = r.not_protocol {
        tail.push(l4proto(Op::Ne, p.number()));
    }
    tail.push(Stmt::Counter);
    tail.extend(action(r.action, label, gen.cfg));
    for sp in &src.alts {
        for dp in &dst.alts {
            for ia in &icmp_alts {
                // Addresses, then ports: nft merges equality matches on adjacent header
                // fields and lists them in header order, which this order already is.
                // A family variant reads that family's header or says `meta nfproto`: per
                // alternative, as one side's port alternatives differ (numeric ports read
                // no address, named ones do).
                let mut stmts = Vec::new();
                if let Some(f) = fam {
                    let reads = [&src.addr, &dst.addr, sp, dp, &icmp_base, ia]
                        .iter()
                        .any(|ss| ss.iter().any(reads_family_header));
                    if !reads {
                        stmts.push(Stmt::matches(
                            Expr::Meta("nfproto"),
                            Op::Eq,
                            Expr::Num(f.nfproto()),
                        ));
                    }
                }
                stmts.extend(prelude.iter().cloned());
                stmts.extend(src.addr.iter().cloned());
                stmts.extend(dst.addr.iter().cloned());
                // Numeric port matches of both sides before any named-port lookup: nft
                // merges `sport` and `dport` equality matches across a lookup between them
                // and lists them together, so any other order would read back as drift.
                let (sp_plain, sp_lookups): (Vec<&Stmt>, Vec<&Stmt>) =
                    sp.iter().partition(|s| !is_lookup(s));
                let (dp_plain, dp_lookups): (Vec<&Stmt>, Vec<&Stmt>) =
                    dp.iter().partition(|s| !is_lookup(s));
                stmts.extend(sp_plain.into_iter().cloned());
                stmts.extend(dp_plain.into_iter().cloned());
                stmts.extend(sp_lookups.into_iter().cloned());
                stmts.extend(dp_lookups.into_iter().cloned());
                stmts.extend(icmp_base.iter().cloned());
                stmts.extend(ia.iter().cloned());
                avoid_ne_merges(&mut stmts);
                stmts.extend(tail.iter().cloned());
                out.chain.rules.push(NftRule {
                    stmts,
                    comment: Some(label.to_string()),
                });
            }
        }
    }
}

/// Whether a statement is a named-port lookup (`ADDR . l4proto . PORT @set`).
fn is_lookup(s: &Stmt) -> bool {
    matches!(
        s,
        Stmt::Match {
            left: Expr::Concat(_),
            ..
        }
    )
}

/// Whether a statement reads an IP or ICMP header field (nft then adds the family dependency
/// itself).
fn reads_family_header(s: &Stmt) -> bool {
    fn reads(e: &Expr) -> bool {
        match e {
            Expr::Payload(p, _) => matches!(*p, "ip" | "ip6" | "icmp" | "icmpv6"),
            Expr::Concat(parts) => parts.iter().any(reads),
            _ => false,
        }
    }
    matches!(s, Stmt::Match { left, .. } if reads(left))
}

/// nft (1.0.6) merges `!=` compares of a value on adjacent header fields into one wide `!=`,
/// which matches when *either* field differs — not what two `!=` mean. When a rule has such a
/// pair, the second becomes `==` the complement of its value: a set lookup, never merged.
fn avoid_ne_merges(stmts: &mut [Stmt]) {
    let ne_field = |s: &Stmt| match s {
        Stmt::Match {
            left: Expr::Payload(p, f),
            op: Op::Ne,
            right,
        } if matches!(right, Expr::Num(_))
            || matches!(right, Expr::Addr { first, last } if first == last) =>
        {
            Some((*p, *f))
        }
        _ => None,
    };
    let fields: Vec<(usize, (&str, &str))> = stmts
        .iter()
        .enumerate()
        .filter_map(|(i, s)| ne_field(s).map(|f| (i, f)))
        .collect();
    for (_, (pa, fa)) in &fields {
        for (j, (pb, fb)) in &fields {
            let next = matches!(
                (*fa, *fb),
                ("saddr", "daddr") | ("sport", "dport") | ("type", "code")
            );
            if pa == pb && next {
                if let Stmt::Match { op, right, .. } = &mut stmts[*j] {
                    *op = Op::Eq;
                    *right = complement(fb, right);
                }
            }
        }
    }
}

/// Every value of the field but this one (ports are 16 bits, ICMP codes 8; addresses carry
/// their family).
fn complement(field: &str, v: &Expr) -> Expr {
    let parts = |v: u128, max: u128| {
        let mut p = Vec::new();
        if v > 0 {
            p.push((0, v - 1));
        }
        if v < max {
            p.push((v + 1, max));
        }
        p
    };
    match v {
        Expr::Num(n) => {
            let max = if field == "code" { 255 } else { 65535 };
            let ranges: Vec<(u16, u16)> = parts(*n as u128, max)
                .into_iter()
                .map(|(a, b)| (a as u16, b as u16))
                .collect();
            anon_ports(&ranges)
        }
        Expr::Addr { first, .. } => {
            let f = Family::of(first);
            let max = intervals::addr_bits(&super::ruleset::max_addr(f));
            anon_addrs(f, parts(intervals::addr_bits(first), max))
        }
        other => other.clone(),
    }
}

fn l4proto(op: Op, n: u8) -> Stmt {
    Stmt::matches(Expr::Meta("l4proto"), op, Expr::Num(n as u64))
}

fn action(a: Action, label: &str, cfg: &CompileConfig) -> Vec<Stmt> {
    let mut out = Vec::new();
    if matches!(a, Action::Allow | Action::Deny) {
        out.extend(flow_log(a == Action::Allow, label, cfg));
    }
    out.extend(match a {
        Action::Allow => vec![Stmt::MarkOr(cfg.allow_mark), Stmt::Verdict(Verdict::Return)],
        Action::Deny => vec![Stmt::Verdict(Verdict::Drop)],
        Action::Pass => vec![Stmt::MarkOr(cfg.pass_mark), Stmt::Verdict(Verdict::Return)],
        Action::Log => vec![Stmt::Log(format!("trellis {label} "))],
    });
    out
}

/// The flow-log copy of a deciding rule, when flow logs are on.
fn flow_log(allowed: bool, label: &str, cfg: &CompileConfig) -> Option<Stmt> {
    cfg.flow_log_group.map(|group| Stmt::FlowLog {
        group,
        prefix: names::flow_log_prefix(allowed, label),
    })
}

/// A rule ending in `verdict` that decided for a default (a tier's, or the endpoint's when no
/// policy or profile allowed): with flow logs on it is labelled, counted and copied to the
/// flow log like a policy rule; otherwise just the verdict.
fn default_rule(label: String, verdict: Vec<Stmt>, cfg: &CompileConfig) -> NftRule {
    let allowed = !verdict.contains(&Stmt::Verdict(Verdict::Drop));
    match flow_log(allowed, &label, cfg) {
        None => NftRule::new(verdict),
        Some(log) => {
            let mut stmts = vec![Stmt::Counter, log];
            stmts.extend(verdict);
            NftRule {
                stmts,
                comment: Some(label),
            }
        }
    }
}

/// Address and port matches of one side; `None` when the side cannot match in this family
/// (it lists nets, none of them of this family).
fn side(v: &Variant, e: &EntityMatch, source: bool, out: &mut CompiledChain) -> Option<SideOut> {
    let Variant {
        r,
        fam,
        scope,
        pp,
        gen,
    } = *v;
    let (addr_field, port_field) = if source {
        ("saddr", "sport")
    } else {
        ("daddr", "dport")
    };
    let mut addr = Vec::new();
    if let Some(f) = fam {
        let key = Expr::Payload(f.ip(), addr_field);
        let in_family = |nets: &[IpNet]| -> Vec<Interval> {
            nets.iter()
                .map(intervals::net_interval)
                .filter(|(nf, _)| *nf == f)
                .map(|(_, iv)| iv)
                .collect()
        };
        let nets = in_family(&e.nets);
        if !e.nets.is_empty() && nets.is_empty() {
            return None;
        }
        if !nets.is_empty() {
            addr.push(Stmt::matches(key.clone(), Op::Eq, anon_addrs(f, nets)));
        }
        let not_nets = in_family(&e.not_nets);
        if !not_nets.is_empty() {
            addr.push(Stmt::matches(key.clone(), Op::Ne, anon_addrs(f, not_nets)));
        }
        for (sel, op) in [
            (e.selection(scope), Op::Eq),
            (e.not_selection(scope), Op::Ne),
        ] {
            if let Some(sel) = sel {
                let name = out.spec(SetSpec::addresses(sel), f, gen);
                addr.push(Stmt::matches(key.clone(), op, Expr::SetRef(name)));
            }
        }
    }
    let (nums, named) = split_ports(&e.ports);
    let (not_nums, not_named) = split_ports(&e.not_ports);
    let port_key = Expr::Payload(pp, port_field);
    let named_match = |names: Vec<String>, op: Op, out: &mut CompiledChain| {
        let f = fam.expect("named ports make a rule family-specific");
        let spec = SetSpec::named_ports(e.selection(scope), names, r.protocol);
        let name = out.spec(spec, f, gen);
        let key = Expr::Concat(vec![
            Expr::Payload(f.ip(), addr_field),
            Expr::Meta("l4proto"),
            port_key.clone(),
        ]);
        Stmt::matches(key, op, Expr::SetRef(name))
    };
    let mut base = Vec::new();
    if !not_nums.is_empty() {
        base.push(Stmt::matches(
            port_key.clone(),
            Op::Ne,
            anon_ports(&not_nums),
        ));
    }
    if !not_named.is_empty() {
        base.push(named_match(not_named.clone(), Op::Ne, out));
    }
    let with = |extra: Vec<Stmt>| -> Vec<Stmt> { base.iter().cloned().chain(extra).collect() };
    let nums_eq = || Stmt::matches(port_key.clone(), Op::Eq, anon_ports(&nums));
    let alts = match (nums.is_empty(), named.is_empty()) {
        (true, true) => vec![with(vec![])],
        (false, true) => vec![with(vec![nums_eq()])],
        (true, false) => vec![with(vec![named_match(named.clone(), Op::Eq, out)])],
        (false, false) => {
            let named_eq = named_match(named.clone(), Op::Eq, out);
            let nums_ne = Stmt::matches(port_key.clone(), Op::Ne, anon_ports(&nums));
            vec![with(vec![nums_eq()]), with(vec![nums_ne, named_eq])]
        }
    };
    let has_named = !named.is_empty() || !not_named.is_empty();
    Some(SideOut {
        addr,
        alts,
        ports: has_named || !nums.is_empty() || !not_nums.is_empty(),
    })
}

fn split_ports(ports: &[PortMatch]) -> (Vec<(u16, u16)>, Vec<String>) {
    let mut nums = Vec::new();
    let mut named = Vec::new();
    for p in ports {
        match p {
            PortMatch::Range { first, last } => nums.push((*first, *last)),
            PortMatch::Named(n) => named.push(n.clone()),
        }
    }
    (nums, named)
}

/// ICMP matches: statements every alternative has, and the alternatives (`notICMP` with a code
/// is `type != T` OR `type == T && code != C`); `None` when they cannot match. Alternatives that
/// contradict `icmp` are dropped and parts it implies left out, so no field is compared twice
/// (nft merges adjacent equality matches and would list them in another order).
fn icmp_stmts(r: &Rule, fam: Option<Family>) -> Option<(Vec<Stmt>, Vec<Vec<Stmt>>)> {
    let proto = match fam {
        Some(Family::V6) => "icmpv6",
        _ => "icmp",
    };
    let m = |field, op, v: u8| Stmt::matches(Expr::Payload(proto, field), op, Expr::Num(v as u64));
    let mut base = Vec::new();
    if let Some(IcmpMatch { icmp_type, code }) = r.icmp {
        base.push(m("type", Op::Eq, icmp_type));
        if let Some(c) = code {
            base.push(m("code", Op::Eq, c));
        }
    }
    let Some(not) = r.not_icmp else {
        return Some((base, vec![vec![]]));
    };
    let (t, c) = (not.icmp_type, not.code);
    let alts: Vec<Vec<Stmt>> = match r.icmp {
        None => {
            let mut alts = vec![vec![m("type", Op::Ne, t)]];
            if let Some(c) = c {
                alts.push(vec![m("type", Op::Eq, t), m("code", Op::Ne, c)]);
            }
            alts
        }
        // The type is known: `type != t` is true or false, and so on.
        Some(IcmpMatch { icmp_type, code }) => {
            if icmp_type != t {
                vec![vec![]]
            } else {
                match (c, code) {
                    (None, _) => vec![],
                    (Some(c), Some(code)) if c == code => vec![],
                    (Some(_), Some(_)) => vec![vec![]],
                    (Some(c), None) => vec![vec![m("code", Op::Ne, c)]],
                }
            }
        }
    };
    (!alts.is_empty()).then_some((base, alts))
}

/// A value or an anonymous set of one or more values (nft lists a lone value bare).
fn one_or_set(mut v: Vec<Expr>) -> Expr {
    if v.len() == 1 {
        v.pop().expect("one")
    } else {
        Expr::AnonSet(v)
    }
}

fn anon_addrs(f: Family, ivs: Vec<Interval>) -> Expr {
    one_or_set(
        intervals::merge_touching(ivs)
            .into_iter()
            .map(|(s, e)| Expr::Addr {
                first: intervals::bits_addr(f, s),
                last: intervals::bits_addr(f, e),
            })
            .collect(),
    )
}

fn anon_ports(ranges: &[(u16, u16)]) -> Expr {
    let ivs = ranges
        .iter()
        .map(|(a, b)| (*a.min(b) as u128, *a.max(b) as u128))
        .collect();
    one_or_set(
        intervals::merge_touching(ivs)
            .into_iter()
            .map(|(s, e)| {
                if s == e {
                    Expr::Num(s as u64)
                } else {
                    Expr::Range(s as u64, e as u64)
                }
            })
            .collect(),
    )
}

/// Policies grouped by tier, both in evaluation order; policies of tiers that do not exist are
/// left out (the model says so: `Model::ordered_tiers`).
pub fn group_by_tier<'a>(
    model: &Model,
    policies: impl IntoIterator<Item = &'a Policy>,
) -> Vec<(Tier, Vec<&'a Policy>)> {
    let mut by_tier: BTreeMap<&str, Vec<&'a Policy>> = BTreeMap::new();
    for p in policies {
        by_tier.entry(p.tier.as_str()).or_default().push(p);
    }
    let mut out: Vec<(Tier, Vec<&'a Policy>)> = by_tier
        .into_iter()
        .filter_map(|(t, ps)| model.tier(t).map(|t| (t, ps)))
        .collect();
    out.sort_by_key(|a| crate::model::tier_key(&a.0));
    for (_, ps) in &mut out {
        ps.sort_by(|a, b| {
            order_key(a.order, &a.id.name)
                .cmp(&order_key(b.order, &b.id.name))
                .then_with(|| a.id.cmp(&b.id))
        });
    }
    out
}

/// An endpoint's chains for one direction: its endpoint chain and one chain per tier that has
/// applying policies. `profiles` are the listed profiles that exist, `lists_profiles` whether
/// it lists any (then no match ends in drop; otherwise it is allowed).
pub fn endpoint_chains(
    id: &str,
    d: Direction,
    tiers: &[(Tier, Vec<&Policy>)],
    profiles: &[&str],
    lists_profiles: bool,
    cfg: &CompileConfig,
) -> Vec<(String, Chain)> {
    let both = cfg.allow_mark | cfg.pass_mark;
    let allowed = || match d {
        Direction::Egress => Verdict::Goto(DISPATCH_IN.into()),
        Direction::Ingress => Verdict::Accept,
    };
    let rule = |stmts| NftRule::new(stmts);
    let mark_set = |bits| Expr::MarkMasked(bits);
    let mut chains = Vec::new();
    let mut main = vec![rule(vec![Stmt::MarkAnd(!both)])];
    let mut stages: Vec<String> = Vec::new();
    for (n, (tier, policies)) in tiers.iter().enumerate() {
        let name = names::tier_chain(id, d, n);
        let mut rules = Vec::new();
        for p in policies {
            let target = names::policy_chain(&p.id, d);
            rules.push(rule(vec![Stmt::Verdict(Verdict::Jump(target))]));
            rules.push(rule(vec![
                Stmt::matches(mark_set(both), Op::Ne, Expr::Num(0)),
                Stmt::Verdict(Verdict::Return),
            ]));
        }
        rules.push(match tier.default_action {
            crate::model::TierDefault::Deny => default_rule(
                names::tier_default_label(&tier.name, d),
                vec![Stmt::Verdict(Verdict::Drop)],
                cfg,
            ),
            crate::model::TierDefault::Pass => rule(vec![
                Stmt::MarkOr(cfg.pass_mark),
                Stmt::Verdict(Verdict::Return),
            ]),
        });
        chains.push((name.clone(), Chain { base: false, rules }));
        stages.push(name);
    }
    stages.extend(profiles.iter().map(|p| names::profile_chain(p, d)));
    for (n, stage) in stages.into_iter().enumerate() {
        if n > 0 {
            main.push(rule(vec![Stmt::MarkAnd(!cfg.pass_mark)]));
        }
        main.push(rule(vec![Stmt::Verdict(Verdict::Jump(stage))]));
        main.push(rule(vec![
            Stmt::matches(mark_set(cfg.allow_mark), Op::Ne, Expr::Num(0)),
            Stmt::Verdict(allowed()),
        ]));
    }
    main.push(default_rule(
        names::endpoint_default_label(lists_profiles, d),
        vec![Stmt::Verdict(if lists_profiles {
            Verdict::Drop
        } else {
            allowed()
        })],
        cfg,
    ));
    chains.push((
        names::endpoint_chain(id, d),
        Chain {
            base: false,
            rules: main,
        },
    ));
    chains
}

/// The first rules of an endpoint's egress chain: a packet whose source is not one of the
/// endpoint's addresses is dropped (anti-spoofing, as Calico's from-workload chain does): the
/// ingress policies of other pods judge the source by its address, so a pod sending with
/// another pod's address would otherwise get what that pod is allowed. A family the endpoint
/// has no address in is closed.
pub fn source_guard(addresses: &[IpAddr]) -> Vec<NftRule> {
    Family::BOTH
        .into_iter()
        .map(|f| {
            let own: Vec<Interval> = addresses
                .iter()
                .filter(|a| Family::of(a) == f)
                .map(|a| {
                    let v = intervals::addr_bits(a);
                    (v, v)
                })
                .collect();
            let m = if own.is_empty() {
                Stmt::matches(Expr::Meta("nfproto"), Op::Eq, Expr::Num(f.nfproto()))
            } else {
                Stmt::matches(Expr::Payload(f.ip(), "saddr"), Op::Ne, anon_addrs(f, own))
            };
            NftRule::new(vec![m, Stmt::Verdict(Verdict::Drop)])
        })
        .collect()
}

/// The table with nothing programmed: conntrack, dispatch, closed endpoint interfaces.
pub fn skeleton() -> Ruleset {
    let rule = NftRule::new;
    let iface = |key: &'static str| {
        Stmt::matches(
            Expr::Meta(key),
            Op::Eq,
            Expr::Str(ENDPOINT_IFACE_WILDCARD.into()),
        )
    };
    let forward = vec![
        rule(vec![
            Stmt::matches(Expr::CtState, Op::In, Expr::Flags(vec![2, 4])),
            Stmt::Verdict(Verdict::Accept),
        ]),
        // Invalid packets are dropped from and to endpoints only: a node that merely routes
        // (an asymmetric return path through it) sees mid-flow packets conntrack calls invalid.
        rule(vec![
            iface("iifname"),
            Stmt::matches(Expr::CtState, Op::In, Expr::Num(1)),
            Stmt::Verdict(Verdict::Drop),
        ]),
        rule(vec![Stmt::Vmap {
            key: Expr::Meta("iifname"),
            map: FROM_ENDPOINT.into(),
        }]),
        rule(vec![iface("iifname"), Stmt::Verdict(Verdict::Drop)]),
        rule(vec![Stmt::Verdict(Verdict::Goto(DISPATCH_IN.into()))]),
    ];
    let dispatch = vec![
        rule(vec![
            iface("oifname"),
            Stmt::matches(Expr::CtState, Op::In, Expr::Num(1)),
            Stmt::Verdict(Verdict::Drop),
        ]),
        rule(vec![Stmt::Vmap {
            key: Expr::Meta("oifname"),
            map: TO_ENDPOINT.into(),
        }]),
        rule(vec![iface("oifname"), Stmt::Verdict(Verdict::Drop)]),
        rule(vec![Stmt::Verdict(Verdict::Accept)]),
    ];
    let mut rs = Ruleset::default();
    rs.chains.insert(
        FORWARD.into(),
        Chain {
            base: true,
            rules: forward,
        },
    );
    rs.chains.insert(
        DISPATCH_IN.into(),
        Chain {
            base: false,
            rules: dispatch,
        },
    );
    rs.maps.insert(FROM_ENDPOINT.into(), VerdictMap::default());
    rs.maps.insert(TO_ENDPOINT.into(), VerdictMap::default());
    rs
}
