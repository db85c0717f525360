use super::*;
use crate::attrs::{AsPath, AsSegment, Origin, SegmentKind};
use crate::nlri::AFI_IPV6;

const ASN: u32 = 64512;

fn p(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn peer(asn: u32, n: u8, rr_client: bool) -> PeerInfo {
    PeerInfo {
        asn,
        router_id: Ipv4Addr::new(10, 0, 0, n),
        address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)),
        local_address: ip("192.0.2.1"),
        rr_client,
        next_hop: NextHopMode::Auto,
        families: vec![AFI_IPV4],
        allow_local_as: 0,
        import: vec![],
        export: vec![],
        max_prefixes: None,
    }
}

fn rib(cluster: bool) -> Rib {
    Rib::new(RibConfig {
        asn: ASN,
        router_id: "10.0.0.1".parse().unwrap(),
        cluster_id: cluster.then(|| "10.0.0.1".parse().unwrap()),
        connected: vec![],
    })
}

fn announce(prefix: &str, path: Vec<u32>, nh: &str) -> Update {
    Update {
        attrs: PathAttrs {
            origin: Origin::Igp,
            as_path: AsPath(if path.is_empty() {
                vec![]
            } else {
                vec![AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: path,
                }]
            }),
            next_hop: Some(nh.parse().unwrap()),
            ..Default::default()
        },
        nlri: vec![p(prefix)],
        ..Default::default()
    }
}

fn sent_to(outs: &[(PeerId, Outbound)], id: PeerId) -> Option<&Outbound> {
    outs.iter().find(|(k, _)| *k == id).map(|(_, o)| o)
}

#[test]
fn best_path_prefers_shorter_as_paths_then_lower_router_ids() {
    let mut r = rib(false);
    r.peer_up(2, peer(65002, 2, false));
    r.peer_up(3, peer(65003, 3, false));
    r.apply_update(2, &announce("10.1.0.0/24", vec![65002, 65100], "192.0.2.2"));
    r.apply_update(3, &announce("10.1.0.0/24", vec![65003], "192.0.2.3"));
    let (_, changed) = r.flush();
    assert!(changed);
    assert_eq!(r.installed()[&p("10.1.0.0/24")], ip("192.0.2.3"));
    // Equal paths: the lower router ID wins.
    r.apply_update(2, &announce("10.1.0.0/24", vec![65002], "192.0.2.2"));
    r.flush();
    assert_eq!(r.installed()[&p("10.1.0.0/24")], ip("192.0.2.2"));
    // Withdrawal falls back to the other path; session loss removes everything from the peer.
    r.apply_update(
        2,
        &Update {
            withdrawn: vec![p("10.1.0.0/24")],
            ..Default::default()
        },
    );
    r.flush();
    assert_eq!(r.installed()[&p("10.1.0.0/24")], ip("192.0.2.3"));
    r.peer_down(3, &[]);
    r.flush();
    assert!(r.installed().is_empty());
}

#[test]
fn local_pref_and_ebgp_preference() {
    let mut r = rib(false);
    r.peer_up(2, peer(ASN, 2, false));
    r.peer_up(3, peer(65003, 3, false));
    let mut u = announce("10.2.0.0/24", vec![], "192.0.2.2");
    r.apply_update(2, &u);
    r.apply_update(3, &announce("10.2.0.0/24", vec![65003], "192.0.2.3"));
    r.flush();
    // Same local pref (default), iBGP path shorter (0 vs 1): iBGP wins on AS path length.
    assert_eq!(r.installed()[&p("10.2.0.0/24")], ip("192.0.2.2"));
    u.attrs.local_pref = Some(50);
    r.apply_update(2, &u);
    r.flush();
    assert_eq!(r.installed()[&p("10.2.0.0/24")], ip("192.0.2.3"));
}

#[test]
fn loops_and_own_next_hops_are_rejected() {
    let mut r = rib(true);
    r.peer_up(2, peer(65002, 2, false));
    r.peer_up(3, peer(ASN, 3, false));
    let rep = r.apply_update(2, &announce("10.3.0.0/24", vec![65002, ASN], "192.0.2.2"));
    assert_eq!(rep.rejected[0].1, "AS path contains our AS");
    let mut u = announce("10.3.1.0/24", vec![], "192.0.2.3");
    u.attrs.cluster_list = vec!["10.0.0.1".parse().unwrap()];
    assert_eq!(r.apply_update(3, &u).rejected.len(), 1);
    let mut u = announce("10.3.2.0/24", vec![], "192.0.2.3");
    u.attrs.originator_id = Some("10.0.0.1".parse().unwrap());
    assert_eq!(r.apply_update(3, &u).rejected.len(), 1);
    assert_eq!(
        r.apply_update(3, &announce("10.3.3.0/24", vec![], "192.0.2.1"))
            .rejected
            .len(),
        1
    );
    assert_eq!(
        r.counters(2),
        Counters {
            received: 1,
            accepted: 0,
            advertised: 0
        }
    );
    assert_eq!(r.counters(3).received, 3);
}

#[test]
fn allowed_local_as_numbers_relax_the_loop_check_for_that_peer_only() {
    let mut r = rib(false);
    r.peer_up(
        2,
        PeerInfo {
            allow_local_as: 1,
            ..peer(65002, 2, false)
        },
    );
    r.peer_up(3, peer(65003, 3, false));
    // One occurrence of our AS is allowed from peer 2 (e.g. the same AS in every rack)...
    let once = announce("10.4.0.0/24", vec![65002, ASN, 65100], "192.0.2.2");
    assert_eq!(r.apply_update(2, &once).accepted, 1);
    // ...two are not, and peer 3 keeps the strict rule.
    let twice = announce("10.4.1.0/24", vec![65002, ASN, ASN], "192.0.2.2");
    assert_eq!(
        r.apply_update(2, &twice).rejected[0].1,
        "AS path contains our AS"
    );
    let from3 = announce("10.4.2.0/24", vec![65003, ASN], "192.0.2.3");
    assert_eq!(r.apply_update(3, &from3).rejected.len(), 1);
}

#[test]
fn local_routes_go_everywhere_with_next_hop_self() {
    let mut r = rib(false);
    r.peer_up(2, peer(ASN, 2, false));
    r.peer_up(3, peer(65003, 3, false));
    r.originate(
        p("10.4.0.0/26"),
        Arc::new(PathAttrs::default()),
        ip("192.0.2.1"),
    );
    let (outs, changed) = r.flush();
    assert!(!changed, "local routes are not for the kernel");
    let i = &sent_to(&outs, 2).unwrap().announce[0];
    assert_eq!(
        (i.0.local_pref, i.1, i.0.as_path.decision_len()),
        (Some(100), ip("192.0.2.1"), 0)
    );
    let e = &sent_to(&outs, 3).unwrap().announce[0];
    assert_eq!((e.0.local_pref, e.0.as_path.first_as()), (None, Some(ASN)));
    assert_eq!(r.counters(3).advertised, 1);
    // A flush with nothing new sends nothing; withdrawing sends a withdrawal.
    assert!(r.flush().0.is_empty());
    r.withdraw_local(p("10.4.0.0/26"));
    let (outs, _) = r.flush();
    assert_eq!(sent_to(&outs, 2).unwrap().withdraw, vec![p("10.4.0.0/26")]);
}

#[test]
fn ibgp_routes_are_not_passed_on_without_reflection() {
    let mut r = rib(false);
    r.peer_up(2, peer(ASN, 2, false));
    r.peer_up(3, peer(ASN, 3, false));
    r.peer_up(4, peer(65004, 4, false));
    r.apply_update(2, &announce("10.5.0.0/24", vec![], "192.0.2.2"));
    let (outs, _) = r.flush();
    assert!(sent_to(&outs, 3).is_none(), "iBGP split horizon");
    assert!(sent_to(&outs, 2).is_none(), "never back to the source");
    let e = &sent_to(&outs, 4).unwrap().announce[0];
    assert_eq!(e.1, ip("192.0.2.1"), "eBGP gets next hop self");
}

#[test]
fn route_reflection_follows_rfc4456() {
    let mut r = rib(true);
    r.peer_up(2, peer(ASN, 2, true)); // client
    r.peer_up(3, peer(ASN, 3, true)); // client
    r.peer_up(4, peer(ASN, 4, false)); // non-client
    r.apply_update(2, &announce("10.6.0.0/24", vec![], "192.0.2.2"));
    let (outs, _) = r.flush();
    for to in [3, 4] {
        let a = &sent_to(&outs, to).unwrap().announce[0];
        assert_eq!(a.1, ip("192.0.2.2"), "reflection keeps the next hop");
        assert_eq!(a.0.originator_id, Some("10.0.0.2".parse().unwrap()));
        assert_eq!(
            a.0.cluster_list,
            vec!["10.0.0.1".parse::<Ipv4Addr>().unwrap()]
        );
    }
    // From a non-client: to clients only.
    r.apply_update(4, &announce("10.6.1.0/24", vec![], "192.0.2.4"));
    let (outs, _) = r.flush();
    assert!(sent_to(&outs, 2).is_some() && sent_to(&outs, 3).is_some());
    assert!(sent_to(&outs, 4).is_none());
}

#[test]
fn next_hop_mode_self_and_keep() {
    let mut r = rib(true);
    let with_mode = |n: u8, asn: u32, client: bool, mode: NextHopMode| PeerInfo {
        next_hop: mode,
        ..peer(asn, n, client)
    };
    r.peer_up(2, with_mode(2, ASN, true, NextHopMode::Auto));
    r.peer_up(3, with_mode(3, ASN, true, NextHopMode::SetSelf));
    r.peer_up(4, with_mode(4, 65004, false, NextHopMode::Keep));
    r.peer_up(5, with_mode(5, 65005, false, NextHopMode::Auto));
    r.peer_up(6, with_mode(6, ASN, false, NextHopMode::Keep));
    r.apply_update(2, &announce("10.7.0.0/24", vec![], "192.0.2.2"));
    r.apply_update(5, &announce("10.7.5.0/24", vec![65005], "192.0.2.5"));
    r.originate(
        p("10.7.9.0/26"),
        Arc::new(PathAttrs::default()),
        ip("192.0.2.1"),
    );
    let (outs, _) = r.flush();
    let nh = |to: PeerId, prefix: &str| {
        sent_to(&outs, to)
            .unwrap()
            .announce
            .iter()
            .find(|a| a.2.contains(&p(prefix)))
            .map(|a| a.1)
            .unwrap_or_else(|| panic!("{prefix} not sent to {to}"))
    };
    let own = ip("192.0.2.1");
    // A reflected route: kept by Auto and Keep, rewritten by Self.
    assert_eq!(
        nh(3, "10.7.0.0/24"),
        own,
        "Self puts the reflector in the path"
    );
    assert_eq!(nh(6, "10.7.0.0/24"), ip("192.0.2.2"));
    // To an external peer: Auto rewrites, Keep does not.
    assert_eq!(nh(5, "10.7.0.0/24"), own);
    assert_eq!(
        nh(4, "10.7.0.0/24"),
        ip("192.0.2.2"),
        "third-party next hop"
    );
    // Learned over eBGP, sent over iBGP: Auto rewrites, Keep does not.
    assert_eq!(nh(2, "10.7.5.0/24"), own);
    assert_eq!(nh(6, "10.7.5.0/24"), ip("192.0.2.5"));
    // Our own routes carry our address whatever the mode.
    for to in [2, 3, 4, 5, 6] {
        assert_eq!(nh(to, "10.7.9.0/26"), own);
    }
}

#[test]
fn graceful_restart_keeps_only_the_retained_families() {
    let mut r = rib(false);
    let mut info = peer(65002, 2, false);
    info.families = vec![AFI_IPV4, AFI_IPV6];
    r.peer_up(2, info.clone());
    r.apply_update(2, &announce("10.7.0.0/24", vec![65002], "192.0.2.2"));
    let v6 = Update {
        attrs: announce("10.7.0.0/24", vec![65002], "192.0.2.2").attrs,
        mp_reach: Some(crate::attrs::MpReach {
            afi: AFI_IPV6,
            safi: 1,
            next_hop: "2001:db8::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
                .to_vec(),
            nlri: vec![p("2001:db8:7::/48")],
        }),
        ..Default::default()
    };
    r.apply_update(2, &v6);
    r.flush();
    assert_eq!(r.installed().len(), 2);
    // Only IPv4 was listed in the peer's Graceful Restart capability: IPv6 goes at once.
    r.peer_down(2, &[AFI_IPV4]);
    r.flush();
    assert_eq!(
        r.installed().keys().collect::<Vec<_>>(),
        vec![p("10.7.0.0/24")]
    );
    assert_eq!(r.counters(2).accepted, 1);
    // Back, then the IPv4 family's stale paths go by themselves (End-of-RIB, or F bit clear).
    r.peer_up(2, info);
    r.sweep_stale_family(2, AFI_IPV6);
    r.flush();
    assert_eq!(
        r.installed().len(),
        1,
        "another family's sweep leaves IPv4 alone"
    );
    r.sweep_stale_family(2, AFI_IPV4);
    r.flush();
    assert!(r.installed().is_empty());
    assert_eq!(r.counters(2).accepted, 0);
    // Nothing retained: everything goes at once.
    r.apply_update(2, &announce("10.7.0.0/24", vec![65002], "192.0.2.2"));
    r.flush();
    r.peer_down(2, &[]);
    r.flush();
    assert!(r.installed().is_empty());
}

#[test]
fn graceful_restart_keeps_stale_paths_until_swept() {
    let mut r = rib(false);
    r.peer_up(2, peer(65002, 2, false));
    r.apply_update(2, &announce("10.7.0.0/24", vec![65002], "192.0.2.2"));
    r.apply_update(2, &announce("10.7.1.0/24", vec![65002], "192.0.2.2"));
    r.flush();
    r.peer_down(2, &[AFI_IPV4]);
    r.flush();
    assert_eq!(r.installed().len(), 2, "stale paths still forward");
    r.peer_up(2, peer(65002, 2, false));
    r.apply_update(2, &announce("10.7.0.0/24", vec![65002], "192.0.2.2"));
    r.sweep_stale(2);
    r.flush();
    assert_eq!(
        r.installed().keys().collect::<Vec<_>>(),
        vec![p("10.7.0.0/24")]
    );
    assert_eq!(r.counters(2).accepted, 1);
}

#[test]
fn a_hundred_thousand_prefixes_in_one_rib() {
    let mut r = rib(false);
    r.peer_up(2, peer(65002, 2, false));
    let prefixes: Vec<IpNet> = (0..100_000u32)
        .map(|i| IpNet::new(Ipv4Addr::from(0x6400_0000 + (i << 8)).into(), 24).unwrap())
        .collect();
    let mut u = announce("10.0.0.0/24", vec![65002], "192.0.2.2");
    u.nlri = prefixes;
    assert_eq!(r.apply_update(2, &u).accepted, 100_000);
    r.flush();
    assert_eq!(r.installed().len(), 100_000);
}

/// The prefixes of one UPDATE point at one shared path (a full table is a few hundred
/// UPDATEs, so a prefix costs its key and a pointer), and stay shared when a graceful restart
/// marks them stale.
#[test]
fn an_updates_prefixes_share_one_path_even_when_stale() {
    let mut r = rib(false);
    r.peer_up(2, peer(65002, 2, false));
    let mut u = announce("10.0.0.0/24", vec![65002], "192.0.2.2");
    u.nlri = (0..1000u32)
        .map(|i| IpNet::new(Ipv4Addr::from(0x6400_0000 + (i << 8)).into(), 24).unwrap())
        .collect();
    assert_eq!(r.apply_update(2, &u).accepted, 1000);
    let shared = |r: &Rib| -> HashSet<*const PathInfo> {
        r.paths
            .values()
            .flat_map(|ps| ps.iter())
            .map(|p| &**p as *const PathInfo)
            .collect()
    };
    assert_eq!(shared(&r).len(), 1);
    r.peer_down(2, &[AFI_IPV4]);
    assert_eq!(shared(&r).len(), 1);
    assert!(r.paths.values().flat_map(|ps| ps.iter()).all(|p| p.stale));
}

#[test]
fn next_hops_beyond_the_subnet_resolve_through_the_hosts_routes_or_take_no_part() {
    let mut r = rib(false);
    r.set_config(RibConfig {
        connected: vec![p("192.0.2.0/24")],
        ..r.config.clone().unwrap()
    });
    r.peer_up(2, peer(65002, 2, false));
    r.peer_up(3, peer(65003, 3, false));
    // The shorter path has a next hop beyond the connected network (eBGP multihop) and no
    // route to it: unresolvable, it takes no part in the decision (RFC 4271 §9.1.2.1).
    r.apply_update(2, &announce("10.8.0.0/24", vec![65002], "198.51.100.2"));
    r.apply_update(3, &announce("10.8.0.0/24", vec![65003, 65100], "192.0.2.3"));
    r.flush();
    assert_eq!(r.installed()[&p("10.8.0.0/24")], ip("192.0.2.3"));
    assert_eq!(r.counters(2).accepted, 1, "still accepted into Adj-RIB-In");
    // A default route makes the multihop peer's next hop reachable: its shorter path wins and
    // is installed through the default gateway (RFC 4271 §5.1.3).
    r.set_igp_routes([(p("0.0.0.0/0"), ip("192.0.2.254"))]);
    let (outs, changed) = r.flush();
    assert!(changed);
    assert_eq!(r.installed()[&p("10.8.0.0/24")], ip("192.0.2.254"));
    let to3 = sent_to(&outs, 3).expect("peer 3 hears the new best path");
    assert_eq!(to3.announce.len(), 1);
    // The longest covering route decides; a route through another family is ignored.
    r.set_igp_routes([
        (p("0.0.0.0/0"), ip("192.0.2.254")),
        (p("198.51.100.0/24"), ip("192.0.2.100")),
        (p("::/0"), ip("2001:db8::1")),
    ]);
    r.flush();
    assert_eq!(r.installed()[&p("10.8.0.0/24")], ip("192.0.2.100"));
    // The same set again changes nothing; losing the routes falls back to the connected path.
    r.set_igp_routes([
        (p("::/0"), ip("2001:db8::1")),
        (p("198.51.100.0/24"), ip("192.0.2.100")),
        (p("0.0.0.0/0"), ip("192.0.2.254")),
    ]);
    assert_eq!(r.flush(), (vec![], false));
    r.set_igp_routes([]);
    r.flush();
    assert_eq!(r.installed()[&p("10.8.0.0/24")], ip("192.0.2.3"));
}

#[test]
fn filters_drop_imports_and_exports_per_peer_and_change_live() {
    use crate::policy::{PrefixMatch, PrefixOp, Rule};
    let reject = |cidr: &str, op: PrefixOp| Rule {
        ipv6: false,
        prefix: Some(PrefixMatch::new(p(cidr), op)),
        learned_only: false,
        accept: false,
    };
    let mut r = rib(false);
    // Peer 2 may not give us a default route; peer 3 is not sent 10.9.0.0/16.
    r.peer_up(
        2,
        PeerInfo {
            import: vec![reject("0.0.0.0/0", PrefixOp::Equal)],
            ..peer(65002, 2, false)
        },
    );
    r.peer_up(
        3,
        PeerInfo {
            export: vec![reject("10.9.0.0/16", PrefixOp::In)],
            ..peer(65003, 3, false)
        },
    );
    r.originate(
        p("10.1.0.0/26"),
        Arc::new(PathAttrs::default()),
        ip("192.0.2.1"),
    );
    let rep = r.apply_update(2, &announce("0.0.0.0/0", vec![65002], "192.0.2.2"));
    assert_eq!(rep.rejected[0].1, "rejected by a BGPFilter");
    r.apply_update(2, &announce("10.9.1.0/24", vec![65002], "192.0.2.2"));
    let (outs, _) = r.flush();
    assert_eq!(
        r.counters(2),
        Counters {
            received: 2,
            accepted: 1,
            advertised: 1
        }
    );
    assert!(!r.installed().contains_key(&p("0.0.0.0/0")));
    let to3 = sent_to(&outs, 3).unwrap();
    let sent: Vec<IpNet> = to3.announce.iter().flat_map(|a| a.2.clone()).collect();
    assert_eq!(
        sent,
        vec![p("10.1.0.0/26")],
        "the filtered prefix is held back"
    );
    // Export filter lifted: the held-back route goes out; the import filter is unchanged.
    assert!(!r.set_peer_filters(3, vec![], vec![]));
    let (outs, _) = r.flush();
    assert_eq!(
        sent_to(&outs, 3).unwrap().announce[0].2,
        vec![p("10.9.1.0/24")]
    );
    // Import filter changed: the caller must ask the peer to send its routes again.
    assert!(r.set_peer_filters(2, vec![], vec![]));
}

fn limited(limit: usize, action: LimitAction) -> PeerInfo {
    PeerInfo {
        max_prefixes: Some(PrefixLimit { limit, action }),
        import: vec![crate::policy::Rule {
            ipv6: false,
            prefix: Some(crate::policy::PrefixMatch::new(
                p("10.8.9.0/24"),
                crate::policy::PrefixOp::Equal,
            )),
            learned_only: false,
            accept: false,
        }],
        ..peer(65002, 2, false)
    }
}

/// Announces 10.8.N.0/24 for each N from peer 2.
fn announce_many(r: &mut Rib, ns: std::ops::Range<u8>) -> ImportReport {
    let mut total = ImportReport::default();
    for n in ns {
        let rep = r.apply_update(
            2,
            &announce(&format!("10.8.{n}.0/24"), vec![65002], "192.0.2.2"),
        );
        total.accepted += rep.accepted;
        total.over_limit += rep.over_limit;
        total.over_limit_afi = total.over_limit_afi.or(rep.over_limit_afi);
    }
    total
}

#[test]
fn a_prefix_limit_with_reject_keeps_nothing_beyond_it() {
    let mut r = rib(false);
    r.peer_up(2, limited(3, LimitAction::Reject));
    // Two accepted and one rejected by the filter: three held, the limit.
    let rep = announce_many(&mut r, 0..2);
    assert_eq!((rep.accepted, rep.over_limit), (2, 0));
    announce_many(&mut r, 9..10);
    assert_eq!(r.counters(2).received, 3);
    let rep = announce_many(&mut r, 2..6);
    assert_eq!((rep.accepted, rep.over_limit), (0, 4));
    assert_eq!(rep.over_limit_afi, Some(AFI_IPV4));
    assert_eq!(
        r.counters(2).received,
        3,
        "nothing beyond the limit is held"
    );
    // A prefix already held may change; a withdrawal makes room for a new one.
    assert_eq!(announce_many(&mut r, 1..2).over_limit, 0);
    r.apply_update(
        2,
        &Update {
            withdrawn: vec![p("10.8.0.0/24")],
            ..Default::default()
        },
    );
    let rep = announce_many(&mut r, 4..6);
    assert_eq!((rep.accepted, rep.over_limit), (1, 1));
    r.flush();
    assert_eq!(r.installed().len(), 2);
}

#[test]
fn a_prefix_limit_with_restart_or_warn_reports_every_announcement_beyond_it() {
    let mut r = rib(false);
    r.peer_up(2, limited(2, LimitAction::Restart));
    let rep = announce_many(&mut r, 0..5);
    assert_eq!((rep.accepted, rep.over_limit), (2, 3));
    assert_eq!(
        r.counters(2).received,
        2,
        "the shell resets the session; nothing more held"
    );
    let mut r = rib(false);
    r.peer_up(2, limited(2, LimitAction::Warn));
    let rep = announce_many(&mut r, 0..5);
    assert_eq!((rep.accepted, rep.over_limit), (5, 3), "Warn keeps them");
}

#[test]
fn a_peer_that_is_behind_gets_each_changed_prefix_once_when_ready() {
    let mut r = rib(false);
    r.peer_up(2, peer(65002, 2, false));
    r.peer_up(3, peer(65003, 3, false));
    r.flush();
    // Peer 3 is behind while peer 2's route to 10.6.0.0/24 changes three times.
    for path in [vec![65002], vec![65002, 65100], vec![65002, 65101]] {
        r.apply_update(2, &announce("10.6.0.0/24", path, "192.0.2.2"));
        let (outs, _) = r.flush_when(|id| id != 3);
        assert!(sent_to(&outs, 3).is_none(), "held back");
    }
    r.apply_update(2, &announce("10.6.1.0/24", vec![65002], "192.0.2.2"));
    r.apply_update(
        2,
        &Update {
            withdrawn: vec![p("10.6.1.0/24")],
            ..Default::default()
        },
    );
    let (outs, _) = r.flush_when(|id| id != 3);
    assert!(sent_to(&outs, 3).is_none());
    // Ready again: only the latest state, once; the prefix that came and went is not sent.
    let (outs, _) = r.flush();
    let o = sent_to(&outs, 3).expect("caught up");
    assert_eq!(o.announce.len(), 1);
    assert_eq!(o.announce[0].2, vec![p("10.6.0.0/24")]);
    assert_eq!(
        o.announce[0].0.as_path.decision_len(),
        3,
        "64512 65002 65101"
    );
    assert!(o.withdraw.is_empty());
    let (outs, _) = r.flush();
    assert!(sent_to(&outs, 3).is_none(), "nothing left pending");
}

/// ROUTE-REFRESH (RFC 2918) asks for the Adj-RIB-Out again; the peer keeps what it holds
/// meanwhile. A prefix withdrawn between the request and the resend must still be withdrawn —
/// also when the peer is behind and the resend waits — or the peer keeps it forever.
#[test]
fn a_route_refresh_still_withdraws_what_went_before_the_resend() {
    for behind in [false, true] {
        let mut r = rib(false);
        r.peer_up(2, peer(65002, 2, false));
        r.peer_up(3, peer(65003, 3, false));
        r.apply_update(2, &announce("10.6.0.0/24", vec![65002], "192.0.2.2"));
        r.apply_update(2, &announce("10.6.1.0/24", vec![65002], "192.0.2.2"));
        let (outs, _) = r.flush();
        let sent = |o: &Outbound| -> Vec<IpNet> {
            let mut v: Vec<IpNet> = o.announce.iter().flat_map(|a| a.2.clone()).collect();
            v.sort();
            v
        };
        assert_eq!(sent(sent_to(&outs, 3).unwrap()).len(), 2);
        // Peer 3 asks for a refresh; before its resend, one of the routes goes.
        r.refresh(3);
        r.apply_update(
            2,
            &Update {
                withdrawn: vec![p("10.6.1.0/24")],
                ..Default::default()
            },
        );
        if behind {
            let (outs, _) = r.flush_when(|id| id != 3);
            assert!(sent_to(&outs, 3).is_none(), "held back");
        }
        let (outs, _) = r.flush();
        let o = sent_to(&outs, 3).expect("the resend");
        assert_eq!(sent(o), vec![p("10.6.0.0/24")], "behind: {behind}");
        assert_eq!(o.withdraw, vec![p("10.6.1.0/24")], "behind: {behind}");
        // A refresh with nothing changed sends the table again, and nothing after that.
        r.refresh(3);
        let (outs, _) = r.flush();
        let o = sent_to(&outs, 3).expect("the resend");
        assert_eq!(sent(o), vec![p("10.6.0.0/24")]);
        assert!(o.withdraw.is_empty());
        let (outs, _) = r.flush();
        assert!(sent_to(&outs, 3).is_none());
    }
}
