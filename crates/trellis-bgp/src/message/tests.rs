use super::*;
use crate::attrs::{AsPath, AsSegment, Origin, SegmentKind};
use proptest::prelude::*;

const CTX: Context = Context {
    four_octet_as: true,
    ibgp: false,
};
const IBGP: Context = Context {
    four_octet_as: true,
    ibgp: true,
};

fn p(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn round_trip(m: &Message, ctx: Context) -> Message {
    let bytes = m.encode(ctx);
    let (back, n) = decode(&bytes, ctx, MAX_LEN).unwrap().unwrap();
    assert_eq!(n, bytes.len());
    assert_eq!(back.encode(ctx), bytes, "re-encoding is byte for byte");
    back
}

fn attrs() -> PathAttrs {
    PathAttrs {
        origin: Origin::Igp,
        as_path: AsPath(vec![AsSegment {
            kind: SegmentKind::Sequence,
            asns: vec![65001, 4200000000],
        }]),
        next_hop: Some("192.0.2.1".parse().unwrap()),
        med: Some(10),
        communities: vec![0xfde8_0001],
        ..Default::default()
    }
}

#[test]
fn every_message_round_trips() {
    let open = Message::Open(Open {
        version: 4,
        my_as: 23456,
        hold_time: 90,
        router_id: "10.0.0.1".parse().unwrap(),
        capability_groups: vec![vec![
            Capability::Multiprotocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
            Capability::FourOctetAs(4200000000),
            Capability::GracefulRestart(GracefulRestart {
                restarting: true,
                other_flags: 0,
                restart_time: 120,
                families: vec![(1, 1, true)],
                family_other_flags: vec![0],
            }),
            Capability::Unknown {
                code: 73,
                data: b"\x04node".to_vec(),
            },
        ]],
    });
    assert_eq!(round_trip(&open, CTX), open);
    let upd = Message::Update(Box::new(Update {
        withdrawn: vec![p("10.9.0.0/16")],
        attrs: attrs(),
        nlri: vec![p("10.1.0.0/26"), p("10.1.0.64/26")],
        ..Default::default()
    }));
    let Message::Update(back) = round_trip(&upd, CTX) else {
        panic!()
    };
    assert_eq!(back.nlri, vec![p("10.1.0.0/26"), p("10.1.0.64/26")]);
    assert_eq!(back.attrs.as_path.0[0].asns, vec![65001, 4200000000]);
    assert_eq!(back.attrs.med, Some(10));
    for m in [
        Message::Keepalive,
        Message::Notification(Notification::new(6, 2, b"bye".to_vec())),
        Message::RouteRefresh(RouteRefresh {
            afi: 1,
            subtype: 0,
            safi: 1,
        }),
        Message::Update(Box::new(Update::end_of_rib(AFI_IPV4))),
        Message::Update(Box::new(Update::end_of_rib(AFI_IPV6))),
    ] {
        assert_eq!(round_trip(&m, CTX), m);
    }
}

#[test]
fn end_of_rib_is_recognised() {
    assert_eq!(
        Update::end_of_rib(AFI_IPV4).end_of_rib_afi(),
        Some(AFI_IPV4)
    );
    assert_eq!(
        Update::end_of_rib(AFI_IPV6).end_of_rib_afi(),
        Some(AFI_IPV6)
    );
    let u = Update {
        withdrawn: vec![p("10.0.0.0/8")],
        ..Default::default()
    };
    assert_eq!(u.end_of_rib_afi(), None);
}

#[test]
fn ipv6_via_mp_reach_and_two_octet_sessions() {
    let mut a = attrs();
    a.next_hop = None;
    let ups = pack_announcements(
        &a,
        &[p("2001:db8:1::/48")],
        Some(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        ),
        CTX,
        MAX_LEN,
    )
    .unwrap();
    assert_eq!(ups.len(), 1);
    let Message::Update(back) = round_trip(&Message::Update(Box::new(ups[0].clone())), CTX) else {
        panic!()
    };
    assert_eq!(
        back.announced().collect::<Vec<_>>(),
        vec![&p("2001:db8:1::/48")]
    );
    assert_eq!(
        back.mp_reach.unwrap().next_hop_addr(),
        Some("2001:db8::1".parse().unwrap())
    );
    // A 2-octet session carries AS_TRANS in AS_PATH and the real path in AS4_PATH.
    let two = Context {
        four_octet_as: false,
        ibgp: false,
    };
    let m = Message::Update(Box::new(Update {
        attrs: attrs(),
        nlri: vec![p("10.0.0.0/24")],
        ..Default::default()
    }));
    let bytes = m.encode(two);
    let (Message::Update(back), _) = decode(&bytes, two, MAX_LEN).unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(back.attrs.as_path.0[0].asns, vec![65001, 4200000000]);
}

#[test]
fn packing_respects_the_message_size() {
    let prefixes: Vec<IpNet> = (0..5000u32)
        .map(|i| IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)).into(), 24).unwrap())
        .collect();
    let ups = pack_announcements(&attrs(), &prefixes, None, CTX, MAX_LEN).unwrap();
    assert!(ups.len() > 1);
    let mut seen = 0;
    for u in &ups {
        let b = Message::Update(Box::new(u.clone())).encode(CTX);
        assert!(b.len() <= MAX_LEN, "{}", b.len());
        seen += u.nlri.len();
    }
    assert_eq!(seen, 5000);
    let ws = pack_withdrawals(&prefixes, MAX_LEN);
    assert!(ws
        .iter()
        .all(|u| Message::Update(Box::new(u.clone())).encode(CTX).len() <= MAX_LEN));
    assert_eq!(ws.iter().map(|u| u.withdrawn.len()).sum::<usize>(), 5000);
}

#[test]
fn attributes_too_large_for_one_message_are_an_error_not_an_overflow() {
    let mut big = attrs();
    big.communities = (0..1100).collect();
    let p4 = [p("10.0.0.0/24")];
    let err = pack_announcements(&big, &p4, None, CTX, MAX_LEN).unwrap_err();
    assert!(
        matches!(
            err,
            EncodeError::AttributesTooLarge {
                max_len: MAX_LEN,
                ..
            }
        ),
        "{err}"
    );
    // The same attributes fit in an extended message (RFC 8654).
    let ups = pack_announcements(&big, &p4, None, CTX, 65535).unwrap();
    assert_eq!(ups.len(), 1);
    // Nothing to announce needs no room at all.
    assert!(pack_announcements(&big, &[], None, CTX, MAX_LEN)
        .unwrap()
        .is_empty());
}

fn update_with(attr_bytes: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 0];
    body.extend_from_slice(&(attr_bytes.len() as u16).to_be_bytes());
    body.extend_from_slice(attr_bytes);
    body.extend_from_slice(nlri);
    frame(UPDATE, &body)
}

const ORIGIN_IGP: [u8; 4] = [0x40, 1, 1, 0];
const PATH_65001: [u8; 9] = [0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9];
const NH: [u8; 7] = [0x40, 3, 4, 192, 0, 2, 1];

fn decode_update_bytes(b: &[u8], ctx: Context) -> Result<Update, DecodeError> {
    match decode(b, ctx, MAX_LEN)?.unwrap().0 {
        Message::Update(u) => Ok(*u),
        m => panic!("{m:?}"),
    }
}

fn notification(r: Result<Update, DecodeError>) -> (u8, u8) {
    let e = r.unwrap_err();
    (e.notification().code, e.notification().subcode)
}

#[test]
fn rfc7606_treat_as_withdraw_cases() {
    let nlri = [24, 10, 1, 2];
    let good = [&ORIGIN_IGP[..], &PATH_65001, &NH].concat();
    let u = decode_update_bytes(&update_with(&good, &nlri), CTX).unwrap();
    assert!(u.treat_as_withdraw.is_none());
    assert_eq!(u.announced().count(), 1);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "bad ORIGIN value",
            [&[0x40, 1, 1, 7][..], &PATH_65001, &NH].concat(),
        ),
        (
            "ORIGIN length",
            [&[0x40, 1, 2, 0, 0][..], &PATH_65001, &NH].concat(),
        ),
        (
            "AS_PATH overrun",
            [&ORIGIN_IGP[..], &[0x40, 2, 6, 2, 3, 0, 0, 0xfd, 0xe9], &NH].concat(),
        ),
        (
            "NEXT_HOP 0.0.0.0",
            [&ORIGIN_IGP[..], &PATH_65001, &[0x40, 3, 4, 0, 0, 0, 0]].concat(),
        ),
        ("missing NEXT_HOP", [&ORIGIN_IGP[..], &PATH_65001].concat()),
        ("missing AS_PATH", [&ORIGIN_IGP[..], &NH].concat()),
        (
            "ORIGIN flags say optional",
            [&[0xc0, 1, 1, 0][..], &PATH_65001, &NH].concat(),
        ),
        (
            "COMMUNITIES length 3",
            [&good[..], &[0xc0, 8, 3, 1, 2, 3]].concat(),
        ),
        ("MED length 2", [&good[..], &[0x80, 4, 2, 0, 1]].concat()),
    ];
    for (what, a) in cases {
        let u = decode_update_bytes(&update_with(&a, &nlri), CTX)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(u.treat_as_withdraw.is_some(), "{what}");
        assert_eq!(u.announced().count(), 0, "{what}");
        assert_eq!(u.withdrawals().count(), 1, "{what}");
    }
}

#[test]
fn rfc7606_attribute_discard_cases() {
    let nlri = [24, 10, 1, 2];
    let good = [&ORIGIN_IGP[..], &PATH_65001, &NH].concat();
    // LOCAL_PREF from an external peer, a malformed AGGREGATOR, a duplicate ORIGIN.
    for extra in [
        &[0x40u8, 5, 4, 0, 0, 0, 200][..],
        &[0xc0, 7, 3, 1, 2, 3],
        &[0x40, 1, 1, 2],
    ] {
        let u =
            decode_update_bytes(&update_with(&[&good[..], extra].concat(), &nlri), CTX).unwrap();
        assert!(u.treat_as_withdraw.is_none());
        assert_eq!(u.discarded.len(), 1, "{extra:?}");
        assert_eq!(u.attrs.local_pref, None);
        assert_eq!(u.attrs.origin, Origin::Igp);
    }
    // LOCAL_PREF from an internal peer is kept.
    let u = decode_update_bytes(
        &update_with(&[&good[..], &[0x40, 5, 4, 0, 0, 0, 200]].concat(), &nlri),
        IBGP,
    )
    .unwrap();
    assert_eq!(u.attrs.local_pref, Some(200));
    // Unknown optional transitive attributes are passed on with the partial bit.
    let u = decode_update_bytes(
        &update_with(&[&good[..], &[0xc0, 99, 2, 7, 7]].concat(), &nlri),
        CTX,
    )
    .unwrap();
    assert_eq!(u.attrs.other[0].flags & 0x20, 0x20);
}

#[test]
fn rfc7606_session_reset_cases() {
    let nlri = [24, 10, 1, 2];
    let good = [&ORIGIN_IGP[..], &PATH_65001, &NH].concat();
    // Unrecognized well-known attribute.
    assert_eq!(
        notification(decode_update_bytes(
            &update_with(&[&good[..], &[0x40, 99, 0]].concat(), &nlri),
            CTX
        )),
        (3, 2)
    );
    // MP_REACH that cannot be parsed.
    assert_eq!(
        notification(decode_update_bytes(
            &update_with(&[&good[..], &[0x80, 14, 5, 0, 2, 1, 16, 0]].concat(), &[]),
            CTX
        )),
        (3, 9)
    );
    // NLRI with prefix length 33.
    assert_eq!(
        notification(decode_update_bytes(
            &update_with(&good, &[33, 1, 2, 3, 4, 5]),
            CTX
        )),
        (3, 10)
    );
    // Attribute overrunning the list, no MP attribute before it.
    assert_eq!(
        notification(decode_update_bytes(
            &update_with(&[&good[..], &[0x40, 5, 9, 0]].concat(), &nlri),
            CTX
        )),
        (3, 1)
    );
    // Withdrawn length overrunning the message.
    assert_eq!(
        notification(decode_update_bytes(&frame(UPDATE, &[0, 200, 0, 0]), CTX)),
        (3, 1)
    );
    // Header faults.
    let mut k = Message::Keepalive.encode(CTX);
    k[0] = 0;
    assert_eq!(
        decode(&k, CTX, MAX_LEN).unwrap_err().notification().subcode,
        1
    );
    let mut k = Message::Keepalive.encode(CTX);
    k[18] = 9;
    assert_eq!(
        decode(&k, CTX, MAX_LEN).unwrap_err().notification().clone(),
        Notification::new(1, 3, vec![9])
    );
    let mut k = Message::Keepalive.encode(CTX);
    k.push(0);
    k[17] = 20;
    assert_eq!(
        decode(&k, CTX, MAX_LEN).unwrap_err().notification().clone(),
        Notification::new(1, 2, vec![0, 20])
    );
    // An OPEN with a non-capability optional parameter.
    let open = frame(OPEN, &[4, 0xfd, 0xe9, 0, 90, 10, 0, 0, 1, 3, 1, 1, 0]);
    assert_eq!(
        decode(&open, CTX, MAX_LEN)
            .unwrap_err()
            .notification()
            .subcode,
        4
    );
    // A 4-octet AS capability with 3 bytes.
    let open = frame(
        OPEN,
        &[4, 0xfd, 0xe9, 0, 90, 10, 0, 0, 1, 5, 2, 3, 65, 1, 0],
    );
    let e = decode(&open, CTX, MAX_LEN).unwrap_err();
    assert_eq!((e.notification().code, e.notification().subcode), (2, 0));
}

#[test]
fn partial_input_waits_for_more() {
    let b = Message::Keepalive.encode(CTX);
    assert_eq!(decode(&b[..10], CTX, MAX_LEN).unwrap(), None);
    let u = Message::Update(Box::new(Update {
        attrs: attrs(),
        nlri: vec![p("10.0.0.0/8")],
        ..Default::default()
    }))
    .encode(CTX);
    assert_eq!(decode(&u[..u.len() - 1], CTX, MAX_LEN).unwrap(), None);
}

proptest! {
    #[test]
    fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), ibgp: bool, four: bool) {
        let ctx = Context { four_octet_as: four, ibgp };
        let _ = decode(&bytes, ctx, MAX_LEN);
        // And with a valid header in front, so the body parsers are reached.
        for kind in 1..=5u8 {
            let mut m = vec![0xff; 16];
            m.extend_from_slice(&((19 + bytes.len()) as u16).to_be_bytes());
            m.push(kind);
            m.extend_from_slice(&bytes);
            if let Ok(Some((msg, _))) = decode(&m, ctx, MAX_LEN) {
                let _ = msg.encode(ctx);
            }
        }
    }

    #[test]
    fn updates_round_trip(n in 1usize..50, med in proptest::option::of(any::<u32>()), asns in proptest::collection::vec(1u32..u32::MAX, 1..20)) {
        let prefixes: Vec<IpNet> = (0..n as u32).map(|i| IpNet::new(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8)).into(), 24).unwrap()).collect();
        let mut a = attrs();
        a.med = med;
        a.as_path = AsPath(vec![AsSegment { kind: SegmentKind::Sequence, asns }]);
        let m = Message::Update(Box::new(Update { attrs: a.clone(), nlri: prefixes.clone(), ..Default::default() }));
        let bytes = m.encode(CTX);
        let (Message::Update(back), _) = decode(&bytes, CTX, MAX_LEN).unwrap().unwrap() else { panic!() };
        prop_assert_eq!(back.nlri, prefixes);
        prop_assert_eq!(back.attrs.as_path, a.as_path);
        prop_assert_eq!(back.attrs.med, med);
    }
}
