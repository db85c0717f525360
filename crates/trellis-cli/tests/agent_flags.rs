//! Bad `trellis agent` flags are refused before anything starts, naming the flag.

mod common;

use std::process::Command;

use common::bin;

#[test]
fn bad_agent_flags_name_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ds = format!("sqlite:{}", dir.path().join("t.db").display());
    let cases: [(&[&str], &str); 10] = [
        (&["--bgp", "maybe"], "--bgp"),
        (&["--vxlan-vni", "0"], "--vxlan-vni"),
        (&["--mtu", "100"], "--mtu"),
        (&["--heartbeat", "0"], "--heartbeat"),
        (&["--metrics-listen", "not-an-address"], "--metrics-listen"),
        (&["--label", "novalue"], "--label"),
        (&["--ip", "interface=("], "--ip"),
        (
            &["--vxlan-checksum-offload", "maybe"],
            "--vxlan-checksum-offload",
        ),
        (
            &["--flow-logs", "--flow-log-interval", "0"],
            "--flow-log-interval",
        ),
        (
            &["--flow-logs", "--flow-log-group", "70000"],
            "--flow-log-group",
        ),
    ];
    for (flags, name) in cases {
        let out = Command::new(bin("trellis"))
            .args(["--datastore", &ds, "agent", "--node", "n1", "--socket"])
            .arg(dir.path().join("s.sock"))
            .args(flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} was accepted");
        assert!(err.contains(name), "{flags:?}: {err}");
    }
    assert!(!dir.path().join("t.db").exists(), "nothing was written");
}
