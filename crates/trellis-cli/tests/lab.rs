//! `trellis lab` end to end: every example topology comes up and passes `check` with the
//! embedded store, vxlan and cross-subnet also with etcd, the check matrix's columns in the
//! order of its rows; `status` shows the seeds' route shapes; `down` removes everything, also
//! for a half-built lab, and kills no process that merely reuses a recorded PID; a rejected
//! topology leaves nothing, and a build that fails half way is rolled back.

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

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
    columns_follow_rows(&check);
    let (ok, status) = trellis(&["lab", "status", name]);
    assert!(ok, "{status}");
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    assert_nothing_left(name);
    status
}

/// The check matrix lists its columns in the order of its rows (issue 13.5: the first pod's
/// column used to come last).
fn columns_follow_rows(check: &str) {
    let mut lines = check.lines();
    let header = lines.next().unwrap_or_default();
    let columns: Vec<&str> = header
        .strip_prefix("FROM \\ TO")
        .unwrap_or_else(|| panic!("no matrix header:\n{check}"))
        .split_whitespace()
        .collect();
    let rows: Vec<&str> = lines
        .take_while(|l| l.split_whitespace().count() == columns.len() + 1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(!rows.is_empty(), "no rows:\n{check}");
    let shared: Vec<&str> = columns
        .iter()
        .copied()
        .filter(|c| rows.contains(c))
        .collect();
    let row_order: Vec<&str> = rows
        .iter()
        .copied()
        .filter(|r| columns.contains(r))
        .collect();
    assert_eq!(
        shared, row_order,
        "columns in another order than rows:\n{check}"
    );
}

/// Processes whose command line names the lab's directory (agents, etcd, daemons).
fn lab_processes(name: &str) -> Vec<String> {
    let needle = format!("/run/trellis/lab/{name}/");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&needle)
                .then(|| format!("{}: {cmd}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// No namespace, process or directory of lab `name` remains.
fn assert_nothing_left(name: &str) {
    let listed = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    let left: Vec<&str> = listed
        .lines()
        .filter(|l| l.starts_with(&format!("tl-{name}-")))
        .collect();
    assert!(
        left.is_empty(),
        "namespaces of {name} left behind: {left:?}"
    );
    let procs = lab_processes(name);
    assert!(
        procs.is_empty(),
        "processes of {name} left behind: {procs:?}"
    );
    let dir = format!("/run/trellis/lab/{name}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
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

/// A topology with `LABNAME` for the lab's name, the pieces a case changes spliced in.
fn topology(name: &str, pools: &str, subnets: &str, rest: &str) -> String {
    format!("name: {name}\npools: {pools}\nsubnets: {subnets}\n{rest}")
}

const POOL: &str = "[{name: pods, cidr: 10.239.0.0/16, encapsulation: None}]";
const SUBNET: &str = "[{name: rack1, cidr: 192.168.79.0/24}]";
const NODES: &str = "nodes: [{name: n1, subnet: rack1}, {name: n2, subnet: rack1}]\n";

/// Every kind of bad topology (issue 15.10 and more): `trellis lab up` fails, the error names
/// the member and field, and nothing of the lab exists afterwards — no namespace, no process,
/// no directory.
#[test]
fn rejected_topologies_leave_nothing() {
    let many = |n: usize, f: &dyn Fn(usize) -> String| (0..n).map(f).collect::<Vec<_>>().join(", ");
    #[rustfmt::skip]
    let cases: Vec<(&str, String, &str)> = vec![
        ("blockSize", topology("LABNAME", "[{name: pods, cidr: 10.239.0.0/16, blockSize: 40}]", SUBNET, NODES), "pools[0].blockSize: 40 is outside"),
        ("encapsulation", topology("LABNAME", "[{name: pods, cidr: 10.239.0.0/16, encapsulation: GRE}]", SUBNET, NODES), "pools[0].encapsulation \"GRE\": must be"),
        ("pool name", topology("LABNAME", "[{name: Pods, cidr: 10.239.0.0/16}]", SUBNET, NODES), "pools[0].name: \"Pods\" must be lower case"),
        ("pool name with a newline", topology("LABNAME", "[{name: \"pods\\nkind: BGPPeer\", cidr: 10.239.0.0/16}]", SUBNET, NODES), "pools[0].name: \"pods\\nkind: BGPPeer\" may hold only"),
        ("pool names twice", topology("LABNAME", "[{name: p, cidr: 10.239.0.0/16}, {name: p, cidr: 10.238.0.0/16}]", SUBNET, NODES), "pools[1].name \"p\": already used by pools[0]"),
        ("pools overlap", topology("LABNAME", "[{name: p, cidr: 10.239.0.0/16}, {name: q, cidr: 10.239.128.0/17}]", SUBNET, NODES), "pools[1].cidr: 10.239.128.0/17 overlaps pool p"),
        ("pool overlaps a subnet", topology("LABNAME", "[{name: p, cidr: 192.168.79.128/25}]", SUBNET, NODES), "pools[0].cidr 192.168.79.128/25: overlaps subnets[0]"),
        ("pool selector", topology("LABNAME", "[{name: p, cidr: 10.239.0.0/16, nodeSelector: \"a ==\"}]", SUBNET, NODES), "pools[0].nodeSelector \"a ==\":"),
        ("no pool for a node", topology("LABNAME", "[{name: p, cidr: 10.239.0.0/16, nodeSelector: \"rack == 'b'\"}]", SUBNET, &format!("{NODES}pods: [{{name: a, node: n2}}]\n")), "nodes[1] \"n2\": has pods, but no pool's nodeSelector selects it"),
        ("pool exhausted", topology("LABNAME", "[{name: p, cidr: 10.239.0.0/30, blockSize: 30, encapsulation: None}]", SUBNET, &format!("{NODES}pods: [{}]\n", many(5, &|i| format!("{{name: p{i}, node: n1}}")))), "pools: 5 pod and VXLAN tunnel addresses are needed, but the pools the nodes use hold 4"),
        ("node named fabric", topology("LABNAME", POOL, SUBNET, "nodes: [{name: fabric, subnet: rack1}]\n"), "nodes[0].name \"fabric\": reserved"),
        ("node named control", topology("LABNAME", POOL, SUBNET, "nodes: [{name: control, subnet: rack1}]\n"), "nodes[0].name \"control\": reserved"),
        ("pod named router", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{{name: a, node: n1}}, {{name: b, node: n1}}, {{name: c, node: n2}}, {{name: router, node: n2}}]\n")), "pods[3].name \"router\": reserved"),
        ("external named etcd", topology("LABNAME", POOL, SUBNET, &format!("{NODES}external: [{{name: etcd, subnet: rack1}}]\n")), "external[0].name \"etcd\": reserved"),
        ("a pod named like a node", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{{name: n2, node: n1}}]\n")), "pods[0].name \"n2\": already used by nodes[1]"),
        ("member name too long", topology("LABNAME", POOL, SUBNET, "nodes: [{name: abcdefghijklmnopqrstu, subnet: rack1}]\n"), "nodes[0].name \"abcdefghijklmnopqrstu\": must be 1-20 characters"),
        ("member name with a slash", topology("LABNAME", POOL, SUBNET, "nodes: [{name: a/b, subnet: rack1}]\n"), "nodes[0].name \"a/b\": may hold only"),
        ("external host in a /26", topology("LABNAME", POOL, "[{name: rack1, cidr: 192.168.79.0/26}]", &format!("{NODES}external: [{{name: out, subnet: rack1}}]\n")), "external[0] \"out\": subnet rack1 (192.168.79.0/26) has no address .100"),
        ("subnet names twice", topology("LABNAME", POOL, "[{name: rack1, cidr: 192.168.79.0/24}, {name: rack1, cidr: 192.168.78.0/24}]", NODES), "subnets[1].name \"rack1\": already used by subnets[0]"),
        ("subnet with host bits", topology("LABNAME", POOL, "[{name: rack1, cidr: 192.168.79.5/24}]", NODES), "subnets[0].cidr 192.168.79.5/24: has host bits set"),
        ("subnets overlap", topology("LABNAME", POOL, "[{name: rack1, cidr: 192.168.79.0/24}, {name: rack2, cidr: 192.168.79.128/25}]", NODES), "subnets[1].cidr 192.168.79.128/25: overlaps subnets[0]"),
        ("IPv6 subnet", topology("LABNAME", POOL, "[{name: rack1, cidr: \"fd00::/64\"}]", NODES), "subnets[0].cidr fd00::/64: the lab's nodes need IPv4 subnets"),
        ("loopback subnet", topology("LABNAME", POOL, "[{name: rack1, cidr: 127.1.0.0/24}]", NODES), "subnets[0].cidr 127.1.0.0/24: overlaps the loopback range"),
        ("too many pods", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{}]\n", many(251, &|i| format!("{{name: p{i}, node: n1}}")))), "pods: 251 entries; a lab has at most 250"),
        ("too many nodes", topology("LABNAME", POOL, SUBNET, &format!("nodes: [{}]\n", many(51, &|i| format!("{{name: n{i}, subnet: rack1}}")))), "nodes: 51 entries; a lab has at most 50"),
        ("pod namespace into CNI_ARGS", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{{name: a, node: n1, namespace: \"x;K8S_POD_NAME=y\"}}]\n")), "pods[0].namespace \"x;K8S_POD_NAME=y\": may hold only"),
        ("label key", topology("LABNAME", POOL, SUBNET, "nodes: [{name: n1, subnet: rack1, labels: {\"a=b\": c}}]\n"), "nodes[0].labels \"a=b\": not a label key"),
        ("via a pod", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{{name: a, node: n1}}]\nexternal: [{{name: out, subnet: rack1, via: a}}]\n")), "external[0].via \"a\": must be a node or another external host on subnet rack1"),
        ("expect a node", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{{name: a, node: n1}}]\nexpect: [{{from: a, to: n1}}]\n")), "expect[0].to \"n1\": not a pod or external host"),
        ("seenAs towards a pod", topology("LABNAME", POOL, SUBNET, &format!("{NODES}pods: [{{name: a, node: n1}}, {{name: b, node: n2}}]\nexpect: [{{from: a, to: b, seenAs: node}}]\n")), "expect[0].seenAs \"node\": applies from a pod to an external host"),
        ("daemon", topology("LABNAME", POOL, SUBNET, &format!("{NODES}external: [{{name: tor, subnet: rack1, bgp: {{daemon: quagga, asNumber: 65001, peers: [n1]}}}}]\n")), "external[0].bgp.daemon \"quagga\": must be one of bird, gobgp, frr"),
        ("daemon password", topology("LABNAME", POOL, SUBNET, &format!("{NODES}external: [{{name: tor, subnet: rack1, bgp: {{daemon: bird, asNumber: 65001, peers: [n1], password: 'a\"; }}'}}}}]\n")), "external[0].bgp.password: must be 1-80 printable ASCII"),
        ("peer twice", topology("LABNAME", POOL, SUBNET, &format!("{NODES}external: [{{name: tor, subnet: rack1, bgp: {{daemon: bird, asNumber: 65001, peers: [n1, n1]}}}}]\n")), "external[0].bgp.peers[1] \"n1\": listed twice"),
        ("cluster AS", topology("LABNAME", POOL, SUBNET, &format!("bgp: {{asNumber: 23456}}\n{NODES}")), "bgp.asNumber: 23456 is not a usable AS number"),
        ("route reflector ID", topology("LABNAME", POOL, SUBNET, "nodes: [{name: n1, subnet: rack1, routeReflectorClusterID: rr1}]\n"), "nodes[0].routeReflectorClusterID \"rr1\": must be an IPv4 address"),
        ("bad resource", topology("LABNAME", POOL, SUBNET, &format!("{NODES}resources: \"apiVersion: trellis.dev/v1\\nkind: BGPPeer\\nmetadata: {{name: x}}\\nspec: {{peerIP: nope, asNumber: 65001}}\\n\"\n")), "resources: document 1 (BGPPeer/x): spec.peerIP:"),
        ("resource redefines a pool", topology("LABNAME", POOL, SUBNET, &format!("{NODES}resources: \"apiVersion: trellis.dev/v1\\nkind: IPPool\\nmetadata: {{name: pods}}\\nspec: {{cidr: 10.238.0.0/16}}\\n\"\n")), "resources document 1: IPPool/pods is already made by pools[0]"),
        ("datastore", topology("LABNAME", POOL, SUBNET, &format!("datastore: mysql\n{NODES}")), "datastore \"mysql\": must be embedded or etcd"),
        ("unknown field", topology("LABNAME", POOL, SUBNET, &format!("{NODES}bogus: 1\n")), "unknown field `bogus`"),
    ];
    for (i, (what, yaml, want)) in cases.iter().enumerate() {
        let name = format!("trej{i}");
        let _guard = LabGuard(name.clone());
        let path = std::env::temp_dir().join(format!("trellis-test-{name}.yaml"));
        std::fs::write(&path, yaml.replace("LABNAME", &name)).unwrap();
        let (ok, out) = trellis(&["lab", "up", "-f", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert!(!ok, "{what}: lab up succeeded:\n{out}");
        assert!(
            out.contains(want),
            "{what}: the error should say {want:?}:\n{out}"
        );
        assert_nothing_left(&name);
    }
    // A bad lab name, given on the command line.
    let (ok, out) = trellis(&["lab", "up", "--name", "Bad_Name"]);
    assert!(
        !ok && out.contains("name \"Bad_Name\": may hold only"),
        "{out}"
    );
    assert_nothing_left("Bad_Name");
}

/// A build that fails half way (here every pod address is reserved, so CNI ADD fails after the
/// fabric, the nodes and their agents exist) names the member and step, and removes
/// everything it made.
#[test]
fn a_failed_build_is_rolled_back() {
    let name = "trollb";
    let _guard = LabGuard(name.into());
    let yaml = topology(
        name,
        POOL,
        SUBNET,
        &format!("{NODES}pods: [{{name: a, node: n1}}]\nresources: \"apiVersion: trellis.dev/v1\\nkind: IPReservation\\nmetadata: {{name: all}}\\nspec: {{reservedCIDRs: [10.239.0.0/16]}}\\n\"\n"),
    );
    let path = std::env::temp_dir().join(format!("trellis-test-{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let (ok, out) = trellis(&["lab", "up", "-f", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    assert!(!ok, "{out}");
    assert!(
        out.contains("n1: agent started") && out.contains("n2: agent started"),
        "the agents ran before the failure:\n{out}"
    );
    assert!(
        out.contains("a: add the pod on n1 through CNI: "),
        "member and step named:\n{out}"
    );
    assert!(
        out.contains("everything the lab had made was removed"),
        "{out}"
    );
    assert!(
        !out.contains("nsenter") && !out.contains("\"ip\""),
        "no raw command line:\n{out}"
    );
    assert_nothing_left(name);
}

/// A program the lab needs and cannot find is reported before anything is made.
#[test]
fn a_missing_program_is_found_before_anything_is_made() {
    let name = "tnobird";
    let _guard = LabGuard(name.into());
    // A PATH with what the lab needs except bird.
    let bin = std::env::temp_dir().join(format!("trellis-test-{name}-bin"));
    std::fs::create_dir_all(&bin).unwrap();
    for p in ["ip", "nsenter", "sysctl"] {
        let which = Command::new("sh")
            .args(["-c", &format!("command -v {p}")])
            .output()
            .unwrap();
        let target = String::from_utf8_lossy(&which.stdout).trim().to_string();
        let link = bin.join(p);
        if !link.exists() {
            std::os::unix::fs::symlink(target, link).unwrap();
        }
    }
    let yaml = topology(
        name,
        POOL,
        SUBNET,
        &format!("{NODES}external: [{{name: tor, subnet: rack1, bgp: {{daemon: bird, asNumber: 65001, peers: [n1]}}}}]\n"),
    );
    let path = std::env::temp_dir().join(format!("trellis-test-{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(common::bin("trellis"))
        .args(["lab", "up", "-f", path.to_str().unwrap()])
        .env("PATH", &bin)
        .output()
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_dir_all(&bin).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("tor: start bird (AS 65001): bird is not installed"),
        "{err}"
    );
    assert_nothing_left(name);
}

/// Kills its children when the test ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // Already gone is fine: this only makes sure none outlives the test.
            if c.kill().is_ok() {
                c.wait().ok();
            }
        }
    }
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// Waits until `c` has exited.
fn exited(c: &mut Child, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if c.try_wait().unwrap().is_some() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `down` kills a recorded PID only while it is still the lab's process (issue 9.10): an
/// unrelated process holding a recorded PID — with another start time, or recorded bare by an
/// older Trellis and running outside the lab's namespaces — lives on; the lab's own processes
/// (recorded with their start time, or running in its namespaces) are killed.
#[test]
fn down_spares_a_process_that_reuses_a_recorded_pid() {
    let name = "tspare";
    let _guard = LabGuard(name.into());
    let sleep = |ns: Option<&str>| match ns {
        Some(ns) => Command::new("nsenter")
            .args([&format!("--net=/var/run/netns/{ns}"), "sleep", "60"])
            .spawn()
            .unwrap(),
        None => Command::new("sleep").arg("60").spawn().unwrap(),
    };
    let ns = format!("tl-{name}-node1");
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let mut kids = Children(vec![sleep(None), sleep(None), sleep(Some(&ns))]);
    let (stranger, ours) = (kids.0[0].id(), kids.0[1].id());
    let state = serde_json::json!({
        "name": name, "datastore": "", "namespaces": {"node1": ns},
        "pids": [
            stranger,
            {"member": "node1", "what": "agent", "pid": stranger, "start_time": start_time(stranger) - 1},
            {"member": "node2", "what": "agent", "pid": ours, "start_time": start_time(ours)},
        ],
        "node_ips": {}, "pod_ips": {}, "pod_nodes": {}, "external_ips": {},
    });
    std::fs::create_dir_all(format!("/run/trellis/lab/{name}")).unwrap();
    std::fs::write(
        format!("/run/trellis/lab/{name}/state.json"),
        state.to_string(),
    )
    .unwrap();
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "pid {stranger} (node1 agent) belongs to another process now"
        )),
        "{out}"
    );
    assert!(exited(&mut kids.0[1], 5), "the recorded process was killed");
    assert!(
        exited(&mut kids.0[2], 5),
        "the process in the lab's namespace was killed"
    );
    assert!(
        kids.0[0].try_wait().unwrap().is_none(),
        "the unrelated process holding a recorded PID lives"
    );
    assert_nothing_left(name);
}

/// Whether `trellis_resources` knows the policy kinds yet (issue 10's resources work adds
/// them); until then a topology's `policies:` cannot validate.
fn policy_kinds_known() -> bool {
    trellis_resources::parse_documents(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n",
    )
    .is_ok()
}

/// `examples/lab/policy.yaml` under another name; without its policies while the policy kinds
/// do not exist, and with none when `with_policies` is false.
fn policy_example(name: &str, with_policies: bool) -> std::path::PathBuf {
    example_as("policy", name, with_policies)
}

/// `examples/lab/FILE.yaml` under another name (see [`policy_example`]).
fn example_as(file: &str, name: &str, with_policies: bool) -> std::path::PathBuf {
    let path = format!(
        "{}/../../examples/lab/{file}.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut t = trellis_lab::topology::decode(&std::fs::read_to_string(path).unwrap()).unwrap();
    t.name = name.to_string();
    if !with_policies || !policy_kinds_known() {
        eprintln!("examples/lab/{file}.yaml: brought up without its policies");
        t.policies = None;
    }
    let file = std::env::temp_dir().join(format!("trellis-test-{name}.yaml"));
    std::fs::write(&file, serde_norway::to_string(&t).unwrap()).unwrap();
    file
}

/// The WorkloadEndpoints of the example's namespaces x, y and z, read with `trellis get` run
/// by `cli`.
fn example_endpoints(cli: impl Fn(&[&str]) -> (bool, String)) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    for ns in ["x", "y", "z"] {
        let (ok, out) = cli(&["get", "workloadendpoints", "-n", ns, "-o", "json"]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        all.extend(v["items"].as_array().unwrap().iter().cloned());
    }
    all
}

/// The all-reachable table over the example's nine pods, from `extra` sources too.
fn all_reachable(extra: &[&str]) -> String {
    use trellis_policy::conformance::{Cell, TruthTable};
    let pods: Vec<String> = ["x", "y", "z"]
        .iter()
        .flat_map(|ns| ["a", "b", "c"].map(|p| format!("{ns}/{p}")))
        .collect();
    let rows = pods
        .iter()
        .cloned()
        .chain(extra.iter().map(|e| e.to_string()))
        .collect();
    let mut t = TruthTable::new(rows, pods.clone(), Cell::Reach);
    for p in &pods {
        t.set(p, p, Cell::Skip);
    }
    t.render()
}

/// `trellis lab probe`, repeated until it matches `expect` or `secs` have gone by (routes across
/// nodes converge asynchronously after `up`); the last answer.
fn probe_until(lab: &str, args: &[&str], expect: &str, secs: u64) -> (bool, String) {
    let file =
        std::env::temp_dir().join(format!("trellis-test-{lab}-{}.expect", std::process::id()));
    std::fs::write(&file, expect).unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut argv = vec!["lab", "probe", lab, "--expect", file.to_str().unwrap()];
    argv.extend_from_slice(args);
    let result = loop {
        let (ok, out) = trellis(&argv);
        if ok || Instant::now() >= deadline {
            break (ok, out);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    std::fs::remove_file(&file).unwrap();
    result
}

/// The policy example: pods in namespaces x, y, z (the Kubernetes e2e model) with their labels
/// on their WorkloadEndpoints, a server per pod answering with its name on TCP and UDP 80 and
/// 81, and `lab probe`'s truth table: every pair reached (brought up without its policies) on TCP,
/// UDP and ICMP; a port dropped inside one pod shows as `.` in its column; `--expect` fails on
/// a difference and names the cell; a wrong pod answering is an error, not a reached pod;
/// `down` stops the servers.
#[test]
fn policy_example_serves_and_probes() {
    let name = "tpolicy";
    let _guard = LabGuard(name.into());
    let file = policy_example(name, false);
    let (ok, out) = trellis(&["lab", "up", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(ok, "{out}");
    assert!(out.contains("x-a: server started"), "{out}");

    // What the lab wrote on the endpoints: namespace and pod from CNI, labels after ADD.
    let db = format!("sqlite:/run/trellis/lab/{name}/trellis.db");
    let items = example_endpoints(|args| {
        let mut argv = vec!["--datastore", db.as_str()];
        argv.extend_from_slice(args);
        trellis(&argv)
    });
    assert_eq!(items.len(), 9, "{items:?}");
    let ya = items
        .iter()
        .find(|w| w["metadata"]["namespace"] == "y" && w["spec"]["pod"] == "a")
        .unwrap_or_else(|| panic!("no endpoint for y/a: {items:?}"));
    assert_eq!(ya["metadata"]["labels"]["pod"], "a", "{ya}");

    let all = all_reachable(&[]);
    for args in [
        &["--port", "80"][..],
        &["--port", "81", "--protocol", "udp"][..],
        &["--protocol", "icmp"][..],
    ] {
        let (ok, out) = probe_until(name, args, &all, 30);
        assert!(ok, "probe {args:?}:\n{out}");
        columns_follow_rows(&out);
        assert!(out.contains("the table matches"), "{out}");
    }
    // The external host as an extra source.
    let (ok, out) = probe_until(
        name,
        &["--port", "81", "--externals"],
        &all_reachable(&["outside"]),
        10,
    );
    assert!(ok && out.contains("\noutside     ok    ok"), "{out}");

    // TCP 80 dropped inside x/b (its own namespace): x/b's column is blocked, nothing else.
    for cmd in [
        "add table inet tdrop",
        "add chain inet tdrop in { type filter hook input priority 0 ; }",
        "add rule inet tdrop in tcp dport 80 drop",
    ] {
        let (ok, out) = trellis(&["lab", "exec", name, "x-b", "--", "nft", cmd]);
        assert!(ok, "nft {cmd}: {out}");
    }
    let (ok, out) = trellis(&["lab", "probe", name, "--port", "80", "--timeout-ms", "500"]);
    assert!(ok, "without --expect a probe exits 0: {out}");
    let table = trellis_policy::conformance::TruthTable::parse(&out).unwrap();
    for (from, to, cell) in table.cells() {
        let want = match (from == to, to == "x/b") {
            (true, _) => trellis_policy::conformance::Cell::Skip,
            (false, true) => trellis_policy::conformance::Cell::Blocked,
            (false, false) => trellis_policy::conformance::Cell::Reach,
        };
        assert_eq!(cell, want, "{from} -> {to}:\n{out}");
    }
    let (ok, out) = probe_until(name, &["--port", "80", "--timeout-ms", "500"], &all, 0);
    assert!(!ok, "--expect must fail on a difference:\n{out}");
    assert!(
        out.contains("x/a -> x/b: expected ok, got .") && out.contains("8 cell(s) differ"),
        "{out}"
    );
    // UDP on the same port still passes: the drop is TCP only.
    let (ok, out) = probe_until(name, &["--port", "80", "--protocol", "udp"], &all, 0);
    assert!(ok, "{out}");

    // A wrong pod answering (x/c's address given as y/a's) is an error, not a reached pod.
    let state = trellis_lab::State::load(name).unwrap();
    let target = format!("{}=y/a", state.pod_ips["x-c"]);
    let (ok, out) = trellis(&[
        "lab",
        "exec",
        name,
        "x-a",
        "--",
        common::bin("trellis").to_str().unwrap(),
        "lab",
        "connect",
        "--protocol",
        "tcp",
        "--port",
        "81",
        &target,
    ]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "y/a\terror\tanswered by \"x/c\", not y/a");

    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    assert_nothing_left(name);
}

/// Probe input is checked before anything is sent.
#[test]
fn probe_refuses_bad_input() {
    for (args, want) in [
        (
            &["lab", "probe", "tnolab", "--port", "80"][..],
            "lab \"tnolab\" is not up",
        ),
        (
            &[
                "lab",
                "connect",
                "--protocol",
                "tcp",
                "--port",
                "80",
                "10.0.0.1",
            ][..],
            "expected ADDRESS=NAME",
        ),
        (
            &[
                "lab",
                "connect",
                "--protocol",
                "tcp",
                "--port",
                "80",
                "--timeout-ms",
                "0",
                "10.0.0.1=a",
            ][..],
            "--timeout-ms 0: must be 1-10000",
        ),
    ] {
        let (ok, out) = trellis(args);
        assert!(!ok && out.contains(want), "{args:?}: {out}");
    }
    let bad = std::env::temp_dir().join("trellis-test-bad.expect");
    std::fs::write(&bad, "FROM \\ TO a b\na ok\n").unwrap();
    let (ok, out) = trellis(&[
        "lab",
        "probe",
        "tnolab",
        "--port",
        "80",
        "--expect",
        bad.to_str().unwrap(),
    ]);
    std::fs::remove_file(&bad).unwrap();
    assert!(
        !ok && out.contains("truth table line 2: 1 cells for 2 columns"),
        "{out}"
    );
}

/// The example with its policies, with flow logs on: the agents enforce them, `lab probe`
/// shows the README's table (x isolated except x/a from y on the named port, the c pods kept
/// out of y), and `trellis flows` shows the probes' connections with the policy rule that
/// decided each, on the node that decided.
#[test]
fn policy_example_enforces_its_policies() {
    let name = "tpolicyp";
    let _guard = LabGuard(name.into());
    let file = policy_example(name, true);
    let mut t = trellis_lab::topology::decode(&std::fs::read_to_string(&file).unwrap()).unwrap();
    t.flow_logs = true;
    std::fs::write(&file, serde_norway::to_string(&t).unwrap()).unwrap();
    let (ok, out) = trellis(&["lab", "up", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(ok, "{out}");
    let want = "FROM \\ TO   x/a   x/b   x/c   y/a   y/b   y/c   z/a   z/b   z/c
x/a         -     .     .     ok    ok    ok    ok    ok    ok
x/b         .     -     .     ok    ok    ok    ok    ok    ok
x/c         .     .     -     .     .     .     ok    ok    ok
y/a         ok    .     .     -     ok    ok    ok    ok    ok
y/b         ok    .     .     ok    -     ok    ok    ok    ok
y/c         ok    .     .     .     .     -     ok    ok    ok
z/a         .     .     .     ok    ok    ok    -     ok    ok
z/b         .     .     .     ok    ok    ok    ok    -     ok
z/c         .     .     .     .     .     .     ok    ok    -
";
    let (ok, out) = probe_until(name, &["--port", "80"], want, 30);
    assert!(ok, "{out}");
    // (source, destination, node that decided, verdict, policy, direction, rule)
    let expected = [
        (
            "x/c",
            "y/a",
            "node2",
            "denied",
            "gnp/no-c-to-y",
            "ingress",
            "0",
        ),
        (
            "z/a",
            "x/b",
            "node2",
            "denied",
            "tier/default",
            "ingress",
            "default",
        ),
        (
            "y/b",
            "x/a",
            "node1",
            "allowed",
            "knp/x/a-from-y",
            "ingress",
            "0",
        ),
        (
            "x/a",
            "y/b",
            "node3",
            "allowed",
            "gnp/no-c-to-y",
            "ingress",
            "1",
        ),
    ];
    let flows = wait_for_flows(name, &expected, 30);
    // Every denied record is a pair the table shows as denied, and names a Deny.
    for r in flows.iter().filter(|r| r["verdict"] == "denied") {
        let policy = r["policy"].as_str().unwrap();
        assert!(
            policy == "gnp/no-c-to-y" || policy == "tier/default",
            "a denial by {policy}: {r}"
        );
    }
    let (ok, out) = trellis(&[
        "flows",
        "--lab",
        name,
        "--verdict",
        "denied",
        "--namespace",
        "y",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("x/c") && out.contains("gnp/no-c-to-y ingress 0") && !out.contains("allowed"),
        "{out}"
    );
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    assert_nothing_left(name);
}

/// `trellis flows --lab LAB -o json` until it holds a record for each of `expected` (source,
/// destination, node, verdict, policy, direction, rule; port 80 TCP), or `secs` pass; its
/// records.
fn wait_for_flows(
    lab: &str,
    expected: &[(&str, &str, &str, &str, &str, &str, &str)],
    secs: u64,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (ok, out) = trellis(&["flows", "--lab", lab, "-o", "json"]);
        assert!(ok, "{out}");
        let records: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let peer = |v: &serde_json::Value| {
            format!(
                "{}/{}",
                v["namespace"].as_str().unwrap_or("?"),
                v["name"].as_str().unwrap_or("?")
            )
        };
        let missing: Vec<_> = expected
            .iter()
            .filter(|(src, dst, node, verdict, policy, dir, rule)| {
                !records.iter().any(|r| {
                    peer(&r["source"]) == *src
                        && peer(&r["destination"]) == *dst
                        && r["node"] == *node
                        && r["verdict"] == *verdict
                        && r["policy"] == *policy
                        && r["direction"] == *dir
                        && r["rule"] == *rule
                        && r["port"] == 80
                        && r["protocol"] == 6
                })
            })
            .collect();
        if missing.is_empty() {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "flow records missing: {missing:?}\nrecords:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The truth table `examples/lab/admin-policy.yaml` shows in its header comment.
fn admin_policy_table() -> String {
    let text = std::fs::read_to_string(format!(
        "{}/../../examples/lab/admin-policy.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("#   FROM"))
        .take_while(|l| l.starts_with("#   "))
        .map(|l| &l[4..])
        .collect();
    assert_eq!(rows.len(), 10, "{text}");
    rows.join("\n") + "\n"
}

/// `examples/lab/admin-policy.yaml`: ClusterNetworkPolicies in the Admin tier (a Deny that the
/// namespace's allow-all NetworkPolicy cannot override, a Pass to NetworkPolicy) and the
/// Baseline tier (a default for pods no NetworkPolicy isolates) give, with real traffic, the
/// table in the example's header; `policy trace` names the deciding tier.
#[test]
fn admin_policy_example_enforces_its_policies() {
    let name = "tadminp";
    let _guard = LabGuard(name.into());
    let file = example_as("admin-policy", name, true);
    let (ok, out) = trellis(&["lab", "up", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    assert!(ok, "{out}");
    let want = admin_policy_table();
    for args in [
        &["--port", "80"][..],
        &["--port", "81", "--protocol", "udp"][..],
    ] {
        let (ok, out) = probe_until(name, args, &want, 30);
        assert!(ok, "probe {args:?}:\n{out}");
    }
    for (src, dst, tier, verdict) in [
        (
            "z/a",
            "x/a",
            "tier admin",
            "denied by ingress rule 0 (Deny) of cnp/no-z-to-x",
        ),
        (
            "x/a",
            "y/a",
            "tier admin",
            "allowed by ingress rule 0 (Allow) of knp/y/a-from-x",
        ),
        (
            "x/a",
            "z/a",
            "tier baseline",
            "denied by ingress rule 0 (Deny) of cnp/default",
        ),
    ] {
        let (_, out) = trellis(&["--lab", name, "policy", "trace", src, dst, "--port", "80"]);
        assert!(
            out.contains(tier) && out.contains(verdict),
            "{src} -> {dst}:\n{out}"
        );
    }
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    assert_nothing_left(name);
}

/// With etcd (in the lab's control namespace) the endpoints get their labels too — the lab
/// writes them from a thread inside that namespace — and every pair is reached.
#[test]
fn policy_example_on_etcd() {
    let name = "tpolicye";
    let _guard = LabGuard(name.into());
    let file = policy_example(name, false);
    let (ok, out) = trellis(&[
        "lab",
        "up",
        "-f",
        file.to_str().unwrap(),
        "--datastore-kind",
        "etcd",
    ]);
    std::fs::remove_file(&file).unwrap();
    assert!(ok, "{out}");
    let state = trellis_lab::State::load(name).unwrap();
    assert!(state.datastore.starts_with("etcd:"), "{}", state.datastore);
    let trellis_bin = common::bin("trellis");
    let items = example_endpoints(|args| {
        let mut argv = vec![
            "lab",
            "exec",
            name,
            "control",
            "--",
            trellis_bin.to_str().unwrap(),
            "--datastore",
            &state.datastore,
        ];
        argv.extend_from_slice(args);
        trellis(&argv)
    });
    let labelled = items
        .iter()
        .filter(|w| w["metadata"]["labels"]["pod"] == w["spec"]["pod"])
        .count();
    assert_eq!(labelled, 9, "{items:?}");
    let (ok, out) = probe_until(name, &["--port", "80"], &all_reachable(&[]), 30);
    assert!(ok, "{out}");
    let (ok, out) = trellis(&["lab", "down", name]);
    assert!(ok, "{out}");
    assert_nothing_left(name);
}
