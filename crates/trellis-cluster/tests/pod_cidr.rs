//! `--use-pod-cidr` (Flannel-style IPAM, Calico's `USE_POD_CIDR`) against both datastores: each
//! node's block is exactly its podCIDR, nothing is borrowed when it is full, and a podCIDR
//! outside every pool or overlapping another node's block is refused with nothing created.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{apply, pool_yaml, req};
use ipnet::IpNet;
use trellis_cluster::ipam::NodeIpam;
use trellis_cluster::{objects, ClusterError};
use trellis_ipam::cluster::{block_node, ClusterIpamError};
use trellis_store::Datastore;

fn node_with(name: &str, pod_cidr: Option<&str>) -> String {
    let spec = pod_cidr.map_or("{}".to_string(), |c| format!("{{podCIDRs: ['{c}']}}"));
    format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: {name}\nspec: {spec}\n")
}

fn ipam(s: &Arc<dyn Datastore>, node: &str) -> NodeIpam {
    NodeIpam::new(s.clone(), node, BTreeMap::new()).with_pod_cidr_blocks(true)
}

async fn blocks(s: &dyn Datastore) -> BTreeMap<IpNet, Option<String>> {
    objects::blocks(s)
        .await
        .unwrap()
        .into_iter()
        .map(|(b, _)| (b.spec.cidr, block_node(&b.spec).map(str::to_string)))
        .collect()
}

fn ipam_err(r: Result<Vec<(std::net::IpAddr, IpNet)>, ClusterError>) -> ClusterIpamError {
    match r {
        Err(ClusterError::Ipam(e)) => e,
        other => panic!("expected an IPAM error, got {other:?}"),
    }
}

async fn pod_cidr_blocks(s: Arc<dyn Datastore>) {
    // blockSize 26: without the mode, nodes would claim /26 blocks anywhere in the pool.
    apply(&*s, &pool_yaml("pool", "10.244.0.0/16", 26)).await;
    let n1_cidr: IpNet = "10.244.0.0/24".parse().unwrap();
    let n2_cidr: IpNet = "10.244.1.0/24".parse().unwrap();
    apply(&*s, &node_with("n1", Some("10.244.0.0/24"))).await;
    apply(&*s, &node_with("n2", Some("10.244.1.0/24"))).await;
    let (n1, n2) = (ipam(&s, "n1"), ipam(&s, "n2"));
    for i in 0..3 {
        for (ipam, node, cidr) in [(&n1, "n1", n1_cidr), (&n2, "n2", n2_cidr)] {
            let got = ipam.allocate(&req(node, i)).await.unwrap();
            assert_eq!(got.len(), 1, "{got:?}");
            let (ip, block) = got[0];
            assert_eq!(block, cidr, "{node}: {ip} reported in block {block}");
            assert!(
                cidr.contains(&ip),
                "{node}: {ip} outside its podCIDR {cidr}"
            );
        }
    }
    let want: BTreeMap<IpNet, Option<String>> = [
        (n1_cidr, Some("n1".to_string())),
        (n2_cidr, Some("n2".to_string())),
    ]
    .into();
    assert_eq!(blocks(&*s).await, want, "each node's block is its podCIDR");

    // n1's podCIDR full: the next ADD fails naming it, and nothing is borrowed from n2's.
    for i in 3..256 {
        let got = n1.allocate(&req("n1", i)).await.unwrap();
        assert!(n1_cidr.contains(&got[0].0), "{got:?}");
    }
    let e = ipam_err(n1.allocate(&req("n1", 256)).await);
    assert_eq!(
        e,
        ClusterIpamError::PodCidrExhausted {
            node: "n1".into(),
            pod_cidr: n1_cidr
        }
    );
    assert!(e.to_string().contains("10.244.0.0/24"), "{e}");
    assert_eq!(blocks(&*s).await, want, "no block claimed or borrowed");

    // A node without a podCIDR yet: refused naming it.
    apply(&*s, &node_with("n3", None)).await;
    let e = ipam_err(ipam(&s, "n3").allocate(&req("n3", 0)).await);
    assert_eq!(e, ClusterIpamError::NoPodCidr { node: "n3".into() });
    assert!(e.to_string().contains("n3"), "{e}");

    // Outside every pool: refused naming the podCIDR and the pools; nothing created.
    apply(&*s, &node_with("n4", Some("10.245.0.0/24"))).await;
    let e = ipam_err(ipam(&s, "n4").allocate(&req("n4", 0)).await);
    assert!(
        matches!(&e, ClusterIpamError::PodCidrOutsidePools { node, .. } if node == "n4"),
        "{e}"
    );
    assert!(e.to_string().contains("10.245.0.0/24"), "{e}");
    assert!(e.to_string().contains("10.244.0.0/16"), "{e}");

    // Overlapping n2's block: refused naming both; nothing created.
    apply(&*s, &node_with("n5", Some("10.244.1.128/25"))).await;
    let e = ipam_err(ipam(&s, "n5").allocate(&req("n5", 0)).await);
    assert_eq!(
        e,
        ClusterIpamError::PodCidrOverlaps {
            node: "n5".into(),
            pod_cidr: "10.244.1.128/25".parse().unwrap(),
            block: n2_cidr,
            owner: Some("n2".into()),
        }
    );
    assert!(e.to_string().contains("affine to node n2"), "{e}");
    assert_eq!(blocks(&*s).await, want, "refusals created nothing");
    assert!(
        n1.held(&req("n1", 256)).await.unwrap().is_none(),
        "the failed ADD holds nothing"
    );
}

#[tokio::test]
async fn pod_cidr_blocks_on_sqlite() {
    let (s, _b) = common::sqlite().await;
    pod_cidr_blocks(s).await;
}

#[tokio::test]
async fn pod_cidr_blocks_on_etcd() {
    let (s, _b) = common::etcd().await;
    pod_cidr_blocks(s).await;
}
