//! Set element batches over netlink against the real kernel, in a test namespace: additions and
//! deletions land in one transaction (IPv4, IPv6 and concatenated keys), a batch the kernel
//! refuses in part changes nothing, and the socket stays usable after a refusal.

use trellis_dataplane::nft_elements::{ElementChange, ElementSocket, NFPROTO_INET};
use trellis_dataplane::Netns;
use trellis_testutil::TestNetns;

const TABLE: &str = "table inet elt {
  set a4 { type ipv4_addr; elements = { 10.0.0.1 } }
  set a6 { type ipv6_addr; }
  set np { type ipv4_addr . inet_proto . inet_service; }
}";

fn change(add: bool, set: &str, keys: Vec<Vec<u8>>) -> ElementChange {
    ElementChange {
        add,
        set: set.into(),
        keys,
    }
}

fn listed(ns: &TestNetns) -> String {
    ns.exec_ok(&["nft", "list", "table", "inet", "elt"])
}

#[test]
fn elements_change_in_one_transaction_and_a_refused_batch_changes_nothing() {
    let ns = TestNetns::new("nftel");
    let path = std::env::temp_dir().join(format!("trellis-nftel-{}.nft", std::process::id()));
    std::fs::write(&path, TABLE).unwrap();
    ns.exec_ok(&["nft", "-f", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    // Opened inside the namespace, the socket stays in it whichever thread uses it.
    let mut sock = Netns::open(ns.path())
        .unwrap()
        .run(ElementSocket::open)
        .unwrap()
        .unwrap();
    let v6: std::net::Ipv6Addr = "fd00::7".parse().unwrap();
    // 10.0.0.2 . tcp(6) . 8080, each field padded to 4 bytes.
    let np = vec![10, 0, 0, 2, 6, 0, 0, 0, 0x1f, 0x90, 0, 0];
    let ok = vec![
        change(true, "a4", vec![vec![10, 0, 0, 2], vec![10, 0, 0, 3]]),
        change(false, "a4", vec![vec![10, 0, 0, 1]]),
        change(true, "a6", vec![v6.octets().to_vec()]),
        change(true, "np", vec![np]),
    ];
    sock.apply(NFPROTO_INET, "elt", &ok).unwrap();
    let after = listed(&ns);
    assert!(after.contains("10.0.0.2, 10.0.0.3"), "{after}");
    assert!(!after.contains("10.0.0.1"), "{after}");
    assert!(after.contains("fd00::7"), "{after}");
    assert!(after.contains("10.0.0.2 . tcp . 8080"), "{after}");

    // The second change deletes an element that is not there: the first must not land either.
    let refused = vec![
        change(true, "a4", vec![vec![10, 0, 0, 9]]),
        change(false, "a6", vec![vec![0xfd; 16]]),
        change(true, "a4", vec![vec![10, 0, 0, 10]]),
    ];
    let err = sock
        .apply(NFPROTO_INET, "elt", &refused)
        .expect_err("deleting a missing element is refused");
    assert!(err.to_string().contains("set element batch"), "{err}");
    assert_eq!(listed(&ns), after, "a refused batch changed the table");

    // A set that does not exist is refused the same way.
    let missing = vec![change(true, "nope", vec![vec![10, 0, 0, 4]])];
    assert!(sock.apply(NFPROTO_INET, "elt", &missing).is_err());
    assert_eq!(listed(&ns), after);

    // The socket still works: every answer to the refused batches was read.
    sock.apply(
        NFPROTO_INET,
        "elt",
        &[change(true, "a4", vec![vec![10, 0, 0, 5]])],
    )
    .unwrap();
    assert!(listed(&ns).contains("10.0.0.5"));
}

/// One batch may touch many sets (a label change moves a pod in and out of every selector set
/// it matches): the kernel answers each message with an acknowledgement, all at the end of the
/// batch, and all of them must reach the socket for the batch to count as applied.
#[test]
fn a_batch_over_many_sets_is_applied_and_acknowledged() {
    const SETS: usize = 2000;
    let ns = TestNetns::new("nftelmany");
    let mut table = String::from("table inet many {\n");
    for i in 0..SETS {
        table.push_str(&format!("  set s{i} {{ type ipv4_addr; }}\n"));
    }
    table.push_str("}\n");
    let path = std::env::temp_dir().join(format!("trellis-nftelmany-{}.nft", std::process::id()));
    std::fs::write(&path, table).unwrap();
    ns.exec_ok(&["nft", "-f", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    let mut sock = Netns::open(ns.path())
        .unwrap()
        .run(ElementSocket::open)
        .unwrap()
        .unwrap();
    let changes: Vec<ElementChange> = (0..SETS)
        .map(|i| change(true, &format!("s{i}"), vec![vec![10, 0, 0, 1]]))
        .collect();
    sock.apply(NFPROTO_INET, "many", &changes)
        .expect("a batch over every set");
    let last = ns.exec_ok(&[
        "nft",
        "list",
        "set",
        "inet",
        "many",
        &format!("s{}", SETS - 1),
    ]);
    assert!(last.contains("10.0.0.1"), "{last}");
    assert!(sock.table_exists(NFPROTO_INET, "many").unwrap());
    assert!(!sock.table_exists(NFPROTO_INET, "absent").unwrap());
}
