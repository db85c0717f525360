//! `policy trace --kernel`: the kernel's packet and byte counters of the rules that decided a
//! trace, read from the deciding node's `inet trellis_policy` table (the rule's label is its
//! nft comment; `trellis_policy::compile::drift::rule_counters` sums them). I/O: runs `nft` in
//! the node's network namespace — a lab node's (`--lab`), or this host's own when this host is
//! the node.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use trellis_policy::compile::drift::{rule_counters, RuleCounter};
use trellis_policy::eval::{DirectionTrace, PeerView, Trace, Verdict};
use trellis_policy::model::Direction;

/// A rule that decided one direction of a trace, and what the kernel counted for it.
#[derive(Debug, Clone, Serialize)]
pub struct KernelRule {
    pub direction: &'static str,
    pub node: String,
    /// The rule's label (nft comment).
    pub rule: String,
    /// `None`: the node's table has no rule with this label (not programmed there).
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// The rule that decided a direction (its label), with the node enforcing it; `None` when no
/// rule of an endpoint's chains decided (not an endpoint, its own node).
fn deciding(d: &DirectionTrace, side: &PeerView) -> Option<(String, String)> {
    Some((side.node.clone()?, d.deciding_label()?))
}

/// The counters of `node`'s table, by rule label.
fn counters(lab: Option<&str>, node: &str) -> Result<BTreeMap<String, RuleCounter>> {
    let list = ["-j", "-n", "list", "table", "inet", "trellis_policy"];
    let out = match lab {
        Some(lab) => {
            let state = trellis_lab::State::load(lab)?;
            let Some(ns) = state.namespaces.get(node) else {
                bail!("lab {lab} has no node {node}");
            };
            let net = format!("--net={}", Path::new("/var/run/netns").join(ns).display());
            let mut args = vec![net.as_str(), "nft"];
            args.extend(list);
            trellis_dataplane::nft::run("nsenter", &args, b"", Duration::from_secs(30))?
        }
        None => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
            if host.trim() != node {
                bail!("the deciding rule is enforced on node {node}, not on this host ({}); run there, or give --lab", host.trim());
            }
            trellis_dataplane::nft::run("nft", &list, b"", Duration::from_secs(30))?
        }
    };
    if !out.status.success() {
        bail!(
            "reading node {node}'s policy table: {} (does its agent enforce policy?)",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let listing: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("decoding nft's listing")?;
    Ok(rule_counters(&listing))
}

/// The deciding rules of both directions with their kernel counters.
pub fn read(trace: &Trace, lab: Option<&str>) -> Result<Vec<KernelRule>> {
    let mut out = Vec::new();
    let sides = [
        (&trace.egress, &trace.source, Direction::Egress),
        (&trace.ingress, &trace.destination, Direction::Ingress),
    ];
    for (d, side, dir) in sides {
        let Some((node, rule)) = deciding(d, side) else {
            continue;
        };
        let c = counters(lab, &node)?.get(&rule).copied();
        // A default (a tier's Deny, the endpoint's last rule) is a labelled, counted rule only
        // while flow logs are on.
        let default = !matches!(
            d.verdict,
            Verdict::Rule { .. } | Verdict::ProfileRule { .. }
        );
        if c.is_none() && default {
            continue;
        }
        out.push(KernelRule {
            direction: match dir {
                Direction::Egress => "egress",
                Direction::Ingress => "ingress",
            },
            node,
            rule,
            packets: c.map(|c| c.packets),
            bytes: c.map(|c| c.bytes),
        });
    }
    Ok(out)
}

/// The text lines after the trace.
pub fn render(rules: &[KernelRule]) -> String {
    let mut s = String::from("\nkernel counters:\n");
    if rules.is_empty() {
        s.push_str(
            "  no counted rule decided (a default, with flow logs off, or no policy applies)\n",
        );
    }
    for r in rules {
        match (r.packets, r.bytes) {
            (Some(p), Some(b)) => s.push_str(&format!(
                "  {} rule {} on {}: {p} packets, {b} bytes\n",
                r.direction, r.rule, r.node
            )),
            _ => s.push_str(&format!(
                "  {} rule {} on {}: not in the node's table\n",
                r.direction, r.rule, r.node
            )),
        }
    }
    s
}
