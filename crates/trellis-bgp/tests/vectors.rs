//! Messages produced by independent implementations — BIRD 2.0.12 and GoBGP 3.10, recorded by
//! `scripts/capture-bgp-vectors.sh` from live sessions — decode, carry what the daemons were
//! told to send, and re-encode byte for byte.

use trellis_bgp::message::{decode, Capability, MAX_LEN};
use trellis_bgp::nlri::{AFI_IPV4, AFI_IPV6};
use trellis_bgp::{Context, Message, Update};

const CTX: Context = Context {
    four_octet_as: true,
    ibgp: false,
};

fn messages(file: &str) -> Vec<(Vec<u8>, Message)> {
    let text = std::fs::read_to_string(format!(
        "{}/tests/vectors/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let bytes: Vec<u8> = (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect();
            let (m, n) = decode(&bytes, CTX, MAX_LEN)
                .unwrap_or_else(|e| panic!("{file}: {e}: {l}"))
                .unwrap();
            assert_eq!(n, bytes.len(), "{file}: one message per line");
            assert_eq!(m.encode(CTX), bytes, "{file}: re-encoding {m:?}");
            (bytes, m)
        })
        .collect()
}

fn updates(ms: &[(Vec<u8>, Message)]) -> Vec<&Update> {
    ms.iter()
        .filter_map(|(_, m)| match m {
            Message::Update(u) => Some(&**u),
            _ => None,
        })
        .collect()
}

fn announced(us: &[&Update]) -> Vec<String> {
    us.iter()
        .flat_map(|u| u.announced().map(|p| p.to_string()))
        .collect()
}

#[test]
fn bird_messages_round_trip() {
    let ms = messages("bird.hex");
    let Message::Open(open) = &ms[0].1 else {
        panic!("first is OPEN")
    };
    assert_eq!(open.asn(), 65001);
    assert!(open
        .capabilities()
        .any(|c| matches!(c, Capability::GracefulRestart(_))));
    assert!(open.capabilities().any(|c| *c
        == Capability::Multiprotocol {
            afi: AFI_IPV6,
            safi: 1
        }));
    let us = updates(&ms);
    let prefixes = announced(&us);
    for p in [
        "10.10.0.0/26",
        "10.10.0.64/26",
        "198.51.100.0/24",
        "2001:db8:100::/48",
        "2001:db8:200::/56",
    ] {
        assert!(prefixes.contains(&p.to_string()), "{p} in {prefixes:?}");
    }
    let with_comm = us
        .iter()
        .find(|u| u.nlri.iter().any(|p| p.to_string() == "10.10.0.64/26"))
        .unwrap();
    assert_eq!(with_comm.attrs.communities, vec![65000 << 16 | 100]);
    assert_eq!(with_comm.attrs.as_path.0[0].asns, vec![65001, 65010]);
    let v6 = us.iter().find_map(|u| u.mp_reach.as_ref()).unwrap();
    assert_eq!(v6.next_hop.len(), 32, "global and link-local next hop");
    let eors: Vec<u16> = us.iter().filter_map(|u| u.end_of_rib_afi()).collect();
    assert_eq!(eors.len(), 2);
    assert!(eors.contains(&AFI_IPV4) && eors.contains(&AFI_IPV6));
}

#[test]
fn gobgp_messages_round_trip() {
    let ms = messages("gobgp.hex");
    let Message::Open(open) = &ms[0].1 else {
        panic!("first is OPEN")
    };
    assert_eq!(open.asn(), 65001);
    assert!(
        open.capabilities()
            .any(|c| matches!(c, Capability::Unknown { code: 73, .. })),
        "FQDN capability kept as unknown"
    );
    let us = updates(&ms);
    let prefixes = announced(&us);
    for p in ["10.20.0.0/26", "10.20.0.64/26", "2001:db8:300::/48"] {
        assert!(prefixes.contains(&p.to_string()), "{p} in {prefixes:?}");
    }
    let rich = us
        .iter()
        .find(|u| u.nlri.iter().any(|p| p.to_string() == "10.20.0.64/26"))
        .unwrap();
    assert_eq!(rich.attrs.med, Some(30));
    assert_eq!(
        rich.attrs.communities,
        vec![65000 << 16 | 100, 65000 << 16 | 200]
    );
    assert_eq!(rich.attrs.as_path.0[0].asns, vec![65001, 65010, 65011]);
    assert_eq!(
        us.iter().filter(|u| u.end_of_rib_afi().is_some()).count(),
        2
    );
}
