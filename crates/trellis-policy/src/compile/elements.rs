//! Element-only batches as the key bytes nf_tables stores (pure): the form of the agent's fast
//! path, which sends them to the kernel over netlink without running `nft` (whose cache fetch
//! of a large table costs far more than the change; `trellis_dataplane::nft_elements`).
//!
//! A batch qualifies when every operation adds or removes elements of a hash set: single
//! addresses, or named-port concatenations. Anything else — chains, maps, interval sets (whose
//! elements are ranges the kernel stores as interval ends), a whole-table replace — goes
//! through `nft` as JSON.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::ruleset::{Element, NftOp, Ops, Set, SetKind};

/// Keys to add to or delete from one set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetKeys {
    pub add: bool,
    pub set: String,
    pub keys: Vec<Vec<u8>>,
}

fn octets(a: &IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn same_family(a: &IpAddr, f: super::ruleset::Family) -> bool {
    super::ruleset::Family::of(a) == f
}

/// The key of `e` in a set of `kind`: an address's bytes; for `addr . inet_proto .
/// inet_service` each field padded to 4 bytes (nf_tables' register size), the port in network
/// order. `None` for what has no single key here (a range, an interval set, a mismatch).
pub fn key(kind: SetKind, e: &Element) -> Option<Vec<u8>> {
    match (kind, e) {
        (SetKind::Addresses(f), Element::Addr { first, last })
            if first == last && same_family(first, f) =>
        {
            Some(octets(first))
        }
        (SetKind::NamedPorts(f), Element::NamedPort { addr, proto, port })
            if same_family(addr, f) =>
        {
            let mut k = octets(addr);
            k.extend_from_slice(&[*proto, 0, 0, 0]);
            k.extend_from_slice(&port.to_be_bytes());
            k.extend_from_slice(&[0, 0]);
            Some(k)
        }
        _ => None,
    }
}

impl Ops {
    /// This batch as element keys per set, in order, when it only changes elements of hash
    /// sets that exist in `sets` (the engine's table after the change); `None` otherwise.
    pub fn element_keys(&self, sets: &BTreeMap<String, Set>) -> Option<Vec<SetKeys>> {
        self.ops
            .iter()
            .map(|op| {
                let (add, set, elements) = match op {
                    NftOp::AddElements { set, elements } => (true, set, elements),
                    NftOp::DeleteElements { set, elements } => (false, set, elements),
                    _ => return None,
                };
                let kind = sets.get(set)?.kind;
                let keys = elements
                    .iter()
                    .map(|e| key(kind, e))
                    .collect::<Option<Vec<_>>>()?;
                Some(SetKeys {
                    add,
                    set: set.clone(),
                    keys,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::ruleset::Family;
    use super::*;

    fn addr(s: &str) -> Element {
        let a: IpAddr = s.parse().unwrap();
        Element::Addr { first: a, last: a }
    }

    fn sets() -> BTreeMap<String, Set> {
        [
            ("a4", SetKind::Addresses(Family::V4)),
            ("a6", SetKind::Addresses(Family::V6)),
            ("n4", SetKind::Networks(Family::V4)),
            ("p4", SetKind::NamedPorts(Family::V4)),
        ]
        .into_iter()
        .map(|(n, kind)| {
            (
                n.to_string(),
                Set {
                    kind,
                    elements: Default::default(),
                },
            )
        })
        .collect()
    }

    #[test]
    fn element_only_batches_become_keys_and_anything_else_does_not() {
        let ops = Ops {
            ops: vec![
                NftOp::AddElements {
                    set: "a4".into(),
                    elements: vec![addr("10.0.0.1")],
                },
                NftOp::DeleteElements {
                    set: "a6".into(),
                    elements: vec![addr("fd00::1")],
                },
                NftOp::AddElements {
                    set: "p4".into(),
                    elements: vec![Element::NamedPort {
                        addr: "10.0.0.2".parse().unwrap(),
                        proto: 17,
                        port: 53,
                    }],
                },
            ],
        };
        let keys = ops.element_keys(&sets()).unwrap();
        assert_eq!(keys[0].keys, vec![vec![10, 0, 0, 1]]);
        assert!(keys[0].add && !keys[1].add);
        assert_eq!(keys[1].keys[0].len(), 16);
        assert_eq!(
            keys[2].keys,
            vec![vec![10, 0, 0, 2, 17, 0, 0, 0, 0, 53, 0, 0]]
        );

        let with = |op: NftOp| Ops { ops: vec![op] }.element_keys(&sets());
        assert_eq!(
            with(NftOp::AddElements {
                set: "n4".into(),
                elements: vec![addr("10.0.0.1")]
            }),
            None,
            "interval sets go through nft"
        );
        assert_eq!(
            with(NftOp::AddElements {
                set: "gone".into(),
                elements: vec![addr("10.0.0.1")]
            }),
            None
        );
        assert_eq!(
            with(NftOp::AddElements {
                set: "a4".into(),
                elements: vec![addr("fd00::1")]
            }),
            None,
            "a family mismatch is not guessed at"
        );
        assert_eq!(with(NftOp::AddChain("c".into())), None);
    }
}
