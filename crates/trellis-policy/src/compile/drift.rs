//! Drift detection (pure): compares the kernel's listing of the table with the expected
//! [`Ruleset`]. The listing must be numeric JSON (`nft -j -n list table inet trellis_policy`,
//! `trellis_dataplane::nft::list_table_numeric`): the compiler emits exactly that form, so the
//! comparison only drops what the kernel adds (handles, counter values, the table's own entry),
//! hides what nft hides when listing (a family implied by `meta l4proto icmp`/`ipv6-icmp`)
//! and sorts set elements. [`rule_counters`] reads the per-rule counters from the same listing. Anything else in the table — a rule deleted or added by hand, a
//! chain, set element or object that should not be there — is a difference.

use std::collections::BTreeMap;

use serde_json::Value;

use super::nft_json::{chain_fields, map_fields, rule_fields, set_fields};
use super::ruleset::{Expr, Op, Rule, Ruleset, Stmt};

/// Whether the kernel's table (`None`: it does not exist) differs from `expected`.
pub fn differs(listing: Option<&Value>, expected: &Ruleset) -> bool {
    !differences(listing, expected).is_empty()
}

/// The differences between the kernel's table and `expected`, one line each (empty: none).
pub fn differences(listing: Option<&Value>, expected: &Ruleset) -> Vec<String> {
    let Some(listing) = listing else {
        return vec!["the table does not exist".into()];
    };
    let have = Normal::from_listing(listing);
    let want = Normal::from_ruleset(expected);
    let mut out = Vec::new();
    for (k, w) in &want.objects {
        match have.objects.get(k) {
            None => out.push(format!("{k} is missing")),
            Some(h) if h != w => out.push(format!("{k} differs: have {h}, want {w}")),
            _ => {}
        }
    }
    for k in have.objects.keys() {
        if !want.objects.contains_key(k) {
            out.push(format!("{k} should not exist"));
        }
    }
    let none = Vec::new();
    let chains = want.rules.keys().chain(have.rules.keys());
    let chains: std::collections::BTreeSet<&String> = chains.collect();
    for c in chains {
        let (h, w) = (
            have.rules.get(c).unwrap_or(&none),
            want.rules.get(c).unwrap_or(&none),
        );
        if h != w {
            let at = h
                .iter()
                .zip(w)
                .position(|(a, b)| a != b)
                .unwrap_or(h.len().min(w.len()));
            out.push(format!(
                "chain {c}: {} rules, want {}; first difference at rule {at}: have {}, want {}",
                h.len(),
                w.len(),
                h.get(at).map_or("nothing".into(), Value::to_string),
                w.get(at).map_or("nothing".into(), Value::to_string),
            ));
        }
    }
    out
}

/// Packets and bytes a rule label's counters counted (summed over the label's nft rules: one
/// model rule can be several nft rules, per family or alternative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleCounter {
    pub packets: u64,
    pub bytes: u64,
}

/// The counters of every commented rule in a listing, by rule label.
pub fn rule_counters(listing: &Value) -> BTreeMap<String, RuleCounter> {
    let mut out: BTreeMap<String, RuleCounter> = BTreeMap::new();
    let items = listing.get("nftables").and_then(Value::as_array);
    for rule in items.into_iter().flatten().filter_map(|i| i.get("rule")) {
        let Some(label) = rule.get("comment").and_then(Value::as_str) else {
            continue;
        };
        let exprs = rule.get("expr").and_then(Value::as_array);
        for c in exprs.into_iter().flatten().filter_map(|e| e.get("counter")) {
            let n = out.entry(label.to_string()).or_default();
            n.packets += c.get("packets").and_then(Value::as_u64).unwrap_or(0);
            n.bytes += c.get("bytes").and_then(Value::as_u64).unwrap_or(0);
        }
    }
    out
}

/// A table reduced to what is compared: objects by `KIND NAME`, rules by chain in order.
#[derive(Debug, Default, PartialEq)]
struct Normal {
    objects: BTreeMap<String, Value>,
    rules: BTreeMap<String, Vec<Value>>,
}

impl Normal {
    fn from_ruleset(rs: &Ruleset) -> Normal {
        let mut n = Normal::default();
        for (name, s) in &rs.sets {
            n.object("set", set_fields(name, s));
        }
        for (name, m) in &rs.maps {
            n.object("map", map_fields(name, m));
        }
        for (name, c) in &rs.chains {
            n.object("chain", chain_fields(name, c));
            let rules = c
                .rules
                .iter()
                .map(|r| without_chain(rule_fields(name, &as_listed(r))));
            n.rules.insert(name.clone(), rules.collect());
        }
        n
    }

    fn from_listing(listing: &Value) -> Normal {
        let mut n = Normal::default();
        let items = listing.get("nftables").and_then(Value::as_array);
        for item in items.into_iter().flatten() {
            let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let mut body = body.clone();
            if let Some(o) = body.as_object_mut() {
                for k in ["family", "table", "handle", "packets", "bytes"] {
                    o.remove(k);
                }
            }
            match kind.as_str() {
                "metainfo" | "table" => {}
                "rule" => {
                    // Counter values are the kernel's, not configuration.
                    if let Some(exprs) = body.get_mut("expr").and_then(Value::as_array_mut) {
                        for e in exprs.iter_mut().filter(|e| e.get("counter").is_some()) {
                            *e = serde_json::json!({ "counter": null });
                        }
                    }
                    let chain = body["chain"].as_str().unwrap_or_default().to_string();
                    n.rules.entry(chain).or_default().push(without_chain(body));
                }
                _ => n.object(kind, body),
            }
        }
        n
    }

    /// Records an object, with its elements sorted and an empty element list dropped.
    fn object(&mut self, kind: &str, mut body: Value) {
        if let Some(elems) = body.get_mut("elem").and_then(Value::as_array_mut) {
            elems.sort_by_cached_key(Value::to_string);
            if elems.is_empty() {
                body.as_object_mut().map(|o| o.remove("elem"));
            }
        }
        let name = body.get("name").and_then(Value::as_str).unwrap_or_default();
        self.objects.insert(format!("{kind} {name}"), body);
    }
}

/// A rule as nft lists it: `meta nfproto ipv4` before `meta l4proto icmp` and `meta nfproto
/// ipv6` before `meta l4proto ipv6-icmp` are hidden (the protocol implies the family; nft's
/// `meta_may_dependency_kill`), though the kernel keeps and enforces them — so the compiler
/// emits them (an ICMPv6 rule must not match an IPv4 packet of protocol 58) and the
/// comparison drops them.
fn as_listed(r: &Rule) -> std::borrow::Cow<'_, Rule> {
    let num = |s: &Stmt, key: &str| match s {
        Stmt::Match {
            left: Expr::Meta(k),
            op: Op::Eq,
            right: Expr::Num(n),
        } if *k == key => Some(*n),
        _ => None,
    };
    let implied = |w: &[Stmt]| {
        matches!(
            (num(&w[0], "nfproto"), num(&w[1], "l4proto")),
            (Some(2), Some(1)) | (Some(10), Some(58))
        )
    };
    if !r.stmts.windows(2).any(implied) {
        return std::borrow::Cow::Borrowed(r);
    }
    let mut out = r.clone();
    let mut i = 0;
    while i + 1 < out.stmts.len() {
        if implied(&out.stmts[i..i + 2]) {
            out.stmts.remove(i);
        } else {
            i += 1;
        }
    }
    std::borrow::Cow::Owned(out)
}

fn without_chain(mut rule: Value) -> Value {
    if let Some(o) = rule.as_object_mut() {
        o.remove("chain");
    }
    rule
}
