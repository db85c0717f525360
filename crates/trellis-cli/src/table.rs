//! kubectl-style aligned tables.

use trellis_cluster::report::{BlockUsage, PoolUsage};
use trellis_ipam::cluster as alloc;
use trellis_resources::{Kind, Resource};

/// Renders rows with columns padded to their widest cell.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    // Cells show stored values (selectors, names from the datastore): control characters — a
    // terminal's escape sequences — are printed escaped, never raw.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        s.join("   ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// `text` with its control characters escaped (`\u{1b}`).
fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_string();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn opt<T: ToString>(o: &Option<T>) -> String {
    o.as_ref()
        .map(|v| v.to_string())
        .unwrap_or_else(|| "-".into())
}

/// `get KIND` as a table.
pub fn resources(kind: Kind, items: &[Resource]) -> String {
    if let Some((header, rows)) = crate::policy_table::rows(kind, items) {
        if rows.is_empty() {
            return format!("No {} found.\n", kind.plural());
        }
        return render(&header, &rows);
    }
    if items.is_empty() {
        return format!("No {} found.\n", kind.plural());
    }
    let (header, rows): (Vec<&str>, Vec<Vec<String>>) = match kind {
        Kind::IpPool => (
            vec![
                "NAME",
                "CIDR",
                "BLOCKSIZE",
                "ENCAPSULATION",
                "NATOUTGOING",
                "DISABLED",
                "SELECTOR",
            ],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::IpPool(p) = r {
                        Some(vec![
                            p.metadata.name.clone(),
                            p.spec.cidr.to_string(),
                            p.spec.block_prefix().to_string(),
                            serde_json::to_value(p.spec.effective_encapsulation())
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                            p.spec.nat_outgoing.to_string(),
                            p.spec.disabled.to_string(),
                            p.spec
                                .node_selector
                                .clone()
                                .unwrap_or_else(|| "all()".into()),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::Node => (
            vec!["NAME", "ADDRESS", "ASN", "LAST-HEARTBEAT"],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::Node(n) = r {
                        Some(vec![
                            n.metadata.name.clone(),
                            n.spec
                                .addresses
                                .first()
                                .map(|a| a.address.clone())
                                .unwrap_or_else(|| "-".into()),
                            opt(&n.spec.bgp.as_ref().and_then(|b| b.as_number)),
                            opt(&n.status.as_ref().and_then(|s| s.last_heartbeat)),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::IpamBlock => (
            vec!["NAME", "CIDR", "AFFINITY", "USED"],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::IpamBlock(b) = r {
                        Some(vec![
                            b.metadata.name.clone(),
                            b.spec.cidr.to_string(),
                            opt(&b.spec.affinity),
                            format!("{}/{}", alloc::used(&b.spec), b.spec.allocations.len()),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::IpamHandle => (
            vec!["NAME", "BLOCKS"],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::IpamHandle(h) = r {
                        Some(vec![
                            h.metadata.name.clone(),
                            h.spec
                                .block
                                .iter()
                                .map(|(b, n)| format!("{b}:{n}"))
                                .collect::<Vec<_>>()
                                .join(","),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::BlockAffinity => (
            vec!["NAME", "NODE", "CIDR", "STATE"],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::BlockAffinity(a) = r {
                        Some(vec![
                            a.metadata.name.clone(),
                            a.spec.node.clone(),
                            a.spec.cidr.to_string(),
                            format!("{:?}", a.spec.state),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::IpReservation => (
            vec!["NAME", "RESERVED"],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::IpReservation(x) = r {
                        Some(vec![
                            x.metadata.name.clone(),
                            x.spec.reserved_cidrs.join(","),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::IpamConfiguration => (
            vec![
                "NAME",
                "STRICTAFFINITY",
                "MAXBLOCKSPERHOST",
                "AUTOALLOCATEBLOCKS",
            ],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::IpamConfiguration(c) = r {
                        Some(vec![
                            c.metadata.name.clone(),
                            c.spec.strict_affinity.to_string(),
                            opt(&c.spec.max_blocks_per_host),
                            c.spec.auto_allocate_blocks.to_string(),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::WorkloadEndpoint => (
            vec![
                "NAMESPACE",
                "NAME",
                "NODE",
                "POD",
                "INTERFACE",
                "NETWORKS",
                "LABELS",
            ],
            items
                .iter()
                .filter_map(|r| {
                    if let Resource::WorkloadEndpoint(w) = r {
                        Some(vec![
                            opt(&w.metadata.namespace),
                            w.metadata.name.clone(),
                            w.spec.node.clone(),
                            opt(&w.spec.pod),
                            opt(&w.spec.interface_name),
                            w.spec
                                .ip_networks
                                .iter()
                                .map(|n| n.to_string())
                                .collect::<Vec<_>>()
                                .join(","),
                            crate::policy_table::label_column(&w.metadata.labels),
                        ])
                    } else {
                        None
                    }
                })
                .collect(),
        ),
        Kind::BgpConfiguration => (
            vec!["NAME", "ASNUMBER", "MESH", "SERVICECLUSTERIPS"],
            items
                .iter()
                .filter_map(|r| match r {
                    Resource::BgpConfiguration(c) => Some(vec![
                        c.metadata.name.clone(),
                        c.spec.as_number.unwrap_or(64512).to_string(),
                        c.spec.node_to_node_mesh_enabled.unwrap_or(true).to_string(),
                        c.spec
                            .service_cluster_ips
                            .iter()
                            .map(|c| c.cidr.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::BgpPeer => (
            vec!["NAME", "PEERIP", "NODE", "ASN"],
            items
                .iter()
                .filter_map(|r| match r {
                    Resource::BgpPeer(p) => Some(vec![
                        p.metadata.name.clone(),
                        p.spec
                            .peer_ip
                            .clone()
                            .or_else(|| {
                                p.spec
                                    .peer_selector
                                    .clone()
                                    .map(|s| format!("selector {s}"))
                            })
                            .unwrap_or_default(),
                        p.spec
                            .node
                            .clone()
                            .or_else(|| p.spec.node_selector.clone())
                            .unwrap_or_else(|| "(global)".into()),
                        opt(&p.spec.as_number),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::BgpFilter => (
            vec!["NAME", "IMPORTV4", "EXPORTV4", "IMPORTV6", "EXPORTV6"],
            items
                .iter()
                .filter_map(|r| match r {
                    Resource::BgpFilter(f) => Some(vec![
                        f.metadata.name.clone(),
                        format!("{} rules", f.spec.import_v4.len()),
                        format!("{} rules", f.spec.export_v4.len()),
                        format!("{} rules", f.spec.import_v6.len()),
                        format!("{} rules", f.spec.export_v6.len()),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        Kind::BgpStatus => (
            vec!["NODE", "ROUTERID", "ASN", "PEERS", "ESTABLISHED"],
            items
                .iter()
                .filter_map(|r| match r {
                    Resource::BgpStatus(b) => Some(vec![
                        b.spec.node.clone(),
                        b.spec.router_id.clone(),
                        b.spec.as_number.to_string(),
                        b.spec.peers.len().to_string(),
                        b.spec
                            .peers
                            .iter()
                            .filter(|p| p.state == "Established")
                            .count()
                            .to_string(),
                    ]),
                    _ => None,
                })
                .collect(),
        ),
        // The policy kinds are rendered by `policy_table` above.
        _ => (
            vec!["NAME"],
            items
                .iter()
                .map(|r| vec![r.metadata().name.clone()])
                .collect(),
        ),
    };
    render(&header, &rows)
}

/// `ipam show`.
pub fn ipam_show(pools: &[PoolUsage], stray: &[BlockUsage]) -> String {
    let mut rows = Vec::new();
    for p in pools {
        rows.push(vec![
            format!("pool {}", p.name),
            p.cidr.to_string(),
            p.size.to_string(),
            p.used.to_string(),
            "-".into(),
        ]);
        for b in &p.blocks {
            rows.push(vec![
                "  block".into(),
                b.cidr.to_string(),
                b.size.to_string(),
                b.used.to_string(),
                opt(&b.node),
            ]);
        }
    }
    for b in stray {
        rows.push(vec![
            "block (no pool)".into(),
            b.cidr.to_string(),
            b.size.to_string(),
            b.used.to_string(),
            opt(&b.node),
        ]);
    }
    render(&["GROUP", "CIDR", "SIZE", "USED", "AFFINITY"], &rows)
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        s => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// `bgp status`: one block per node.
pub fn bgp_status(nodes: &[trellis_resources::BgpStatusSpec], now: u64) -> String {
    let mut out = String::new();
    for n in nodes {
        out += &format!(
            "node {}: AS {}, router ID {}{} (reported {} ago)\n",
            n.node,
            n.as_number,
            n.router_id,
            n.route_reflector_cluster_id
                .as_deref()
                .map(|c| format!(", route reflector cluster {c}"))
                .unwrap_or_default(),
            duration(now.saturating_sub(n.updated))
        );
        let rows: Vec<Vec<String>> = n
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.address.clone(),
                    p.as_number.to_string(),
                    p.kind.clone(),
                    p.state.clone(),
                    p.since
                        .map(|s| duration(now.saturating_sub(s)))
                        .unwrap_or_default(),
                    p.received.to_string(),
                    p.accepted.to_string(),
                    p.advertised.to_string(),
                    p.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out += &render(
            &[
                "PEER ADDRESS",
                "AS",
                "TYPE",
                "STATE",
                "SINCE",
                "RECEIVED",
                "ACCEPTED",
                "ADVERTISED",
                "LAST ERROR",
            ],
            &rows,
        );
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(&["A", "LONGER"], &[vec!["xxxx".into(), "y".into()]]);
        assert_eq!(t, "A      LONGER\nxxxx   y\n");
    }

    /// A stored selector holding a terminal escape sequence (set the title, clear the screen)
    /// is shown escaped by `get`.
    #[test]
    fn control_characters_in_cells_are_escaped() {
        let t = render(
            &["A", "B"],
            &[vec![
                "a == \"\u{1b}]0;x\u{7}\u{1b}[2J\"".into(),
                "\u{9b}2J".into(),
            ]],
        );
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(t.contains("\\u{1b}[2J") && t.contains("\\u{9b}"), "{t}");
    }
}
