//! An `nft` that never finishes cannot hold its caller: the run is killed at its deadline,
//! with whatever it started, and the error says so. A working `nft` still applies within it.

use std::time::{Duration, Instant};

use trellis_dataplane::nft;
use trellis_testutil::{temp_dir, write_executable, TestNetns};

#[test]
fn a_hung_nft_is_killed_at_the_deadline() {
    let dir = temp_dir("nftdl");
    // Not `exec sleep`: the sleeping grandchild keeps the output pipes open, so only killing
    // the whole process group ends the run.
    let hang = dir.path().join("nft");
    write_executable(&hang, "#!/bin/sh\nsleep 60\necho never\n");
    let started = Instant::now();
    let err = nft::apply_with(hang.to_str().unwrap(), vec![], Duration::from_millis(500))
        .expect_err("a hung nft must fail");
    let took = started.elapsed();
    assert!(
        err.to_string().contains("did not finish within 0.5s"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the caller was held {took:?}"
    );
}

#[test]
fn a_working_nft_applies_within_the_deadline() {
    let ns = TestNetns::new("nftok");
    let handle = trellis_dataplane::Netns::open(ns.path()).unwrap();
    let cmds = vec![serde_json::json!({"add": {"table": {"family": "ip", "name": "dltest"}}})];
    handle
        .run(|| nft::apply_with("nft", cmds, Duration::from_secs(30)))
        .unwrap()
        .unwrap();
    assert!(ns
        .exec_ok(&["nft", "list", "tables"])
        .contains("table ip dltest"));
}

/// The runner that keeps the next `nft` started: every batch applies (in the namespace it was
/// called in), a refused batch is an error and the next one still applies, and a waiting process
/// that died (killed here) is replaced by a fresh start rather than failing the batch.
#[test]
fn the_warm_runner_applies_each_batch_and_survives_a_dead_waiting_nft() {
    let ns = TestNetns::new("nftwarm");
    let handle = trellis_dataplane::Netns::open(ns.path()).unwrap();
    let warm = nft::WarmApply::default();
    let table = |name: &str| serde_json::json!({"nftables": [{"add": {"table": {"family": "ip", "name": name}}}]});
    let run = |doc: serde_json::Value| handle.run(|| warm.apply(&doc)).unwrap();
    run(table("warm1")).unwrap();
    assert!(warm.waiting_pid().is_some(), "the next nft is started");
    run(table("warm2")).unwrap();
    let bad =
        serde_json::json!({"nftables": [{"delete": {"table": {"family": "ip", "name": "nope"}}}]});
    let err = run(bad).expect_err("deleting a missing table is refused");
    assert!(err.to_string().contains("nft rejected the batch"), "{err}");
    let pid = warm.waiting_pid().expect("a started nft");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Until it is dead (a zombie: the runner has not reaped it), at most 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    }) {
        assert!(Instant::now() < deadline, "the waiting nft did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    run(table("warm3")).unwrap();
    let tables = ns.exec_ok(&["nft", "list", "tables"]);
    for t in ["warm1", "warm2", "warm3"] {
        assert!(
            tables.contains(&format!("table ip {t}")),
            "{t} missing: {tables}"
        );
    }
    // Only the test's namespace got them.
    drop(warm);
}
