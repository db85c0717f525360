//! An own write that replaces a record held as invalid clears it from the invalid-records
//! tracker, as its watch event would have (that event is then skipped as already seen). A test
//! binary of its own: the tracker is per process, and other tests' listings would reset it.

use trellis_agent::view::{self, SharedView};
use trellis_cluster::ipam::CommitObserver;
use trellis_cluster::objects;
use trellis_resources::{parse_documents, Kind};
use trellis_store::{TxnOp, TxnOutcome};
use trellis_testutil::temp_dir;

fn invalid_pools() -> usize {
    trellis_cluster::invalid::counts()
        .get(&Kind::IpPool)
        .copied()
        .unwrap_or(0)
}

#[tokio::test]
async fn an_own_write_over_an_invalid_record_clears_it() {
    let dir = temp_dir("owninv");
    let spec = format!("sqlite:{}", dir.path().join("s.db").display());
    let store = trellis_store::open(&spec).await.unwrap();
    let good = parse_documents(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: ownfix}\nspec: {cidr: 10.99.0.0/16}\n",
    )
    .unwrap()
    .remove(0);
    store
        .txn(
            vec![],
            vec![TxnOp::Put(good.key(), b"not yaml: [".to_vec())],
        )
        .await
        .unwrap();
    let shared = SharedView::new();
    view::load(&*store, &shared).await.unwrap();
    assert_eq!(invalid_pools(), 1, "the record is held as invalid");
    let put = TxnOp::Put(good.key(), objects::encode(&good));
    let TxnOutcome::Committed { revision } = store.txn(vec![], vec![put.clone()]).await.unwrap()
    else {
        panic!("not committed")
    };
    shared.committed(revision, &[put]);
    assert!(
        shared.read().get(&good.key()).is_some(),
        "the own write is in the view"
    );
    assert_eq!(invalid_pools(), 0, "the key is no longer reported invalid");
}
