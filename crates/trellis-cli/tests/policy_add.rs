//! New pods under policy (routed mode, agent IPAM): ADD returns only once the pod's policy is in
//! the kernel, so a pod its policy allows is reachable the moment ADD returns; while the agent
//! cannot program it, the pod stays closed (`iifname "trl*" drop`) and ADD fails after the
//! bounded wait with a clear error, leaving nothing behind. The agent's nft goes through a
//! wrapper that refuses policy batches while a flag file exists. Run under the integration
//! lock (fixed namespace tags).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{ip_of, reach, serve, Cluster, PORT};
use serde_json::Value;
use trellis_testutil::TestNetns;

/// The address of pod `name`'s WorkloadEndpoint, if it has one.
fn endpoint_ip(c: &Cluster, name: &str) -> Option<String> {
    let out = c.cli_ok(&["get", "workloadendpoints", "-A", "-o", "json"], None);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["items"].as_array()?.iter().find_map(|w| {
        (w["spec"]["pod"] == name)
            .then(|| w["spec"]["ipNetworks"][0].as_str())
            .flatten()
            .map(|n| n.split('/').next().unwrap().to_string())
    })
}

fn trl_links(c: &Cluster) -> usize {
    let out = c.nodes[0].ns.exec_ok(&["ip", "-o", "link", "show"]);
    out.lines().filter(|l| l.contains(": trl")).count()
}

#[test]
fn add_returns_once_the_pods_policy_is_in_force() {
    trellis_testutil::require_root();
    let mut c = Cluster::new("poladd", false, 1);
    let flag = c.dir.path().join("refuse-policy");
    let wrapper = c.dir.path().join("nft-wrapper");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nin=$(cat)\nif [ -e {flag} ] && printf '%s' \"$in\" | grep -q trellis_policy; then echo 'refused by the test' >&2; exit 1; fi\nprintf '%s' \"$in\" | exec nft \"$@\"\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    c.agent_env = vec![("TRELLIS_NFT".into(), wrapper.display().to_string())];
    c.kill_agent(0);
    c.start_agent(0);
    let node = &c.nodes[0].ns;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node
        .exec(&["nft", "list", "table", "inet", "trellis_policy"])
        .status
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the agent did not program its policy table"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (client, client_ip) = c.add_pod(0, "poladdc");
    c.cli_ok(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: only-client, namespace: default}}\n\
             spec: {{podSelector: {{}}, ingress: [{{from: [{{ipBlock: {{cidr: {client_ip}/32}}}}], ports: [{{port: {PORT}}}]}}]}}\n"
        )),
    );

    // Allowed, and reachable the moment ADD returns (one try, no retry).
    let s1 = TestNetns::new("poladds1");
    let _srv1 = serve(&s1, "s1", c.dir.path());
    let out = c.spawn_add(0, "poladds1", &s1).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD s1: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s1_ip = ip_of(&out).unwrap().to_string();
    assert_eq!(
        reach(&client, &s1_ip, "s1"),
        "s1\tok",
        "right after ADD returned"
    );

    // The agent cannot program: ADD waits, the pod stays closed meanwhile, then ADD fails.
    std::fs::write(&flag, "").unwrap();
    let s2 = TestNetns::new("poladds2");
    let _srv2 = serve(&s2, "s2", c.dir.path());
    let mut add = c.spawn_add(0, "poladds2", &s2);
    let mut tries = 0;
    let started = Instant::now();
    while add.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(40),
            "ADD did not end"
        );
        if let Some(ip) = endpoint_ip(&c, "poladds2") {
            assert_eq!(
                reach(&client, &ip, "s2"),
                "s2\tblocked",
                "reached before its policy was programmed"
            );
            tries += 1;
        }
    }
    assert!(tries > 0, "the closed pod was never probed");
    let out = add.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "ADD succeeded without its policy: {text}"
    );
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["code"], 11, "{text}");
    assert!(
        err["msg"]
            .as_str()
            .unwrap()
            .contains("not programmed within"),
        "{text}"
    );
    assert_eq!(
        endpoint_ip(&c, "poladds2"),
        None,
        "the failed ADD left its endpoint"
    );
    assert_eq!(trl_links(&c), 2, "the failed ADD left its interface");

    // Programming works again: the next pod is reachable right after its ADD.
    std::fs::remove_file(&flag).unwrap();
    let s3 = TestNetns::new("poladds3");
    let _srv3 = serve(&s3, "s3", c.dir.path());
    let out = c.spawn_add(0, "poladds3", &s3).wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ADD s3: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s3_ip = ip_of(&out).unwrap().to_string();
    assert_eq!(
        reach(&client, &s3_ip, "s3"),
        "s3\tok",
        "right after ADD returned"
    );
}
