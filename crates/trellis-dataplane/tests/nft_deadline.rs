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
