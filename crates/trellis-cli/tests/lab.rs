//! `trellis lab` end to end: every example topology comes up and passes `check` with the
//! embedded store, vxlan and cross-subnet also with etcd; `status` shows the seeds' route
//! shapes; `down` removes everything, also for a half-built lab.

mod common;

use std::process::Command;

use common::{lab_check, trellis, LabGuard};

fn example(file: &str, name: &str, kind: &str) -> String {
    let path = format!(
        "{}/../../examples/lab/{file}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let _guard = LabGuard(name.to_string());
    let (ok, out) = trellis(&[
        "lab",
        "up",
        "-f",
        &path,
        "--name",
        name,
        "--datastore-kind",
        kind,
    ]);
    assert!(ok, "lab up {file} ({kind}): {out}");
    let (ok, check) = lab_check(name, 30);
    assert!(ok, "lab check {file} ({kind}):\n{check}");
    let (ok, status) = trellis(&["lab", "status", name]);
    assert!(ok, "{status}");
    let (ok, _) = trellis(&["lab", "down", name]);
    assert!(ok);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains(&format!("tl-{name}-")),
        "namespaces left behind"
    );
    status
}

#[test]
fn vxlan_embedded_and_etcd() {
    let s = example("vxlan", "tvx", "embedded");
    assert!(
        s.contains("dev vxlan.trellis proto 231 onlink") && s.contains("blackhole"),
        "{s}"
    );
    example("vxlan", "tvxe", "etcd");
}

#[test]
fn direct_embedded() {
    let s = example("direct", "tdir", "embedded");
    assert!(
        s.contains("dev eth0 proto 231") && !s.contains("vxlan.trellis"),
        "{s}"
    );
}

#[test]
fn cross_subnet_embedded_and_etcd() {
    let s = example("cross-subnet", "tcs", "embedded");
    assert!(
        s.contains("dev eth0 proto 231") && s.contains("dev vxlan.trellis proto 231 onlink"),
        "direct inside, VXLAN across:\n{s}"
    );
    example("cross-subnet", "tcse", "etcd");
}

#[test]
fn nat_embedded() {
    example("nat", "tnat", "embedded");
}

#[test]
fn down_cleans_a_half_built_lab() {
    let name = "thalf";
    let _guard = LabGuard(name.into());
    // A lab that died early: a state file naming one namespace, and a stray namespace.
    std::fs::create_dir_all(format!("/run/trellis/lab/{name}")).unwrap();
    std::fs::write(
        format!("/run/trellis/lab/{name}/state.json"),
        format!(r#"{{"name":"{name}","datastore":"","namespaces":{{"fabric":"tl-{name}-fabric"}},"pids":[],"node_ips":{{}},"pod_ips":{{}},"pod_nodes":{{}},"external_ips":{{}}}}"#),
    )
    .unwrap();
    for ns in [format!("tl-{name}-fabric"), format!("tl-{name}-node1")] {
        assert!(Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .unwrap()
            .success());
    }
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok && out.contains("2 namespace(s) removed"), "{out}");
    assert!(!std::path::Path::new(&format!("/run/trellis/lab/{name}")).exists());
}

#[test]
fn bgp_examples_embedded_and_etcd() {
    let s = example("bgp-mesh", "tbgpme", "etcd");
    assert!(
        s.contains("proto 231 metric 32"),
        "BGP-learned routes:\n{s}"
    );
    example("bgp-tor", "tbgpte", "embedded");
}
