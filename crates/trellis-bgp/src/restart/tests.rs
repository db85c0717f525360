use std::net::Ipv4Addr;

use super::*;
use crate::error::Notification;
use crate::nlri::{AFI_IPV4, AFI_IPV6};

fn gr(restart_time: u16, families: &[(u16, bool)]) -> GracefulRestart {
    GracefulRestart {
        restarting: false,
        other_flags: 0,
        restart_time,
        families: families
            .iter()
            .map(|(a, f)| (*a, SAFI_UNICAST, *f))
            .collect(),
        family_other_flags: vec![0; families.len()],
    }
}

fn negotiated(g: Option<GracefulRestart>) -> Negotiated {
    Negotiated {
        peer_asn: 65001,
        peer_id: Ipv4Addr::new(10, 0, 0, 2),
        hold_time: 90,
        four_octet_as: true,
        families: vec![AFI_IPV4, AFI_IPV6],
        route_refresh: true,
        extended_message: false,
        peer_graceful_restart: g,
    }
}

#[test]
fn a_helper_that_lists_no_family_loses_its_routes_at_once() {
    // FRR's default: the capability with a restart time of 120 s and no AFI/SAFI.
    let n = negotiated(Some(gr(120, &[])));
    assert_eq!(
        on_session_loss(&n, &DownReason::TransportClosed, Instant::now()),
        None
    );
}

#[test]
fn only_listed_families_stay_stale_for_the_restart_time() {
    let now = Instant::now();
    // The F bit of the OPEN before the loss does not matter (§4.2 retains every listed family).
    let n = negotiated(Some(gr(90, &[(AFI_IPV4, false)])));
    let s = on_session_loss(&n, &DownReason::TransportClosed, now).unwrap();
    assert_eq!(s.families, vec![AFI_IPV4], "IPv6 was not listed: it goes");
    assert_eq!(s.until, now + Duration::from_secs(90));
    assert!(!s.expired(now + Duration::from_secs(89)));
    assert!(s.expired(now + Duration::from_secs(90)));
    // Our hold timer expiring is a graceful loss too.
    let hold = DownReason::Sent(Notification::new(code::HOLD_TIMER_EXPIRED, 0, vec![]));
    assert!(on_session_loss(&n, &hold, now).is_some());
}

#[test]
fn no_capability_a_zero_restart_time_or_a_notification_keeps_nothing() {
    let now = Instant::now();
    let closed = DownReason::TransportClosed;
    assert_eq!(on_session_loss(&negotiated(None), &closed, now), None);
    let zero = negotiated(Some(gr(0, &[(AFI_IPV4, true)])));
    assert_eq!(on_session_loss(&zero, &closed, now), None);
    let n = negotiated(Some(gr(120, &[(AFI_IPV4, true)])));
    let cease = Notification::new(code::CEASE, 2, vec![]);
    for reason in [DownReason::Received(cease.clone()), DownReason::Sent(cease)] {
        assert_eq!(on_session_loss(&n, &reason, now), None, "{reason}");
    }
}

#[test]
fn reconnect_with_the_forwarding_bit_clear_drops_that_family_at_once() {
    let now = Instant::now();
    let n = negotiated(Some(gr(120, &[(AFI_IPV4, true), (AFI_IPV6, true)])));
    let mut s = on_session_loss(&n, &DownReason::TransportClosed, now).unwrap();
    // IPv4 preserved (F = 1), IPv6 not (F = 0).
    let back = gr(120, &[(AFI_IPV4, true), (AFI_IPV6, false)]);
    assert_eq!(s.on_reestablished(Some(&back)), vec![AFI_IPV6]);
    assert_eq!(s.families, vec![AFI_IPV4], "kept until its End-of-RIB");
    assert!(!s.end_of_rib(AFI_IPV6), "IPv6 is no longer stale");
    assert!(s.end_of_rib(AFI_IPV4));
    assert!(s.is_done());
}

#[test]
fn reconnect_without_the_family_or_the_capability_drops_it_at_once() {
    let now = Instant::now();
    let n = negotiated(Some(gr(120, &[(AFI_IPV4, true), (AFI_IPV6, true)])));
    let lost = on_session_loss(&n, &DownReason::TransportClosed, now).unwrap();
    let mut s = lost.clone();
    assert_eq!(
        s.on_reestablished(Some(&gr(120, &[(AFI_IPV6, true)]))),
        vec![AFI_IPV4]
    );
    assert_eq!(s.families, vec![AFI_IPV6]);
    let mut s = lost;
    assert_eq!(s.on_reestablished(None), vec![AFI_IPV4, AFI_IPV6]);
    assert!(s.is_done());
}

#[test]
fn reconnect_with_the_forwarding_bit_set_keeps_routes_until_end_of_rib() {
    let now = Instant::now();
    let n = negotiated(Some(gr(120, &[(AFI_IPV4, true)])));
    let mut s = on_session_loss(&n, &DownReason::TransportClosed, now).unwrap();
    assert!(s
        .on_reestablished(Some(&gr(120, &[(AFI_IPV4, true)])))
        .is_empty());
    assert_eq!(s.families, vec![AFI_IPV4]);
    assert!(!s.is_done());
    assert!(s.end_of_rib(AFI_IPV4));
    assert!(s.is_done());
}
