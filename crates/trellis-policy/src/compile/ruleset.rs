//! The nftables ruleset as plain data (no I/O): table `inet trellis_policy` with its named
//! sets, verdict maps and chains of rules (each policy rule with a `counter`, identified by the
//! rule's comment), and the incremental operations ([`NftOp`]) that
//! turn one ruleset into another. [`Ruleset::apply`] carries operations out on the data with
//! the kernel's strictness (and a little more: adding what exists or deleting what is missing or
//! still referenced is an error), which is how the engine's output is checked without a kernel.
//!
//! Statements and expressions are a small typed subset of nftables: exactly what the compiler
//! emits, in the form `nft -j -n list` prints back (see `nft_json`), so the kernel's listing can
//! be compared with the data directly.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The table (family `inet`: one table for IPv4 and IPv6).
pub const TABLE: &str = "trellis_policy";
pub const FAMILY: &str = "inet";
/// The base chain on the forward hook.
pub const FORWARD: &str = "forward";
/// The chain that dispatches on the outgoing interface (ingress to local endpoints).
pub const DISPATCH_IN: &str = "dispatch_in";
/// Verdict maps: incoming interface → the endpoint's egress chain; outgoing interface → its
/// ingress chain.
pub const FROM_ENDPOINT: &str = "from_endpoint";
pub const TO_ENDPOINT: &str = "to_endpoint";
/// Interfaces with this prefix are endpoints: closed until programmed.
pub const ENDPOINT_IFACE_WILDCARD: &str = "trl*";

/// An IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(a: &IpAddr) -> Family {
        match a {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// `v4` / `v6`, the suffix of set names.
    pub fn suffix(self) -> &'static str {
        match self {
            Family::V4 => "v4",
            Family::V6 => "v6",
        }
    }

    /// The payload protocol of addresses (`ip` / `ip6`).
    pub fn ip(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// NFPROTO_IPV4 / NFPROTO_IPV6 (what `meta nfproto` compares with).
    pub fn nfproto(self) -> u64 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }

    pub fn addr_type(self) -> &'static str {
        match self {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        }
    }
}

/// The whole table as data.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ruleset {
    pub sets: BTreeMap<String, Set>,
    pub maps: BTreeMap<String, VerdictMap>,
    pub chains: BTreeMap<String, Chain>,
}

/// A named set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    pub elements: BTreeSet<Element>,
}

/// What a set holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Single addresses (a hash set: nft fetches no elements of it to change another).
    Addresses(Family),
    /// Addresses and networks (`flags interval`): disjoint intervals. Only sets that hold a
    /// NetworkSet's nets are interval sets: while a table has any, every nft run fetches all
    /// their elements.
    Networks(Family),
    /// `addr . inet_proto . inet_service` (named ports).
    NamedPorts(Family),
}

/// One element of a named set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Element {
    /// `first..=last` (a single address has `first == last`).
    Addr {
        first: IpAddr,
        last: IpAddr,
    },
    NamedPort {
        addr: IpAddr,
        proto: u8,
        port: u16,
    },
}

/// A verdict map `ifname : verdict` whose verdicts are all `goto CHAIN`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerdictMap {
    /// Interface name → chain.
    pub elements: BTreeMap<String, String>,
}

/// A chain: a base chain on the forward hook (policy accept, priority filter) or a regular one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    pub base: bool,
    pub rules: Vec<Rule>,
}

/// A rule: statements in order, and a comment (the rule id for policy rules).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub stmts: Vec<Stmt>,
    pub comment: Option<String>,
}

/// A statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    Match {
        left: Expr,
        op: Op,
        right: Expr,
    },
    /// `counter` (anonymous: the rule's comment names it; named counter objects would make
    /// every nft run fetch them all).
    Counter,
    /// `log prefix "PREFIX"`.
    Log(String),
    /// `log prefix "PREFIX" group GROUP snaplen SNAPLEN`: a copy of the packet's headers to
    /// the agent's flow log; the prefix names the verdict and the deciding rule's label
    /// (`names::flow_log_prefix`).
    FlowLog {
        group: u16,
        prefix: String,
    },
    /// `meta mark set meta mark & MASK`.
    MarkAnd(u32),
    /// `meta mark set meta mark | BITS`.
    MarkOr(u32),
    /// `KEY vmap @MAP`.
    Vmap {
        key: Expr,
        map: String,
    },
    Verdict(Verdict),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    /// Flag test (`ct state established,related`).
    In,
}

/// An expression: the left side of a match (a key) or its right side (a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `meta KEY` (iifname, oifname, nfproto, l4proto).
    Meta(&'static str),
    /// `PROTOCOL FIELD` (ip saddr, tcp dport, icmp type, th dport, ...).
    Payload(&'static str, &'static str),
    /// `ct state`.
    CtState,
    /// `meta mark & MASK`.
    MarkMasked(u32),
    Concat(Vec<Expr>),
    Num(u64),
    Str(String),
    /// An address or a range/prefix of addresses.
    Addr {
        first: IpAddr,
        last: IpAddr,
    },
    /// A range of numbers (ports).
    Range(u64, u64),
    /// An anonymous set of values (two or more).
    AnonSet(Vec<Expr>),
    /// `@NAME`.
    SetRef(String),
    /// A list of flag values (`ct state`).
    Flags(Vec<u64>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Return,
    Jump(String),
    Goto(String),
}

impl Rule {
    pub fn new(stmts: Vec<Stmt>) -> Rule {
        Rule {
            stmts,
            comment: None,
        }
    }

    /// Chains this rule jumps or goes to.
    pub fn chain_refs(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|s| match s {
            Stmt::Verdict(Verdict::Jump(c) | Verdict::Goto(c)) => Some(c.as_str()),
            _ => None,
        })
    }

    /// Named sets and maps this rule looks up.
    pub fn set_refs(&self) -> impl Iterator<Item = &str> {
        self.stmts.iter().filter_map(|s| match s {
            Stmt::Match {
                right: Expr::SetRef(n),
                ..
            } => Some(n.as_str()),
            Stmt::Vmap { map, .. } => Some(map.as_str()),
            _ => None,
        })
    }
}

impl Stmt {
    pub fn matches(left: Expr, op: Op, right: Expr) -> Stmt {
        Stmt::Match { left, op, right }
    }
}

/// One change to the table. [`Ops`] orders them so that every batch is valid on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftOp {
    /// Replace the whole table (add table, delete table, add table with everything): atomic.
    Replace(Box<Ruleset>),
    AddSet {
        name: String,
        kind: SetKind,
    },
    DeleteSet(String),
    AddElements {
        set: String,
        elements: Vec<Element>,
    },
    DeleteElements {
        set: String,
        elements: Vec<Element>,
    },
    AddChain(String),
    FlushChain(String),
    DeleteChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    /// Map `key → goto chain` entries.
    AddMapElements {
        map: String,
        elements: Vec<(String, String)>,
    },
    DeleteMapElements {
        map: String,
        keys: Vec<String>,
    },
}

/// A batch of operations: one nftables transaction (see `Ops::to_nft_json`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ops {
    pub ops: Vec<NftOp>,
}

impl Ops {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// The batch that replaces the whole table with `ruleset`.
    pub fn replace(ruleset: Ruleset) -> Ops {
        Ops {
            ops: vec![NftOp::Replace(Box::new(ruleset))],
        }
    }
}

/// Why [`Ruleset::apply`] refused an operation (the kernel would have refused the batch, or
/// the engine produced something it should not have).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("{kind} {name} already exists")]
    Exists { kind: &'static str, name: String },
    #[error("{kind} {name} does not exist")]
    Missing { kind: &'static str, name: String },
    #[error("{kind} {name} is still referenced by {by}")]
    InUse {
        kind: &'static str,
        name: String,
        by: String,
    },
    #[error("chain {name} is not empty")]
    ChainNotEmpty { name: String },
    #[error("set {set}: element {element} {problem}")]
    Element {
        set: String,
        element: String,
        problem: &'static str,
    },
}

fn missing(kind: &'static str, name: &str) -> ApplyError {
    ApplyError::Missing {
        kind,
        name: name.to_string(),
    }
}

impl Ruleset {
    /// Applies a batch to the data, all or nothing (like an nftables transaction).
    pub fn apply(&mut self, ops: &Ops) -> Result<(), ApplyError> {
        let mut next = self.clone();
        for op in &ops.ops {
            next.apply_one(op)?;
        }
        *self = next;
        Ok(())
    }

    fn apply_one(&mut self, op: &NftOp) -> Result<(), ApplyError> {
        match op {
            NftOp::Replace(r) => *self = (**r).clone(),
            NftOp::AddSet { name, kind } => {
                if self.sets.contains_key(name) || self.maps.contains_key(name) {
                    return Err(exists("set", name));
                }
                let set = Set {
                    kind: *kind,
                    elements: BTreeSet::new(),
                };
                self.sets.insert(name.clone(), set);
            }
            NftOp::DeleteSet(n) => {
                self.check_unused("set", n, |r| r.set_refs().any(|s| s == n))?;
                self.sets.remove(n).ok_or_else(|| missing("set", n))?;
            }
            NftOp::AddElements { set, elements } => {
                let s = self.sets.get_mut(set).ok_or_else(|| missing("set", set))?;
                for e in elements {
                    s.insert(set, e)?;
                }
            }
            NftOp::DeleteElements { set, elements } => {
                let s = self.sets.get_mut(set).ok_or_else(|| missing("set", set))?;
                for e in elements {
                    if !s.elements.remove(e) {
                        return Err(element_err(set, e, "is not in the set"));
                    }
                }
            }
            NftOp::AddChain(n) => {
                if self.chains.contains_key(n) {
                    return Err(exists("chain", n));
                }
                self.chains.insert(n.clone(), Chain::default());
            }
            NftOp::FlushChain(n) => {
                self.chains
                    .get_mut(n)
                    .ok_or_else(|| missing("chain", n))?
                    .rules
                    .clear();
            }
            NftOp::DeleteChain(n) => self.delete_chain(n)?,
            NftOp::AddRule { chain, rule } => self.add_rule(chain, rule)?,
            NftOp::AddMapElements { map, elements } => {
                for (_, target) in elements {
                    if !self.chains.contains_key(target) {
                        return Err(missing("chain", target));
                    }
                }
                let m = self.maps.get_mut(map).ok_or_else(|| missing("map", map))?;
                for (k, target) in elements {
                    if m.elements.insert(k.clone(), target.clone()).is_some() {
                        return Err(exists("map element", &format!("{map}[{k}]")));
                    }
                }
            }
            NftOp::DeleteMapElements { map, keys } => {
                let m = self.maps.get_mut(map).ok_or_else(|| missing("map", map))?;
                for k in keys {
                    if m.elements.remove(k).is_none() {
                        return Err(missing("map element", &format!("{map}[{k}]")));
                    }
                }
            }
        }
        Ok(())
    }

    fn delete_chain(&mut self, n: &str) -> Result<(), ApplyError> {
        let chain = self.chains.get(n).ok_or_else(|| missing("chain", n))?;
        if !chain.rules.is_empty() {
            return Err(ApplyError::ChainNotEmpty { name: n.into() });
        }
        self.check_unused("chain", n, |r| r.chain_refs().any(|c| c == n))?;
        if let Some((m, _)) = self
            .maps
            .iter()
            .find(|(_, m)| m.elements.values().any(|c| c == n))
        {
            return Err(ApplyError::InUse {
                kind: "chain",
                name: n.into(),
                by: format!("map {m}"),
            });
        }
        self.chains.remove(n);
        Ok(())
    }

    fn add_rule(&mut self, chain: &str, rule: &Rule) -> Result<(), ApplyError> {
        for c in rule.chain_refs() {
            if !self.chains.contains_key(c) {
                return Err(missing("chain", c));
            }
        }
        for s in rule.set_refs() {
            if !self.sets.contains_key(s) && !self.maps.contains_key(s) {
                return Err(missing("set", s));
            }
        }
        self.chains
            .get_mut(chain)
            .ok_or_else(|| missing("chain", chain))?
            .rules
            .push(rule.clone());
        Ok(())
    }

    /// Errs when a rule satisfying `uses` refers to the object.
    fn check_unused(
        &self,
        kind: &'static str,
        name: &str,
        uses: impl Fn(&Rule) -> bool,
    ) -> Result<(), ApplyError> {
        for (chain, c) in &self.chains {
            if c.rules.iter().any(&uses) {
                return Err(ApplyError::InUse {
                    kind,
                    name: name.into(),
                    by: format!("chain {chain}"),
                });
            }
        }
        Ok(())
    }
}

fn exists(kind: &'static str, name: &str) -> ApplyError {
    ApplyError::Exists {
        kind,
        name: name.to_string(),
    }
}

fn element_err(set: &str, e: &Element, problem: &'static str) -> ApplyError {
    ApplyError::Element {
        set: set.into(),
        element: format!("{e:?}"),
        problem,
    }
}

impl Set {
    /// Inserts an element as the kernel would: refusing duplicates, the wrong family, and
    /// (for address sets) intervals overlapping one already present.
    fn insert(&mut self, name: &str, e: &Element) -> Result<(), ApplyError> {
        let ok = match (self.kind, e) {
            (SetKind::Addresses(f), Element::Addr { first, last }) => {
                Family::of(first) == f && first == last
            }
            (SetKind::Networks(f), Element::Addr { first, last }) => {
                Family::of(first) == f && Family::of(last) == f && first <= last
            }
            (SetKind::NamedPorts(f), Element::NamedPort { addr, .. }) => Family::of(addr) == f,
            _ => false,
        };
        if !ok {
            return Err(element_err(name, e, "does not fit the set's type"));
        }
        if let Element::Addr { first, last } = e {
            // Elements are disjoint and sorted by `first`: only the last one starting at or
            // before `last` can overlap.
            let bound = Element::Addr {
                first: *last,
                last: max_addr(Family::of(last)),
            };
            let overlaps = matches!(
                self.elements.range(..=bound).next_back(),
                Some(Element::Addr { last: l, .. }) if first <= l
            );
            if overlaps {
                return Err(element_err(name, e, "overlaps an element of the set"));
            }
        }
        if !self.elements.insert(e.clone()) {
            return Err(element_err(name, e, "is already in the set"));
        }
        Ok(())
    }
}

/// The highest address of a family.
pub(crate) fn max_addr(f: Family) -> IpAddr {
    match f {
        Family::V4 => IpAddr::V4(std::net::Ipv4Addr::from(u32::MAX)),
        Family::V6 => IpAddr::V6(std::net::Ipv6Addr::from(u128::MAX)),
    }
}
