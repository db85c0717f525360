//! `ipMasq` for bridge mode: one masquerade rule per attachment in Trellis's own nftables table
//! (`inet trellis_cni_masq`), tagged with a comment that identifies network and attachment.
//! Every change is one atomic `nft` batch, serialised across processes by a lock file; the
//! table is deleted when its last rule goes. Does I/O (runs `nft`).

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use ipnet::IpNet;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use trellis_dataplane::nft;

use crate::error::{KernelContext, Result};
use crate::lock::FileLock;

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "trellis_cni_masq";
const CHAIN: &str = "postrouting";
/// Serialises changes to the table across processes.
pub const LOCK: &str = "/run/trellis/cni/nft.lock";

fn short_hash(parts: &[&str]) -> String {
    let d = Sha256::digest(parts.join("\0").as_bytes());
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// The comment prefix shared by all rules of one network.
fn network_tag(network: &str) -> String {
    format!("trellis-masq {} ", &short_hash(&[network])[..8])
}

/// The comment of one attachment's rule.
pub fn rule_comment(network: &str, container_id: &str, ifname: &str) -> String {
    let short_id: String = container_id.chars().take(12).collect();
    format!(
        "{}{} {short_id}",
        network_tag(network),
        short_hash(&[network, container_id, ifname])
    )
}

/// The nftables JSON expression list: `ip saddr POD ip daddr != SUBNET ip daddr != MCAST masquerade`.
pub fn rule_expr(pod: IpAddr, subnet: IpNet) -> Vec<Value> {
    let (proto, mcast) = if pod.is_ipv4() {
        ("ip", ("224.0.0.0", 4))
    } else {
        ("ip6", ("ff00::", 8))
    };
    let field = |f: &str| json!({"payload": {"protocol": proto, "field": f}});
    vec![
        json!({"match": {"op": "==", "left": field("saddr"), "right": pod.to_string()}}),
        json!({"match": {"op": "!=", "left": field("daddr"),
            "right": {"prefix": {"addr": subnet.network().to_string(), "len": subnet.prefix_len()}}}}),
        json!({"match": {"op": "!=", "left": field("daddr"),
            "right": {"prefix": {"addr": mcast.0, "len": mcast.1}}}}),
        json!({"masquerade": null}),
    ]
}

fn base_objects() -> Vec<Value> {
    vec![
        json!({"add": {"table": {"family": FAMILY, "name": TABLE}}}),
        json!({"add": {"chain": {"family": FAMILY, "table": TABLE, "name": CHAIN,
            "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}}),
    ]
}

fn delete_rule(handle: u64) -> Value {
    json!({"delete": {"rule": {"family": FAMILY, "table": TABLE, "chain": CHAIN, "handle": handle}}})
}

/// Installs (or replaces) the masquerade rules of one attachment.
pub fn add(network: &str, container_id: &str, ifname: &str, addrs: &[IpNet]) -> Result<()> {
    let _lock = FileLock::acquire(Path::new(LOCK))?;
    let comment = rule_comment(network, container_id, ifname);
    let existing = nft::list_table(FAMILY, TABLE).kctx(|| "list nftables table".into())?;
    let mut batch = base_objects();
    if let Some(listing) = &existing {
        for (_, handle, c) in nft::rules(listing) {
            if c.as_deref() == Some(comment.as_str()) {
                batch.push(delete_rule(handle));
            }
        }
    }
    for a in addrs {
        let subnet = a.trunc();
        batch.push(
            json!({"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": CHAIN,
            "comment": comment, "expr": rule_expr(a.addr(), subnet)}}}),
        );
    }
    nft::apply(batch).kctx(|| format!("install masquerade for {container_id}"))
}

/// Removes rules of `network` whose attachment fails `keep`; drops the table when it empties.
fn remove_where(network: &str, keep: impl Fn(&str) -> bool) -> Result<()> {
    let _lock = FileLock::acquire(Path::new(LOCK))?;
    let Some(listing) = nft::list_table(FAMILY, TABLE).kctx(|| "list nftables table".into())?
    else {
        return Ok(());
    };
    let tag = network_tag(network);
    let rules = nft::rules(&listing);
    let doomed: Vec<u64> = rules
        .iter()
        .filter(|(_, _, c)| {
            c.as_deref()
                .is_some_and(|c| c.starts_with(&tag) && !keep(c))
        })
        .map(|(_, h, _)| *h)
        .collect();
    let batch: Vec<Value> = if doomed.len() == rules.len() {
        vec![json!({"delete": {"table": {"family": FAMILY, "name": TABLE}}})]
    } else {
        doomed.into_iter().map(delete_rule).collect()
    };
    if batch.is_empty() {
        return Ok(());
    }
    nft::apply(batch).kctx(|| format!("remove masquerade rules of network {network}"))
}

/// Removes one attachment's rules (idempotent).
pub fn del(network: &str, container_id: &str, ifname: &str) -> Result<()> {
    let comment = rule_comment(network, container_id, ifname);
    remove_where(network, |c| c != comment)
}

/// GC: removes rules of attachments not in `keep` (pairs of container ID and ifname).
pub fn gc(network: &str, keep: &[(String, String)]) -> Result<()> {
    let keep: HashSet<String> = keep
        .iter()
        .map(|(c, i)| rule_comment(network, c, i))
        .collect();
    remove_where(network, |c| keep.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_identify_network_and_attachment() {
        let a = rule_comment("net1", "abcdef0123456789", "eth0");
        assert!(a.starts_with(&network_tag("net1")));
        assert!(!a.starts_with(&network_tag("net2")));
        assert_ne!(a, rule_comment("net1", "abcdef0123456789", "eth1"));
        assert!(a.len() < 128, "nft comments are limited to 128 bytes");
    }

    #[test]
    fn expression_excludes_subnet_and_multicast() {
        let e = rule_expr(
            "10.22.0.5".parse().unwrap(),
            "10.22.0.0/16".parse().unwrap(),
        );
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"10.22.0.0\"") && s.contains("224.0.0.0") && s.contains("masquerade"));
        let e6 = rule_expr("fd00::5".parse().unwrap(), "fd00::/64".parse().unwrap());
        assert!(serde_json::to_string(&e6).unwrap().contains("ip6"));
    }
}
