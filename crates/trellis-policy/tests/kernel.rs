//! The compiler's output against the real kernel, inside test namespaces (never the root one):
//! full loads and incremental batches list back exactly as the expected ruleset, a failing
//! batch leaves the previous ruleset in force, drift is detected. Needs root.

mod common;

use serde_json::Value;
use trellis_dataplane::{nft, Netns};
use trellis_policy::compile::{self, drift, ruleset::TABLE, Change, PolicyEngine, Ruleset};
use trellis_policy::model::*;
use trellis_testutil::TestNetns;

/// A namespace holding the policy table.
struct Node {
    _guard: TestNetns,
    ns: Netns,
}

impl Node {
    fn new(tag: &str) -> Node {
        let guard = TestNetns::new(tag);
        let ns = Netns::open(guard.path()).unwrap();
        Node { _guard: guard, ns }
    }

    fn apply(&self, doc: &Value) -> Result<(), trellis_dataplane::DataplaneError> {
        self.ns.run(|| nft::apply_document(doc)).unwrap()
    }

    fn listing(&self) -> Option<Value> {
        self.ns
            .run(|| nft::list_table_numeric("inet", TABLE))
            .unwrap()
            .unwrap()
    }

    /// Asserts the kernel's table is exactly `want`.
    fn assert_table(&self, want: &Ruleset, when: &str) {
        let diffs = drift::differences(self.listing().as_ref(), want);
        assert!(diffs.is_empty(), "{when}: the kernel's table differs:\n{}", diffs.join("\n"));
    }
}

#[test]
fn every_feature_loads_and_lists_back_as_compiled() {
    let node = Node::new("polrich");
    let rs = compile::compile(&common::rich_model(), common::NODE);
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after the full load");
    // Loading again replaces the table atomically (no duplicates, no error).
    node.apply(&rs.to_nft_json()).unwrap();
    node.assert_table(&rs, "after a second full load");
}

