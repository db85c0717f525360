//! Trellis's own NAT tables, `ip trellis` and `ip6 trellis`, as nftables JSON (pure; the
//! dataplane loop applies them with [`apply_nat`], one atomic batch): natOutgoing (pod traffic
//! from a natOutgoing pool to anywhere outside every pool is masqueraded) and floating
//! addresses (Calico's `ipNATs`: traffic to a pod's floating address is DNATed to the pod in
//! prerouting and output, and a pod reaching its own floating address is SNATed to it, as
//! Felix's `cali-fip-dnat` / `cali-fip-snat` do). A family with neither has no table.

use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Value};
use trellis_dataplane::nft;
use trellis_resources::{IpNat, IpPoolSpec};

use crate::dataplane::NAT_TABLE;

/// The floating addresses a node's NAT table serves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Floating {
    /// This node's endpoints' mappings.
    pub dnat: Vec<IpNat>,
    /// Every address of the cluster routed to a pod outside the pools' blocks (floating
    /// addresses, addresses given without IPAM): pod traffic to them is pod-to-pod, never
    /// masqueraded.
    pub reachable: Vec<IpNet>,
}

fn addr_match(family: &str, field: &str, ip: IpAddr) -> Value {
    json!({"match": {"op": "==", "left": {"payload": {"protocol": family, "field": field}}, "right": ip.to_string()}})
}

fn chain(family: &str, name: &str, hook: &str, prio: i32) -> Value {
    json!({"add": {"chain": {"family": family, "table": NAT_TABLE, "name": name, "type": "nat", "hook": hook, "prio": prio, "policy": "accept"}}})
}

fn rule(family: &str, chain: &str, comment: &str, expr: Vec<Value>) -> Value {
    json!({"add": {"rule": {"family": family, "table": NAT_TABLE, "chain": chain, "comment": comment, "expr": expr}}})
}

/// One family's table: `family` is `ip` or `ip6`; `pools` and `floating` of that family.
fn nat_family(family: &str, pools: &[&IpPoolSpec], floating: &Floating) -> Vec<Value> {
    let table = json!({"family": family, "name": NAT_TABLE});
    // Adding before deleting makes the delete succeed whether or not the table exists, so the
    // batch replaces (or removes) the table whole, whatever state it finds.
    let mut cmds = vec![
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
    ];
    let masq: Vec<&&IpPoolSpec> = pools
        .iter()
        .filter(|p| p.nat_outgoing && !p.disabled)
        .collect();
    if masq.is_empty() && floating.dnat.is_empty() {
        return cmds;
    }
    cmds.push(json!({"add": {"table": table}}));
    cmds.push(chain(family, "postrouting", "postrouting", 100));
    if !masq.is_empty() {
        let addr_type = if family == "ip" {
            "ipv4_addr"
        } else {
            "ipv6_addr"
        };
        // An interval set refuses overlapping elements ("conflicting intervals"), which would
        // fail the whole batch: one stored pool overlapping another (written by an older
        // version or directly) turned natOutgoing off for every pool. The CIDRs are merged.
        let elems = |cidrs: Vec<IpNet>| -> Vec<Value> {
            IpNet::aggregate(&cidrs)
                .iter()
                .map(
                    |c| json!({"prefix": {"addr": c.network().to_string(), "len": c.prefix_len()}}),
                )
                .collect()
        };
        let set = |name: &str, elems: Vec<Value>| json!({"add": {"set": {"family": family, "table": NAT_TABLE, "name": name, "type": addr_type, "flags": ["interval"], "elem": elems}}});
        let all: Vec<IpNet> = pools
            .iter()
            .map(|p| p.cidr)
            .chain(floating.reachable.iter().copied())
            .collect();
        cmds.extend([
            set("all_pools", elems(all)),
            set("masq_pools", elems(masq.iter().map(|p| p.cidr).collect())),
            rule(family, "postrouting", "trellis natOutgoing", vec![
                json!({"match": {"op": "==", "left": {"payload": {"protocol": family, "field": "saddr"}}, "right": "@masq_pools"}}),
                json!({"match": {"op": "!=", "left": {"payload": {"protocol": family, "field": "daddr"}}, "right": "@all_pools"}}),
                json!({"masquerade": null}),
            ]),
        ]);
    }
    if floating.dnat.is_empty() {
        return cmds;
    }
    cmds.push(chain(family, "prerouting", "prerouting", -100));
    cmds.push(chain(family, "output", "output", -100));
    for n in &floating.dnat {
        let dnat = || {
            vec![
                addr_match(family, "daddr", n.external_ip),
                json!({"dnat": {"addr": n.internal_ip.to_string()}}),
            ]
        };
        cmds.push(rule(family, "prerouting", "trellis floating IP", dnat()));
        cmds.push(rule(family, "output", "trellis floating IP", dnat()));
        // Hairpin: the pod reached itself through its floating address; its reply must come
        // back from that address.
        cmds.push(rule(
            family,
            "postrouting",
            "trellis floating IP hairpin",
            vec![
                addr_match(family, "saddr", n.internal_ip),
                addr_match(family, "daddr", n.internal_ip),
                json!({"snat": {"addr": n.external_ip.to_string()}}),
            ],
        ));
    }
    cmds
}

/// The natOutgoing tables, `ip trellis` and `ip6 trellis` (see [`nat_ruleset_with`]).
pub fn nat_ruleset(pools: &[(String, IpPoolSpec)]) -> Vec<Value> {
    nat_ruleset_with(pools, &Floating::default())
}

/// The NAT tables for `pools` and `floating`: traffic from a natOutgoing pool to anywhere
/// outside every pool of its family (and every floating address) is masqueraded; pod-to-pod
/// traffic never is; floating addresses are DNATed to their pods. One batch for both families,
/// so the change is atomic.
pub fn nat_ruleset_with(pools: &[(String, IpPoolSpec)], floating: &Floating) -> Vec<Value> {
    let mut cmds = Vec::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let pools: Vec<&IpPoolSpec> = pools
            .iter()
            .map(|(_, p)| p)
            .filter(|p| p.cidr.addr().is_ipv4() == v4)
            .collect();
        let floating = Floating {
            dnat: floating
                .dnat
                .iter()
                .filter(|n| n.external_ip.is_ipv4() == v4)
                .cloned()
                .collect(),
            reachable: floating
                .reachable
                .iter()
                .filter(|n| n.addr().is_ipv4() == v4)
                .copied()
                .collect(),
        };
        cmds.extend(nat_family(family, &pools, &floating));
    }
    cmds
}

/// Applies a NAT ruleset in one atomic nft batch (in the calling thread's namespace).
pub fn apply_nat(ruleset: &[Value]) -> Result<(), String> {
    nft::apply(ruleset.to_vec()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(r: &[Value]) -> String {
        r.iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn floating_addresses_are_dnated_in_prerouting_and_output_and_never_masqueraded() {
        let pools: Vec<(String, IpPoolSpec)> = vec![(
            "p".into(),
            serde_json::from_value(json!({"cidr": "10.1.0.0/16", "natOutgoing": true})).unwrap(),
        )];
        let floating = Floating {
            dnat: vec![IpNat {
                internal_ip: "10.1.0.5".parse().unwrap(),
                external_ip: "203.0.113.9".parse().unwrap(),
            }],
            reachable: vec!["203.0.113.9/32".parse().unwrap()],
        };
        let text = commands(&nat_ruleset_with(&pools, &floating));
        for chain in ["prerouting", "output"] {
            let rule = text
                .lines()
                .find(|l| l.contains(&format!("\"chain\":\"{chain}\"")) && l.contains("dnat"))
                .unwrap_or_else(|| panic!("no DNAT in {chain}: {text}"));
            assert!(
                rule.contains("203.0.113.9") && rule.contains("10.1.0.5"),
                "{rule}"
            );
        }
        let all = text.lines().find(|l| l.contains("\"all_pools\"")).unwrap();
        assert!(all.contains("203.0.113.9"), "{all}");
        assert!(text.contains("\"snat\""), "hairpin: {text}");
        // Without floating addresses or natOutgoing the table is only removed.
        let none = nat_ruleset_with(&[], &Floating::default());
        assert_eq!(none.len(), 4, "{none:?}");
    }
}
