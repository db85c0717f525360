//! Parsing of NFLOG messages laid out as the kernel sends them (`__build_packet_message`).

use super::*;

fn ipv4_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut b = vec![0u8; 40];
    b[0] = 0x45;
    b[9] = 6;
    b[12..16].copy_from_slice(&src);
    b[16..20].copy_from_slice(&dst);
    b[20..22].copy_from_slice(&sport.to_be_bytes());
    b[22..24].copy_from_slice(&dport.to_be_bytes());
    b
}

/// An NFULNL_MSG_PACKET message: nfgenmsg, PACKET_HDR, PREFIX, PAYLOAD.
fn packet_message(family: u8, prefix: &str, payload: &[u8]) -> Vec<u8> {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, 1, &[0x08, 0x00, 2, 0]);
    let mut p = prefix.as_bytes().to_vec();
    p.push(0);
    put_attr(&mut attrs, NFULA_PREFIX, &p);
    put_attr(&mut attrs, NFULA_PAYLOAD, payload);
    message(
        (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET,
        0,
        0,
        family,
        7,
        &attrs,
    )
}

#[test]
fn packets_of_a_datagram_are_read_with_their_prefix() {
    let mut dgram = packet_message(
        AF_INET,
        "knp/x/allow/in/0",
        &ipv4_tcp([10, 0, 0, 1], [10, 0, 1, 2], 40000, 80),
    );
    let mut v6 = vec![0u8; 48];
    v6[0] = 0x60;
    v6[6] = 17;
    v6[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
    v6[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
    v6[40..42].copy_from_slice(&53u16.to_be_bytes());
    v6[42..44].copy_from_slice(&5353u16.to_be_bytes());
    dgram.extend(packet_message(AF_INET6, "tier/default/out/default", &v6));
    let b = parse_datagram(&dgram);
    assert_eq!(b.malformed, 0);
    assert_eq!(b.packets.len(), 2);
    let p = &b.packets[0];
    assert_eq!(p.prefix, "knp/x/allow/in/0");
    assert_eq!(p.src, "10.0.0.1".parse::<IpAddr>().unwrap());
    assert_eq!(p.dst, "10.0.1.2".parse::<IpAddr>().unwrap());
    assert_eq!(
        (p.protocol, p.src_port, p.dst_port),
        (6, Some(40000), Some(80))
    );
    let q = &b.packets[1];
    assert_eq!(q.dst, "fd00::2".parse::<IpAddr>().unwrap());
    assert_eq!((q.protocol, q.dst_port), (17, Some(5353)));
}

#[test]
fn icmp_fragments_and_garbage() {
    let mut icmp = ipv4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 0, 0);
    icmp[9] = 1;
    icmp[20] = 8;
    let p = parse_ip(AF_INET, &icmp).unwrap();
    assert_eq!((p.icmp, p.dst_port), (Some((8, 0)), None));
    // A later fragment carries no ports.
    let mut frag = ipv4_tcp([1, 1, 1, 1], [2, 2, 2, 2], 1, 2);
    frag[7] = 10;
    assert_eq!(parse_ip(AF_INET, &frag).unwrap().dst_port, None);
    // Truncated or wrong-version payloads are no packet; a datagram with a length running past
    // its end is counted malformed, not a panic.
    assert!(parse_ip(AF_INET, &icmp[..10]).is_none());
    assert!(parse_ip(AF_INET6, &icmp).is_none());
    let mut bad = packet_message(AF_INET, "x", &icmp);
    bad[0] = 0xff;
    assert_eq!(parse_datagram(&bad).malformed, 1);
    let no_payload = message(
        (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET,
        0,
        0,
        AF_INET,
        7,
        &[],
    );
    assert_eq!(parse_datagram(&no_payload).malformed, 1);
}
