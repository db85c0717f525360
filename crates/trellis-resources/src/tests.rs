use super::*;

const CALICO_POOL: &str = r#"
apiVersion: projectcalico.org/v3
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  blockSize: 26
  cidr: 192.168.0.0/16
  ipipMode: Never
  natOutgoing: true
  nodeSelector: all()
  vxlanMode: CrossSubnet
---
apiVersion: trellis.dev/v1
kind: IPAMConfiguration
metadata:
  name: default
spec:
  strictAffinity: true
  maxBlocksPerHost: 4
"#;

#[test]
fn calico_ippool_applies_unchanged() {
    let rs = parse_documents(CALICO_POOL).unwrap();
    assert_eq!(rs.len(), 2);
    let Resource::IpPool(p) = &rs[0] else {
        panic!()
    };
    assert_eq!(
        p.spec.effective_encapsulation(),
        Encapsulation::VxlanCrossSubnet
    );
    assert_eq!(p.spec.block_prefix(), 26);
    assert_eq!(rs[0].key(), "/trellis/v1/ippools/default-ipv4-ippool");
}

#[test]
fn yaml_round_trips_through_canonical_form() {
    let rs = parse_documents(CALICO_POOL).unwrap();
    let again = parse_documents(&to_yaml(&rs)).unwrap();
    assert_eq!(rs, again);
    let json =
        serde_json::to_string(&rs.iter().map(Resource::to_value).collect::<Vec<_>>()).unwrap();
    assert_eq!(parse_documents(&json).unwrap(), rs);
}

fn pool_err(spec: &str) -> ResourceError {
    let doc =
        format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n{spec}");
    parse_documents(&doc).unwrap_err()
}

#[test]
fn bad_pools_name_the_field() {
    let e = pool_err("  cidr: 10.0.0.0/16\n  blockSize: 40\n");
    assert_eq!(e.field, "spec.blockSize");
    assert!(e.to_string().contains("IPPool/p"), "{e}");
    let e = pool_err("  cidr: 10.0.0.0/16\n  blockSize: 19\n");
    assert_eq!(e.field, "spec.blockSize");
    let e = pool_err("  cidr: 10.0.0.1/16\n");
    assert_eq!(e.field, "spec.cidr");
    let e = pool_err("  cidr: 10.0.0.0/16\n  colour: blue\n");
    assert!(e.reason.contains("colour"), "{e}");
    let e = pool_err("  cidr: 10.0.0.0/16\n  nodeSelector: \"zone = 'a'\"\n");
    assert_eq!(e.field, "spec.nodeSelector");
    let e = pool_err("  cidr: 10.0.0.0/16\n  ipipMode: Always\n  vxlanMode: Always\n");
    assert_eq!(e.field, "spec.vxlanMode");
    let e = pool_err("  cidr: 10.0.0.0/16\n  encapsulation: Geneve\n");
    assert!(e.field.contains("encapsulation"), "{e}");
}

#[test]
fn unknown_kinds_versions_and_metadata_fields_are_refused() {
    let e =
        parse_documents("apiVersion: trellis.dev/v1\nkind: Frob\nmetadata: {name: x}\nspec: {}\n")
            .unwrap_err();
    assert_eq!(e.field, "kind");
    let e = parse_documents("apiVersion: projectcalico.org/v3\nkind: IPAMHandle\nmetadata: {name: x}\nspec: {handleID: x, block: {}}\n").unwrap_err();
    assert_eq!(e.field, "apiVersion");
    let e = parse_documents(
        "apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {name: n, finalizerz: []}\nspec: {}\n",
    )
    .unwrap_err();
    assert!(e.reason.contains("finalizerz"), "{e}");
    let e = parse_documents(
        "apiVersion: trellis.dev/v1\nkind: IPAMConfiguration\nmetadata: {name: other}\nspec: {}\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "metadata.name");
    let e = parse_documents("{not json").unwrap_err();
    assert_eq!(e.field, "document");
}

#[test]
fn pool_overlap_detected() {
    let p = |n: &str, c: &str| Object {
        metadata: Metadata {
            name: n.into(),
            ..Default::default()
        },
        spec: IpPoolSpec {
            cidr: c.parse().unwrap(),
            block_size: None,
            encapsulation: None,
            ipip_mode: None,
            vxlan_mode: None,
            nat_outgoing: false,
            disabled: false,
            node_selector: None,
            disable_bgp_export: false,
            allowed_uses: vec![],
            assignment_mode: None,
        },
        status: None,
    };
    let existing = vec![p("a", "10.0.0.0/16")];
    assert!(validate::check_pool_overlap(&p("b", "10.0.128.0/17"), &existing).is_err());
    assert!(validate::check_pool_overlap(&p("b", "10.1.0.0/16"), &existing).is_ok());
    assert!(
        validate::check_pool_overlap(&p("a", "10.0.0.0/15"), &existing).is_ok(),
        "a pool may replace itself"
    );
}

/// The indexed overlap check agrees with comparing every pair, on random pools of both
/// families that nest, touch and coincide (same first address, other prefix; same name).
#[test]
fn pool_index_agrees_with_comparing_every_pair() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut random_pool = |i: u64| -> Object<IpPoolSpec> {
        let cidr = if next(4) == 0 {
            let len = 120 + next(9) as u8;
            let a = (0xfd00u128 << 112) | (u128::from(next(256)) << (128 - len));
            ipnet::IpNet::new(std::net::IpAddr::V6(a.into()), len).unwrap()
        } else {
            let len = 16 + next(13) as u8;
            let a = (10u32 << 24) | ((next(1 << 16) as u32) << 8);
            ipnet::IpNet::new(std::net::IpAddr::V4(a.into()), len)
                .unwrap()
                .trunc()
        };
        let v = serde_json::json!({"metadata": {"name": format!("p{}", next(40) + i)},
            "spec": {"cidr": cidr.to_string()}});
        serde_json::from_value(v).unwrap()
    };
    for round in 0..20 {
        let existing: Vec<_> = (0..100).map(|i| random_pool(i * 1000)).collect();
        let index = validate::PoolIndex::new(&existing);
        for _ in 0..300 {
            let new = random_pool(round);
            let brute = existing.iter().any(|p| {
                p.metadata.name != new.metadata.name && addr::overlaps(&p.spec.cidr, &new.spec.cidr)
            });
            let found = index.overlapping(&new);
            assert_eq!(
                found.is_some(),
                brute,
                "{} ({})",
                new.spec.cidr,
                new.metadata.name
            );
            if let Some(p) = found {
                assert!(addr::overlaps(&p.spec.cidr, &new.spec.cidr));
                assert_ne!(p.metadata.name, new.metadata.name);
            }
            assert_eq!(
                validate::check_pool_overlap(&new, &existing).is_err(),
                brute
            );
        }
    }
}

/// An error quotes names and keys from the input; a terminal escape sequence among them is
/// shown escaped, not sent to the operator's terminal.
#[test]
fn errors_never_carry_raw_control_characters() {
    for doc in [
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: \"a\\e[2J\\e]0;pwned\\x07\"}\nspec: {cidr: 10.0.0.0/16}\n",
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: a}\nspec: {cidr: 10.0.0.0/16, \"\\e[31mx\": 1}\n",
        "apiVersion: trellis.dev/v1\nkind: \"\\e[8mIPPool\"\n",
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: \"a\\0b\"}\nspec: {cidr: 10.0.0.0/16}\n",
    ] {
        let shown = parse_documents(doc).unwrap_err().to_string();
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("\\u{1b}") || shown.contains("\\u{0}"), "{shown:?}");
    }
}

fn bgp_configuration(communities: usize, references: usize) -> String {
    let defs: Vec<String> = (0..communities)
        .map(|i| format!("{{name: c{i}, value: \"65000:{i}\"}}"))
        .collect();
    let refs: Vec<String> = (0..references).map(|i| format!("\"65001:{i}\"")).collect();
    format!(
        "apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {{name: default}}\n\
         spec:\n  communities: [{}]\n  prefixAdvertisements:\n  - cidr: 10.0.0.0/8\n    \
         communities: [{}]\n",
        defs.join(", "),
        refs.join(", ")
    )
}

/// A route carries the communities of the advertisements covering it, in one BGP message of
/// at most 4096 bytes: 1 100 of them made every agent's speaker fail to pack its UPDATEs
/// (an arithmetic overflow in debug builds, an oversized message in release). And checking
/// each reference against every named community took minutes for a 2 MB file.
#[test]
fn bgp_communities_are_bounded_by_what_one_message_holds() {
    assert!(parse_documents(&bgp_configuration(256, 256)).is_ok());
    let e = parse_documents(&bgp_configuration(0, 1100)).unwrap_err();
    assert_eq!(
        e.field, "spec.prefixAdvertisements[0].communities[256]",
        "{e}"
    );
    assert!(e.reason.contains("one BGP message"), "{e}");
    let e = parse_documents(&bgp_configuration(257, 0)).unwrap_err();
    assert_eq!(e.field, "spec.communities", "{e}");
    // The 2 MB file (40 000 names, 150 000 references) is refused at once.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(parse_documents(&bgp_configuration(40_000, 150_000)).map(|_| ()));
    });
    let e = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("validation did not finish")
        .unwrap_err();
    assert_eq!(e.field, "spec.communities", "{e}");
}

#[test]
fn kinds_parse_from_cli_names() {
    assert_eq!(Kind::parse("ippools"), Some(Kind::IpPool));
    assert_eq!(Kind::parse("IPPool"), Some(Kind::IpPool));
    assert_eq!(Kind::parse("ippool"), Some(Kind::IpPool));
    assert_eq!(Kind::parse("blockaffinity"), Some(Kind::BlockAffinity));
    assert_eq!(Kind::parse("nodes"), Some(Kind::Node));
    assert_eq!(Kind::parse("nope"), None);
}

const CALICO_BGP: &str = r#"
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  logSeverityScreen: Info
  nodeToNodeMeshEnabled: false
  asNumber: 63400
  bindMode: NodeIP
  serviceClusterIPs:
  - cidr: 10.96.0.0/12
  communities:
  - name: bgp-large-community
    value: "63400:300"
  prefixAdvertisements:
  - cidr: 172.218.4.0/26
    communities: [bgp-large-community, "63400:120"]
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: rack1-tor
spec:
  peerIP: 192.20.30.40
  asNumber: 64567
  nodeSelector: rack == 'rack-1'
  filters: [my-filter]
  sourceAddress: UseNodeIP
  numAllowedLocalASNumbers: 1
  ttlSecurity: 1
  nextHopMode: Self
  reachableBy: 192.20.30.1
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: route-reflector == 'true'
---
apiVersion: projectcalico.org/v3
kind: BGPFilter
metadata:
  name: my-filter
spec:
  exportV4:
    - action: Accept
      matchOperator: In
      cidr: 77.0.0.0/16
      source: RemotePeers
  importV4:
    - action: Accept
      matchOperator: In
      cidr: 55.0.0.0/16
      prefixLength:
        min: 30
    - action: Reject
      matchOperator: NotIn
      cidr: 44.0.0.0/16
  exportV6:
    - action: Reject
      source: RemotePeers
  importV6:
    - action: Accept
      matchOperator: Equal
      cidr: 5000::0/64
    - action: Reject
"#;

#[test]
fn calico_bgp_resources_apply_unchanged() {
    let rs = parse_documents(CALICO_BGP).unwrap();
    assert_eq!(rs.len(), 4);
    assert_eq!(rs[3].key(), "/trellis/v1/bgpfilters/my-filter");
    let Resource::BgpFilter(f) = &rs[3] else {
        panic!()
    };
    assert_eq!(f.spec.import_v4[0].prefix_length.unwrap().min, Some(30));
    assert_eq!(f.spec.import_v6[1].action, FilterAction::Reject);
    assert_eq!(rs[0].key(), "/trellis/v1/bgpconfigurations/default");
    assert_eq!(rs[1].key(), "/trellis/v1/bgppeers/rack1-tor");
    let Resource::BgpConfiguration(c) = &rs[0] else {
        panic!()
    };
    assert_eq!(c.spec.as_number, Some(63400));
    assert_eq!(c.spec.node_to_node_mesh_enabled, Some(false));
    assert_eq!(c.spec.bind_mode, Some(BindMode::NodeIp));
    let Resource::BgpPeer(p) = &rs[1] else {
        panic!()
    };
    assert_eq!(p.spec.source_address, Some(SourceAddress::UseNodeIp));
    assert_eq!(p.spec.num_allowed_local_as_numbers, Some(1));
    assert_eq!(p.spec.ttl_security, Some(1));
    assert_eq!(p.spec.next_hop_mode, Some(NextHopMode::NodeSelf));
    assert_eq!(p.spec.reachable_by.as_deref(), Some("192.20.30.1"));
    assert_eq!(p.spec.filters, vec!["my-filter".to_string()]);
}

#[test]
fn bad_bgp_resources_name_the_field() {
    let peer = |spec: &str| {
        format!("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {{name: p}}\nspec: {spec}\n")
    };
    let filter = |spec: &str| {
        format!("apiVersion: projectcalico.org/v3\nkind: BGPFilter\nmetadata: {{name: f}}\nspec: {spec}\n")
    };
    let cases = [
        (peer("{peerIP: 192.0.2.1}"), "spec.asNumber"),
        (peer("{peerIP: 192.0.2.1, asNumber: 0}"), "spec.asNumber"),
        (peer("{peerIP: 192.0.2.1, asNumber: 23456}"), "spec.asNumber"),
        (peer("{peerIP: not-an-ip, asNumber: 65000}"), "spec.peerIP"),
        (peer("{peerIP: 192.0.2.1, peerSelector: all(), asNumber: 65000}"), "spec.peerSelector"),
        (peer("{asNumber: 65000}"), "spec.peerIP"),
        (peer("{peerSelector: all(), asNumber: 65000}"), "spec.asNumber"),
        (peer("{peerSelector: 'bad ==', nodeSelector: all()}"), "spec.peerSelector"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, node: n1, nodeSelector: all()}"), "spec.nodeSelector"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, password: {secretKeyRef: {name: s, key: k}}}"), "spec.password"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, maxRestartTime: forever}"), "spec.maxRestartTime"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, bogus: 1}"), "bogus"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, sourceAddress: Elsewhere}"), "sourceAddress"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, numAllowedLocalASNumbers: 300}"), "spec.numAllowedLocalASNumbers"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, ttlSecurity: 255}"), "spec.ttlSecurity"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, nextHopMode: Keep, keepOriginalNextHop: true}"), "spec.nextHopMode"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, nextHopMode: Always}"), "nextHopMode"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, reachableBy: gateway}"), "spec.reachableBy"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, reachableBy: '2001:db8::1'}"), "spec.reachableBy"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, reachableBy: 192.0.2.1}"), "spec.reachableBy"),
        (peer("{peerSelector: all(), reachableBy: 192.0.2.1}"), "spec.reachableBy"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, maxPrefixes: {limit: 0}}"), "spec.maxPrefixes.limit"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, maxPrefixes: {limit: 5, action: Disable}}"), "Disable"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, maxPrefixes: {limit: 5, restartTime: 60}}"), "restartTime"),
        ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {bindMode: Everywhere}\n".into(), "bindMode"),
        (peer("{peerIP: 192.0.2.1, asNumber: 65000, filters: ['bad name!']}"), "spec.filters[0]"),
        (filter("{importV4: [{action: Reject, cidr: 10.0.0.0/8}]}"), "spec.importV4[0].matchOperator"),
        (filter("{importV4: [{action: Reject, matchOperator: In}]}"), "spec.importV4[0].cidr"),
        (filter("{importV4: [{action: Reject, matchOperator: In, cidr: '2001:db8::/32'}]}"), "spec.importV4[0].cidr"),
        (filter("{exportV6: [{action: Reject, matchOperator: In, cidr: 10.0.0.0/8}]}"), "spec.exportV6[0].cidr"),
        (filter("{importV4: [{action: Reject, matchOperator: In, cidr: 10.0.0.1/8}]}"), "spec.importV4[0].cidr"),
        (filter("{importV4: [{action: Reject, matchOperator: Equal, cidr: 10.0.0.0/8, prefixLength: {min: 9}}]}"), "spec.importV4[0].prefixLength"),
        (filter("{importV4: [{action: Reject, matchOperator: In, cidr: 10.0.0.0/8, prefixLength: {min: 4}}]}"), "spec.importV4[0].prefixLength"),
        (filter("{importV4: [{action: Reject, matchOperator: In, cidr: 10.0.0.0/8, prefixLength: {min: 24, max: 16}}]}"), "spec.importV4[0].prefixLength"),
        (filter("{importV4: [{action: Reject, source: RemotePeers}]}"), "spec.importV4[0].source"),
        (filter("{exportV4: [{action: Maybe}]}"), "action"),
        (filter("{exportV4: [{action: Reject, interface: '*.calico'}]}"), "interface"),
        ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: other}\nspec: {}\n".into(), "metadata.name"),
        ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {communities: [{name: c, value: '70000:1'}]}\n".into(), "spec.communities[0].value"),
        ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {prefixAdvertisements: [{cidr: 10.0.0.0/8, communities: [nope]}]}\n".into(), "spec.prefixAdvertisements[0].communities[0]"),
        ("apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {listenPort: 0}\n".into(), "spec.listenPort"),
    ];
    for (doc, field) in cases {
        let e = parse_documents(&doc).unwrap_err().to_string();
        assert!(e.contains(field), "{doc}\n→ {e} (want {field})");
    }
}

#[test]
fn pools_no_pod_may_use_are_refused() {
    for (cidr, bs, why) in [
        ("127.0.0.0/16", 26, "loopback"),
        ("126.0.0.0/7", 26, "loopback"),
        ("224.0.0.0/4", 26, "multicast"),
        ("0.0.0.0/8", 26, "unspecified"),
        ("0.0.0.0/0", 26, "unspecified"),
        ("255.255.255.255/32", 32, "broadcast"),
        ("169.254.0.0/16", 26, "link-local"),
        ("169.254.1.0/24", 26, "link-local"),
        ("169.0.0.0/8", 26, "link-local"),
        ("::1/128", 128, "loopback"),
        ("::/120", 122, "unspecified"),
        ("ff02::/16", 122, "multicast"),
        ("fe80::/64", 122, "link-local"),
    ] {
        let e = pool_err(&format!("  cidr: {cidr}\n  blockSize: {bs}\n"));
        assert_eq!(e.field, "spec.cidr", "{cidr}: {e}");
        assert!(e.reason.contains(why), "{cidr}: {e}");
    }
    // Neighbours of those ranges are fine.
    for cidr in [
        "10.0.0.0/8",
        "128.0.0.0/16",
        "223.0.0.0/16",
        "169.255.0.0/16",
        "fd00::/64",
    ] {
        let bs = if cidr.contains(':') { 122 } else { 26 };
        let doc = format!("apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: p\nspec:\n  cidr: {cidr}\n  blockSize: {bs}\n");
        parse_documents(&doc).unwrap_or_else(|e| panic!("{cidr}: {e}"));
    }
}

#[test]
fn non_finite_block_sizes_are_refused() {
    for v in [".inf", ".nan", "-.inf"] {
        let e = pool_err(&format!("  cidr: 10.0.0.0/16\n  blockSize: {v}\n"));
        assert_eq!(e.field, "spec.blockSize", "{v}: {e}");
        assert_eq!(e.doc, Some(1));
    }
}

#[test]
fn blocks_must_be_block_sized() {
    let block = |cidr: &str, n: usize| {
        let allocs = vec!["null"; n].join(", ");
        format!("apiVersion: trellis.dev/v1\nkind: IPAMBlock\nmetadata: {{name: b}}\nspec: {{cidr: '{cidr}', allocations: [{allocs}], attributes: []}}\n")
    };
    for (cidr, n) in [
        ("::/0", 1),
        ("10.0.0.0/8", 1),
        ("2001:db8::/64", 1),
        ("127.0.0.0/26", 64),
    ] {
        let e = parse_documents(&block(cidr, n)).unwrap_err();
        assert_eq!(e.field, "spec.cidr", "{cidr}: {e}");
    }
    parse_documents(&block("10.0.0.0/30", 4)).unwrap();
    let affinity = "apiVersion: trellis.dev/v1\nkind: BlockAffinity\nmetadata: {name: a}\nspec: {state: confirmed, node: n, cidr: '::/0'}\n";
    assert_eq!(parse_documents(affinity).unwrap_err().field, "spec.cidr");
    assert_eq!(validate::block_size(&"::/0".parse().unwrap()), u128::MAX);
}

#[test]
fn lists_must_hold_lists() {
    let e = parse_documents(r#"{"kind": "List", "items": {"kind": "IPPool"}}"#).unwrap_err();
    assert_eq!(e.field, "items");
    assert!(e.reason.contains("must be a list"), "{e}");
    assert!(parse_documents(r#"{"kind": "List", "items": []}"#)
        .unwrap()
        .is_empty());
    assert!(parse_documents("kind: List\nitems: []\n")
        .unwrap()
        .is_empty());
    // YAML Lists expand like JSON ones, and items are numbered as documents.
    let rs = parse_documents(&format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        CALICO_POOL
            .split("---")
            .map(|d| format!(
                "- {}\n",
                serde_json::to_string(&serde_norway::from_str::<Value>(d).unwrap()).unwrap()
            ))
            .collect::<String>()
    ))
    .unwrap();
    assert_eq!(rs, parse_documents(CALICO_POOL).unwrap());
    let e = parse_documents(r#"{"kind": "List", "items": [{"kind": "IPPool"}, {"kind": "Nope"}]}"#)
        .unwrap_err();
    assert_eq!(e.doc, Some(1));
}

#[test]
fn duplicate_keys_in_resources_are_refused() {
    let e = parse_documents(&format!(
        "{CALICO_POOL}---\napiVersion: trellis.dev/v1\nkind: IPPool\nmetadata:\n  name: p\n  name: q\nspec:\n  cidr: 10.0.0.0/16\n"
    ))
    .unwrap_err();
    assert_eq!((e.doc, e.field.as_str()), (Some(3), "metadata.name"), "{e}");
    let e = parse_documents(
        r#"{"apiVersion": "trellis.dev/v1", "kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/16", "blockSize": 26, "blockSize": 24}}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.blockSize", "{e}");
    assert!(e.reason.contains("duplicate key"), "{e}");
}

#[test]
fn hostile_selectors_are_refused_at_the_edge() {
    let deep = format!("{}all(){}", "(".repeat(4000), ")".repeat(4000));
    let bangs = format!("{}all()", "!".repeat(40_000));
    let nested = format!("{}all(){}", "(".repeat(65), ")".repeat(65));
    for (sel, want) in [
        (deep, "at most 1024"),
        (bangs, "at most 1024"),
        (nested, "deeper than 64 at offset 64"),
    ] {
        let e = pool_err(&format!("  cidr: 10.0.0.0/16\n  nodeSelector: \"{sel}\"\n"));
        assert_eq!(e.field, "spec.nodeSelector");
        assert!(e.reason.contains(want), "{e}");
    }
    let e = parse_documents("apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: p}\nspec: {peerSelector: 'a contains', nodeSelector: all()}\n").unwrap_err();
    assert_eq!(e.field, "spec.peerSelector", "{e}");
}

#[test]
fn node_pod_cidrs_are_masked_and_one_per_family() {
    let node = |cidrs: &str| {
        format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata: {{name: n}}\nspec: {{podCIDRs: [{cidrs}]}}\n")
    };
    let ok = parse_documents(&node("'10.244.1.0/24', 'fd00:10:244:1::/120'")).unwrap();
    let Resource::Node(n) = &ok[0] else {
        panic!("{ok:?}")
    };
    assert_eq!(n.spec.pod_cidrs.len(), 2);
    let round = parse_documents(&to_yaml(&ok)).unwrap();
    assert_eq!(round, ok, "podCIDRs round-trip");
    let e = parse_documents(&node("'10.244.1.1/24'")).unwrap_err();
    assert_eq!(e.field, "spec.podCIDRs[0]", "{e}");
    let e = parse_documents(&node("'10.244.1.0/24', '10.244.2.0/24'")).unwrap_err();
    assert_eq!(e.field, "spec.podCIDRs[1]", "{e}");
}
