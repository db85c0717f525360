//! The compiler's output for a model using every feature, against `golden/rich.nft`
//! (`TRELLIS_UPDATE_GOLDEN=1` rewrites it). Pure: no kernel.

mod common;

use trellis_policy::compile::{self, PolicyEngine};

#[test]
fn rich_model_compiles_to_the_golden_ruleset() {
    let rs = compile::compile(&common::rich_model(), common::NODE);
    let got = rs.to_string();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/rich.nft");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(concat!(env!("CARGO_MANIFEST_DIR"), "/golden")).unwrap();
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert!(
        got == want,
        "the ruleset changed; diff golden/rich.nft:\n{got}"
    );
}

/// The engine built from the model equals the batch compiler's output.
#[test]
fn engine_built_from_a_model_equals_compile() {
    let m = common::rich_model();
    let e = PolicyEngine::with_model(common::NODE, m.clone());
    assert_eq!(e.full(), &compile::compile(&m, common::NODE));
}
