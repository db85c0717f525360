//! One undecodable record never fails a listing: `objects::list` skips it, names its key, and
//! counts it among the process's invalid records until it is fixed or deleted.

use trellis_cluster::{invalid, objects};
use trellis_resources::{key_for, parse_documents, Kind};
use trellis_store::{Datastore, TxnOp};
use trellis_testutil::temp_dir;

async fn put(s: &dyn Datastore, key: &str, value: &[u8]) {
    s.txn(vec![], vec![TxnOp::Put(key.into(), value.to_vec())])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_bad_record_is_skipped_named_and_counted() {
    let dir = temp_dir("invalid");
    let s = trellis_store::open(&format!("sqlite:{}", dir.path().join("c.db").display()))
        .await
        .unwrap();
    for r in parse_documents(
        "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: good}\nspec: {cidr: 10.1.0.0/16}\n",
    )
    .unwrap()
    {
        objects::apply(&*s, &r, false).await.unwrap();
    }
    let garbage = key_for(Kind::IpPool, None, "garbage");
    put(&*s, &garbage, b"\x00not json").await;
    // A valid Node stored under a pool's key is as unusable as garbage.
    let misplaced = key_for(Kind::IpPool, None, "misplaced");
    put(
        &*s,
        &misplaced,
        br#"{"apiVersion":"trellis.dev/v1","kind":"Node","metadata":{"name":"n1"},"spec":{}}"#,
    )
    .await;

    let pools = objects::pools(&*s).await.expect("the listing survives");
    let names: Vec<_> = pools
        .iter()
        .map(|(p, _)| p.metadata.name.as_str())
        .collect();
    assert_eq!(names, ["good"]);
    assert_eq!(invalid::counts().get(&Kind::IpPool), Some(&2));

    let l = objects::list_checked(&*s, Kind::IpPool).await.unwrap();
    assert_eq!(l.items.len(), 1);
    let keys: Vec<_> = l.invalid.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, [garbage.as_str(), misplaced.as_str()]);
    assert!(
        l.invalid[1].reason.contains("Node n1"),
        "{:?}",
        l.invalid[1]
    );

    // Fixed: no longer counted after the next listing.
    s.txn(
        vec![],
        vec![TxnOp::Delete(garbage), TxnOp::Delete(misplaced)],
    )
    .await
    .unwrap();
    assert_eq!(objects::pools(&*s).await.unwrap().len(), 1);
    assert_eq!(invalid::counts().get(&Kind::IpPool), None);
}
