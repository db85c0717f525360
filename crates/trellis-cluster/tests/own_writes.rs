//! Read-your-writes ([`NodeIpam::with_observer`] into [`ClusterView::apply_own`]) against a real
//! datastore: the view the allocator's writes go into must only ever show a state the store
//! passed through. Here no watch follows the store (as when the watch lags: SQLite's poll), so
//! what the view holds after the listing came only from the allocator's own writes.

mod common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use common::{apply, node_yaml, pool_yaml, req};
use trellis_cluster::ipam::{CommitObserver, NodeIpam};
use trellis_cluster::view::ClusterView;
use trellis_resources::Kind;
use trellis_store::{Datastore, TxnOp};

const KINDS: [Kind; 2] = [Kind::IpamBlock, Kind::WorkloadEndpoint];

struct Observed(Mutex<ClusterView>);

impl CommitObserver for Observed {
    fn committed(&self, revision: i64, writes: &[TxnOp]) {
        self.0.lock().unwrap().apply_own(revision, writes);
    }
}

async fn loaded(store: &dyn Datastore) -> ClusterView {
    let mut v = ClusterView::new(&KINDS);
    for kind in KINDS {
        let listing = store.list(&kind.prefix()).await.unwrap();
        let (_, errors) = v.load(kind, &listing);
        assert!(errors.is_empty(), "{errors:?}");
    }
    v
}

/// Every workload endpoint in the view holding `ip`, by name.
fn holders(v: &ClusterView, ip: IpAddr) -> Vec<String> {
    v.stored(Kind::WorkloadEndpoint)
        .filter_map(|s| match &s.resource {
            trellis_resources::Resource::WorkloadEndpoint(w)
                if w.spec.ip_networks.iter().any(|n| n.addr() == ip) =>
            {
                Some(w.metadata.name.clone())
            }
            _ => None,
        })
        .collect()
}

/// A DEL releases pod 1's address (its endpoint is deleted in the store; the view has not
/// heard yet) and the next ADD is given the same address (the lowest free one). The own write
/// of the ADD must not put the new endpoint into the view beside the deleted one: the store
/// never held both, and the deleted pod's labels would lend the new pod their access (its
/// address stays in every selector set the old labels matched).
async fn an_address_is_never_shown_on_two_endpoints(store: Arc<dyn Datastore>) {
    apply(&*store, &pool_yaml("pool", "10.82.0.0/16", 26)).await;
    apply(&*store, &node_yaml("n1")).await;
    let observed = Arc::new(Observed(Mutex::new(loaded(&*store).await)));
    let ipam = NodeIpam::new(store.clone(), "n1", BTreeMap::new()).with_observer(observed.clone());
    let first = ipam.allocate(&req("n1", 1)).await.unwrap()[0].0;
    assert_eq!(holders(&observed.0.lock().unwrap(), first).len(), 1);
    ipam.release(&req("n1", 1)).await.unwrap();
    let second = ipam.allocate(&req("n1", 2)).await.unwrap()[0].0;
    assert_eq!(
        second, first,
        "the premise: the released address is given again"
    );
    let v = observed.0.lock().unwrap();
    let h = holders(&v, second);
    assert!(
        h.len() <= 1,
        "the view shows {second} on two endpoints at once, a state the store never held: {h:?}"
    );
}

#[tokio::test]
async fn an_address_is_never_shown_on_two_endpoints_sqlite() {
    let (s, _b) = common::sqlite().await;
    an_address_is_never_shown_on_two_endpoints(s).await;
}

#[tokio::test]
async fn an_address_is_never_shown_on_two_endpoints_etcd() {
    let (s, _b) = common::etcd().await;
    an_address_is_never_shown_on_two_endpoints(s).await;
}
