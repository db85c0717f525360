//! Hostile cases of [`nft::WarmApply`], the runner that keeps the next `nft -j -f -` started:
//! a batch is never applied twice, and never in a namespace other than the caller's.

use trellis_dataplane::{nft, Netns};
use trellis_testutil::{temp_dir, write_executable, TestNetns};

fn doc(commands: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "nftables": commands })
}

/// Rules of chain `inet t c` carrying `comment`, as listed in `ns`.
fn copies(ns: &TestNetns, comment: &str) -> usize {
    let listing = ns.exec_ok(&["nft", "list", "chain", "inet", "t", "c"]);
    listing
        .lines()
        .filter(|l| l.contains(&format!("comment \"{comment}\"")))
        .count()
}

/// An nft that commits its batch and is then killed by a signal (a crash on exit, the OOM
/// killer, an operator's `kill`) must not have its batch run a second time: `add rule` is not
/// idempotent, so a replay duplicates the rule (and a replayed `delete` is refused, which would
/// report a committed batch as refused). The outcome is unknown, so the apply is an error.
#[test]
fn a_warm_nft_killed_after_committing_is_not_replayed() {
    let ns = TestNetns::new("nftwrp");
    let handle = Netns::open(ns.path()).unwrap();
    let dir = temp_dir("nftwrp");
    let wrapper = dir.path().join("nft");
    // Applies what it reads, then dies by SIGKILL after the commit.
    write_executable(&wrapper, "#!/bin/sh\nnft \"$@\"\nkill -KILL $$\n");
    let warm = nft::WarmApply::with_program(wrapper.to_str().unwrap());
    let setup = doc(serde_json::json!([
        {"add": {"table": {"family": "inet", "name": "t"}}},
        {"add": {"chain": {"family": "inet", "name": "c", "table": "t"}}},
    ]));
    // A cold start: its death is reported, the table is there.
    let _ = handle.run(|| warm.apply(&setup)).unwrap();
    assert!(warm.waiting_pid().is_some(), "the next nft is started");
    let rule = doc(serde_json::json!([
        {"add": {"rule": {"family": "inet", "table": "t", "chain": "c",
            "expr": [{"counter": null}], "comment": "once"}}},
    ]));
    let r = handle.run(|| warm.apply(&rule)).unwrap();
    assert!(r.is_err(), "a run killed by a signal is not a success");
    assert_eq!(copies(&ns, "once"), 1, "the batch was applied twice");
}

/// A runner used from two namespaces applies each batch in the namespace of the thread that
/// called it, not in the one the waiting nft was started in.
#[test]
fn a_batch_applies_in_the_callers_namespace() {
    let a = TestNetns::new("nftwna");
    let b = TestNetns::new("nftwnb");
    let (ha, hb) = (
        Netns::open(a.path()).unwrap(),
        Netns::open(b.path()).unwrap(),
    );
    let warm = nft::WarmApply::default();
    let table =
        |name: &str| doc(serde_json::json!([{"add": {"table": {"family": "ip", "name": name}}}]));
    ha.run(|| warm.apply(&table("ina"))).unwrap().unwrap();
    hb.run(|| warm.apply(&table("inb"))).unwrap().unwrap();
    let la = a.exec_ok(&["nft", "list", "tables"]);
    let lb = b.exec_ok(&["nft", "list", "tables"]);
    assert!(lb.contains("table ip inb"), "b lacks its table: {lb}");
    assert!(!la.contains("table ip inb"), "b's batch went to a: {la}");
}

/// A waiting nft killed before it took its input (here it closes its stdin, says so and is
/// killed a moment later) did nothing: the batch runs on a fresh start and succeeds, once.
#[test]
fn a_warm_nft_killed_before_taking_its_input_is_replaced() {
    let ns = TestNetns::new("nftwbf");
    let handle = Netns::open(ns.path()).unwrap();
    let dir = temp_dir("nftwbf");
    let d = dir.path().display();
    let wrapper = dir.path().join("nft");
    // Once armed, the first start never reads; every other start is nft. (Armed only after
    // the setup batch: which of two starts made close together runs first is up to the
    // scheduler.)
    write_executable(
        &wrapper,
        &format!(
            "#!/bin/sh\nif [ -e {d}/arm ] && mkdir {d}/2 2>/dev/null; then exec 0<&-; touch {d}/closed; sleep 1; kill -KILL $$; fi\n\
             exec nft \"$@\"\n"
        ),
    );
    let warm = nft::WarmApply::with_program(wrapper.to_str().unwrap());
    let setup = doc(serde_json::json!([
        {"add": {"table": {"family": "inet", "name": "t"}}},
    ]));
    handle.run(|| warm.apply(&setup)).unwrap().unwrap();
    std::fs::write(dir.path().join("arm"), b"").unwrap();
    // Taken by the nft waiting since the setup batch; the start ahead of need is the armed one.
    let chain = doc(serde_json::json!([
        {"add": {"chain": {"family": "inet", "name": "c", "table": "t"}}},
    ]));
    handle.run(|| warm.apply(&chain)).unwrap().unwrap();
    // Until the waiting one has closed its input, at most 10 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !dir.path().join("closed").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiting nft did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let rule = doc(serde_json::json!([
        {"add": {"rule": {"family": "inet", "table": "t", "chain": "c",
            "expr": [{"counter": null}], "comment": "replaced"}}},
    ]));
    handle.run(|| warm.apply(&rule)).unwrap().unwrap();
    assert_eq!(copies(&ns, "replaced"), 1);
}
