use super::*;
use crate::topology::decode;

fn lab(file: &str) -> Lab {
    let path = format!("{}/../../examples/lab/{file}", env!("CARGO_MANIFEST_DIR"));
    crate::validate(&decode(&std::fs::read_to_string(path).unwrap()).unwrap()).unwrap()
}

/// The plan for `examples/lab/vxlan.yaml`, step by step, against
/// `golden/vxlan.plan.yaml` (`TRELLIS_UPDATE_GOLDEN=1` rewrites it).
#[test]
fn vxlan_plan_is_golden() {
    let steps = plan(&lab("vxlan.yaml"), &Observed::default()).unwrap();
    let got = serde_norway::to_string(&steps).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/vxlan.plan.yaml");
    if std::env::var_os("TRELLIS_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap();
    assert!(
        got == want,
        "the plan changed; diff golden/vxlan.plan.yaml:\n{got}"
    );
}

#[test]
fn every_made_namespace_is_the_labs_and_every_port_unique() {
    for file in ["bgp-tor.yaml", "cross-subnet.yaml", "nat.yaml"] {
        let steps = plan(&lab(file), &Observed::default()).unwrap();
        let mut ports = std::collections::BTreeSet::new();
        for s in &steps {
            match s {
                Step::Namespace { ns, .. } => assert!(ns.starts_with("tl-"), "{ns}"),
                Step::Link { port, .. } => assert!(ports.insert(port.clone()), "{port} twice"),
                _ => {}
            }
        }
    }
}

#[test]
fn nothing_is_built_over_what_exists() {
    let l = lab("vxlan.yaml");
    let refused = |o: Observed| plan(&l, &o).unwrap_err().to_string();
    assert_eq!(
        refused(Observed {
            labs: vec!["vxlan".into()],
            ..Default::default()
        }),
        "lab vxlan: lab vxlan already exists (trellis lab down vxlan)"
    );
    assert_eq!(
        refused(Observed {
            namespaces: vec!["tl-vxlan-node1".into()],
            ..Default::default()
        }),
        "lab vxlan: namespace tl-vxlan-node1 already exists (trellis lab down vxlan)"
    );
    assert!(refused(Observed {
        labs: vec!["vxlan-2".into()],
        ..Default::default()
    })
    .contains("trellis lab down vxlan-2"));
}
