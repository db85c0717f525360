//! The link-kind probe agrees with the kernel: for each kind, the probe's answer is whether
//! creating a link of that kind (in a throwaway namespace) succeeds. On this test kernel ipip
//! and dummy are missing and vxlan, bridge and veth are there, so both answers are exercised.

use trellis_dataplane::{features, Netlink, Netns};
use trellis_testutil::TestNetns;

#[test]
fn the_probe_agrees_with_link_creation() {
    let ns = TestNetns::new("feat");
    let handle = Netns::open(ns.path()).unwrap();
    let mut nl = Netlink::open_in(&handle).unwrap();
    let mut seen = Vec::new();
    for (kind, extra) in [
        ("ipip", &["remote", "192.0.2.1", "local", "192.0.2.2"][..]),
        ("vxlan", &["id", "7", "dstport", "4789"][..]),
        ("bridge", &[][..]),
        ("dummy", &[][..]),
        ("veth", &[][..]),
    ] {
        let probed = features::link_kind_available(&mut nl, kind).unwrap();
        let name = format!("p{kind}");
        let mut argv = vec!["ip", "link", "add", &name, "type", kind];
        argv.extend_from_slice(extra);
        let created = ns.exec(&argv).status.success();
        assert_eq!(probed, created, "probe of {kind} says {probed}");
        // Probing again with a link of the kind present gives the same answer.
        assert_eq!(
            features::link_kind_available(&mut nl, kind).unwrap(),
            created
        );
        seen.push(created);
    }
    assert!(
        !features::link_kind_available(&mut nl, "no-such-kind").unwrap(),
        "an unknown kind is never available"
    );
    assert!(
        seen.contains(&true),
        "no kind was available to compare with"
    );
}
