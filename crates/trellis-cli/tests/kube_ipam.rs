//! Calico's IPAM annotations end to end, from the (test double) API server through
//! `trellis kube-controller` and the agents' ADD to packets, on two nodes (VXLAN): a namespace's
//! `ipv4pools` gives its pods their pool unless a pod names its own; a pod's `floatingIPs`
//! (agents with `--allow-floating-ips`) is reached from a pod on the other node and from its own
//! node's host (DNAT in prerouting and output), and after the pod's DEL neither the DNAT nor the
//! other node's route to it is left; a pod's `ipAddrsNoIpam` (agents with
//! `--allow-ip-addrs-no-ipam`) gets its address without IPAM and is reached across nodes. An
//! agent without the flags refuses both annotations with CNI error 7 naming them. Run under the
//! integration-test flock (fixed namespace tags).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{ip_of, reach, serve, Cluster};
use ipnet::IpNet;
use serde_json::{json, Value};
use trellis_kube_testapi::{TestApiServer, NAMESPACES, PODS};
use trellis_resources::Kind;
use trellis_testutil::TestNetns;

const DEADLINE: Duration = Duration::from_secs(30);
const FLOATING: &str = "203.0.113.50";
const NO_IPAM: &str = "10.70.200.7";

/// A controller process, killed and reaped when dropped.
struct Controller(Child);

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pod(name: &str, node: &str, annotations: Value) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
    })
}

fn stored(rt: &tokio::runtime::Runtime, spec: &str, name: &str) -> bool {
    rt.block_on(async {
        let store = trellis_store::open(spec).await.unwrap();
        trellis_cluster::objects::get(&*store, Kind::Pod, Some("default"), name)
            .await
            .unwrap()
            .is_some()
    })
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The cluster's pool (`pool`, 10.70.0.0/16) over VXLAN, and pool `b`.
fn pools() -> &'static str {
    "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: pool}\nspec: {cidr: 10.70.0.0/16, blockSize: 26, encapsulation: VXLAN}\n---\napiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.71.0.0/16, blockSize: 26, encapsulation: VXLAN, natOutgoing: true}\n"
}

fn inside(cidr: &str, ip: std::net::IpAddr) -> bool {
    cidr.parse::<IpNet>().unwrap().contains(&ip)
}

/// ADD of pod `name` on node `i` into `ns`; its address.
fn add(c: &Cluster, i: usize, name: &str, ns: &TestNetns) -> std::net::IpAddr {
    let out = c.spawn_add(i, name, ns).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD {name}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        c.agent_log(i)
    );
    ip_of(&out).unwrap()
}

fn nat_table(ns: &TestNetns) -> String {
    String::from_utf8_lossy(&ns.exec(&["nft", "list", "table", "ip", "trellis"]).stdout)
        .into_owned()
}

#[test]
fn namespace_pools_floating_ips_and_no_ipam_addresses_from_kubernetes() {
    trellis_testutil::require_root();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(TestApiServer::start());
    let c = Cluster::new_with(
        "kfip",
        false,
        2,
        &[
            "--kubernetes",
            "--allow-floating-ips",
            "--allow-ip-addrs-no-ipam",
        ],
    );
    c.cli_ok(&["apply", "-f", "-"], Some(pools()));
    let kubeconfig = c.dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    api.put(
        NAMESPACES,
        json!({"metadata": {"name": "default", "annotations": {"cni.projectcalico.org/ipv4pools": "[\"b\"]"}}}),
    );
    let fip = json!({"cni.projectcalico.org/floatingIPs": format!("[\"{FLOATING}\"]")});
    api.put(PODS, pod("kfipsrv", "node0", fip));
    api.put(
        PODS,
        pod(
            "kfipown",
            "node0",
            json!({"cni.projectcalico.org/ipv4pools": "[\"pool\"]"}),
        ),
    );
    let raw = json!({"cni.projectcalico.org/ipAddrsNoIpam": format!("[\"{NO_IPAM}\"]")});
    api.put(PODS, pod("kfipraw", "node0", raw));
    api.put(PODS, pod("kfipcli", "node1", json!({})));
    let controller = Controller(
        Command::new(common::bin("trellis"))
            .args(["--datastore", &c.spec, "kube-controller", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--lease-duration", "2", "--renew-deadline", "1.4"])
            .args(["--retry-period", "0.2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("trellis kube-controller starts"),
    );
    let names = ["kfipsrv", "kfipown", "kfipraw", "kfipcli"];
    wait_for("the pods' records", || {
        names.iter().all(|p| stored(&rt, &c.spec, p))
    });

    // The namespace's pool, unless the pod names its own.
    let srv = TestNetns::new("kfipsrv");
    let _srv = serve(&srv, "fip", c.dir.path());
    let srv_ip = add(&c, 0, "kfipsrv", &srv);
    assert!(inside("10.71.0.0/16", srv_ip), "namespace pool b: {srv_ip}");
    let own = TestNetns::new("kfipown");
    let own_ip = add(&c, 0, "kfipown", &own);
    assert!(
        inside("10.70.0.0/16", own_ip),
        "the pod's own pool: {own_ip}"
    );
    let raw = TestNetns::new("kfipraw");
    let _raw = serve(&raw, "raw", c.dir.path());
    assert_eq!(add(&c, 0, "kfipraw", &raw).to_string(), NO_IPAM);
    let cli = TestNetns::new("kfipcli");
    let cli_ip = add(&c, 1, "kfipcli", &cli);
    assert!(inside("10.71.0.0/16", cli_ip), "{cli_ip}");

    // The floating address from the other node's pod and from the pod's own node.
    wait_for("node1's route to the floating address", || {
        c.nodes[1]
            .ns
            .exec_ok(&["ip", "route"])
            .contains(&format!("{FLOATING} via"))
    });
    wait_for("the floating address from a pod on node1", || {
        reach(&cli, FLOATING, "fip") == "fip\tok"
    });
    // A host process connects through the node's own route to the address (a node's default
    // route: the kernel needs one before the output hook's DNAT) and reaches the pod.
    c.nodes[0]
        .ns
        .exec_ok(&["ip", "route", "add", "default", "via", "192.0.2.1"]);
    assert_eq!(
        reach(&c.nodes[0].ns, FLOATING, "fip"),
        "fip\tok",
        "from node0's host"
    );
    let table = nat_table(&c.nodes[0].ns);
    assert!(table.contains(&format!("dnat to {srv_ip}")), "{table}");
    // The address given without IPAM, across nodes.
    wait_for("the no-IPAM address from a pod on node1", || {
        reach(&cli, NO_IPAM, "raw") == "raw\tok"
    });
    let blocks = c.cli_ok(&["get", "ipamblocks", "-o", "json"], None);
    assert!(
        !blocks.contains("10.70.200."),
        "allocated in IPAM: {blocks}"
    );
    drop(controller);

    // DEL of the floating pod: its DNAT and the other node's route go.
    let del = c
        .spawn_ipam(0, "DEL", "kfipsrv")
        .wait_with_output()
        .unwrap();
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stdout)
    );
    wait_for("the DNAT to go", || {
        !nat_table(&c.nodes[0].ns).contains(FLOATING)
    });
    wait_for("node1's route to go", || {
        !c.nodes[1].ns.exec_ok(&["ip", "route"]).contains(FLOATING)
    });
    assert_ne!(reach(&cli, FLOATING, "fip"), "fip\tok");
}

#[test]
fn agents_without_the_flags_refuse_the_annotations() {
    trellis_testutil::require_root();
    let c = Cluster::new("kfoff", false, 1);
    c.cli_ok(&["apply", "-f", "-"], Some(pools()));
    for (name, field, value, flag) in [
        ("kfofffip", "floatingIPs", FLOATING, "--allow-floating-ips"),
        (
            "kfoffraw",
            "ipAddrsNoIpam",
            NO_IPAM,
            "--allow-ip-addrs-no-ipam",
        ),
    ] {
        c.cli_ok(
            &["apply", "-f", "-"],
            Some(&format!("apiVersion: trellis.dev/v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec: {{nodeName: node0, {field}: [{value}]}}\n")),
        );
        let ns = TestNetns::new(name);
        let out = c.spawn_add(0, name, &ns).wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "ADD {name} succeeded: {text}");
        let err: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(err["code"], 7, "{text}");
        let msg = err["msg"].as_str().unwrap();
        assert!(
            msg.contains(&format!("cni.projectcalico.org/{field}"))
                && msg.contains(value)
                && msg.contains(flag),
            "{msg}"
        );
        let eps = c.cli_ok(&["get", "workloadendpoints", "-A", "-o", "json"], None);
        assert!(!eps.contains(name), "an endpoint was left: {eps}");
        let handles = c.cli_ok(&["get", "ipamhandles", "-o", "json"], None);
        assert!(
            !handles.contains(name),
            "something was allocated: {handles}"
        );
    }
}
