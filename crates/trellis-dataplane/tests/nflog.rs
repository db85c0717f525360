//! The NFLOG socket receives what a `log group` rule copies, in a namespace of the test's own.

use std::time::{Duration, Instant};

use trellis_dataplane::nflog::NflogSocket;
use trellis_dataplane::Netns;
use trellis_testutil::TestNetns;

#[test]
fn a_logged_packet_arrives_with_its_rule_s_prefix() {
    let ns = TestNetns::new("nflog");
    ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
    ns.exec_ok(&[
        "nft",
        "add table inet t; add chain inet t o { type filter hook output priority 0; }; \
         add rule inet t o udp dport 9999 log prefix \"knp/x/a/out/0\" group 5 snaplen 128",
    ]);
    let mut sock = Netns::open(ns.path())
        .unwrap()
        .run(|| NflogSocket::open(5, Duration::from_millis(200)))
        .unwrap()
        .unwrap();
    // A second reader of the same group in the same namespace is refused.
    let second = Netns::open(ns.path())
        .unwrap()
        .run(|| NflogSocket::open(5, Duration::from_millis(200)))
        .unwrap();
    assert!(second.is_err(), "a group has one reader");
    ns.exec_ok(&[
        "bash",
        "-c",
        "for i in 1 2 3; do echo x > /dev/udp/127.0.0.1/9999; done; true",
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < 3 {
        assert!(Instant::now() < deadline, "logged packets: {got:?}");
        got.extend(sock.read().unwrap().packets);
    }
    for p in &got {
        assert_eq!(p.prefix, "knp/x/a/out/0");
        assert_eq!(p.dst.to_string(), "127.0.0.1");
        assert_eq!((p.protocol, p.dst_port), (17, Some(9999)));
    }
}
