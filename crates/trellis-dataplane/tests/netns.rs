//! `Netns::enter_with` against the real kernel: the calling thread is inside the namespace for
//! the closure and back in its own afterwards, also when the closure panics. Needs root.

use std::os::unix::fs::MetadataExt;

use trellis_dataplane::{Netlink, Netns};
use trellis_testutil::TestNetns;

/// The inode of the calling thread's network namespace.
fn current_ns() -> u64 {
    std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
}

#[test]
fn enter_with_returns_the_thread_to_its_namespace_also_after_a_panic() {
    let t = TestNetns::new("enterw");
    let ns = Netns::open(t.path()).unwrap();
    let target = std::fs::metadata(t.path()).unwrap().ino();
    let home = current_ns();
    assert_ne!(home, target);

    let inside = ns.enter_with(current_ns).unwrap();
    assert_eq!(
        inside, target,
        "the closure did not run inside the namespace"
    );
    assert_eq!(current_ns(), home, "the thread was not put back");

    let unwound = std::panic::catch_unwind(|| ns.enter_with(|| panic!("inside")));
    assert!(unwound.is_err());
    assert_eq!(
        current_ns(),
        home,
        "a panic left the thread in the namespace"
    );

    // A socket opened inside stays bound to that namespace: it sees the namespace's only
    // link (lo), not the test's.
    let mut nl = Netlink::open_in(&ns).unwrap();
    assert_eq!(current_ns(), home);
    let names: Vec<String> = nl.links().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, vec!["lo".to_string()]);
}
