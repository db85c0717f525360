use super::*;
use crate::message::GracefulRestart;

fn cfg() -> SessionConfig {
    SessionConfig {
        local_asn: 64512,
        router_id: "10.0.0.1".parse().unwrap(),
        peer_asn: 64512,
        hold_time: 90,
        connect_retry: Duration::from_secs(5),
        passive: false,
        families: vec![AFI_IPV4],
        graceful_restart: Some(120),
    }
}

fn peer_open(asn: u32, hold: u16, id: &str) -> Open {
    let mut f = Fsm::new(SessionConfig {
        local_asn: asn,
        router_id: id.parse().unwrap(),
        hold_time: hold,
        ..cfg()
    });
    f.config.hold_time = hold;
    f.open_message()
}

fn sent(out: &[Output]) -> Vec<&Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn to_open_sent(f: &mut Fsm, t: Instant) {
    let out = f.handle(t, Input::Start);
    assert_eq!(out, vec![Output::Connect]);
    let out = f.handle(t, Input::TcpConnected);
    assert!(matches!(sent(&out)[..], [Message::Open(_)]));
    assert_eq!(f.state(), State::OpenSent);
}

#[test]
fn open_keepalive_established_then_timers() {
    let t0 = Instant::now();
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t0);
    let out = f.handle(
        t0,
        Input::Message(Message::Open(peer_open(64512, 30, "10.0.0.2"))),
    );
    assert_eq!(sent(&out), vec![&Message::Keepalive]);
    assert_eq!(f.state(), State::OpenConfirm);
    let out = f.handle(t0, Input::Message(Message::Keepalive));
    let Output::Established(n) = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(n.hold_time, 30, "the smaller hold time wins");
    assert_eq!(n.peer_graceful_restart.as_ref().unwrap().restart_time, 120);
    assert!(n.four_octet_as && n.route_refresh);
    // Keepalives every hold/3; hold timer expiry sends 4/0 and goes down.
    let out = f.handle(t0 + Duration::from_secs(10), Input::Tick);
    assert_eq!(sent(&out), vec![&Message::Keepalive]);
    let out = f.handle(t0 + Duration::from_secs(31), Input::Tick);
    assert_eq!(
        sent(&out),
        vec![&Message::Notification(Notification::new(4, 0, vec![]))]
    );
    assert!(matches!(
        out.last(),
        Some(Output::Down(DownReason::Sent(_)))
    ));
    assert_eq!(f.state(), State::Idle);
    // And it starts again by itself after the connect-retry time.
    let out = f.handle(t0 + Duration::from_secs(37), Input::Tick);
    assert_eq!(out, vec![Output::Connect]);
}

#[test]
fn bad_opens_get_the_right_notification() {
    let t = Instant::now();
    let cases: Vec<(Open, u8)> = vec![
        (peer_open(65000, 90, "10.0.0.2"), subcode::BAD_PEER_AS),
        (
            peer_open(64512, 2, "10.0.0.2"),
            subcode::UNACCEPTABLE_HOLD_TIME,
        ),
        (peer_open(64512, 90, "0.0.0.0"), subcode::BAD_BGP_IDENTIFIER),
        (
            peer_open(64512, 90, "10.0.0.1"),
            subcode::BAD_BGP_IDENTIFIER,
        ),
        (
            Open {
                version: 3,
                ..peer_open(64512, 90, "10.0.0.2")
            },
            subcode::UNSUPPORTED_VERSION,
        ),
        (
            Open {
                capability_groups: vec![vec![Capability::Multiprotocol { afi: 2, safi: 1 }]],
                ..peer_open(64512, 90, "10.0.0.2")
            },
            subcode::UNSUPPORTED_CAPABILITY,
        ),
    ];
    for (open, sub) in cases {
        let mut f = Fsm::new(cfg());
        to_open_sent(&mut f, t);
        let out = f.handle(t, Input::Message(Message::Open(open.clone())));
        match sent(&out)[..] {
            [Message::Notification(n)] => {
                assert_eq!((n.code, n.subcode), (code::OPEN, sub), "{open:?}")
            }
            _ => panic!("{out:?}"),
        }
        assert!(out.contains(&Output::Close));
        assert_eq!(f.state(), State::Idle);
    }
}

#[test]
fn unknown_capabilities_are_ignored() {
    let t = Instant::now();
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t);
    let mut o = peer_open(64512, 90, "10.0.0.2");
    o.capability_groups.push(vec![Capability::Unknown {
        code: 200,
        data: vec![1, 2, 3],
    }]);
    f.handle(t, Input::Message(Message::Open(o)));
    assert_eq!(f.state(), State::OpenConfirm);
}

#[test]
fn no_multiprotocol_capability_means_ipv4() {
    let t = Instant::now();
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t);
    let mut o = peer_open(64512, 90, "10.0.0.2");
    o.capability_groups = vec![];
    f.handle(t, Input::Message(Message::Open(o)));
    f.handle(t, Input::Message(Message::Keepalive));
    assert_eq!(f.negotiated().unwrap().families, vec![AFI_IPV4]);
    assert!(!f.negotiated().unwrap().four_octet_as);
}

#[test]
fn unexpected_messages_are_fsm_errors_and_notifications_end_sessions() {
    let t = Instant::now();
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t);
    let out = f.handle(t, Input::Message(Message::Update(Box::default())));
    assert_eq!(
        sent(&out),
        vec![&Message::Notification(Notification::new(
            code::FSM,
            1,
            vec![]
        ))]
    );
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t);
    let n = Notification::new(6, 2, vec![]);
    let out = f.handle(t, Input::Message(Message::Notification(n.clone())));
    assert_eq!(
        out,
        vec![Output::Close, Output::Down(DownReason::Received(n))]
    );
}

#[test]
fn stop_sends_cease_and_stays_idle() {
    let t = Instant::now();
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t);
    let n = Notification::new(code::CEASE, subcode::PEER_DECONFIGURED, vec![]);
    let out = f.handle(t, Input::Stop(n.clone()));
    assert_eq!(out[0], Output::Send(Message::Notification(n)));
    assert_eq!(
        f.next_deadline(),
        None,
        "no automatic restart after a manual stop"
    );
}

#[test]
fn passive_sessions_wait_and_connect_failures_retry() {
    let t = Instant::now();
    let mut f = Fsm::new(SessionConfig {
        passive: true,
        ..cfg()
    });
    assert!(f.handle(t, Input::Start).is_empty());
    assert_eq!(f.state(), State::Active);
    let mut f = Fsm::new(cfg());
    f.handle(t, Input::Start);
    f.handle(t, Input::TcpFailed);
    assert_eq!(f.state(), State::Active);
    assert_eq!(
        f.handle(t + Duration::from_secs(5), Input::Tick),
        vec![Output::Connect]
    );
}

#[test]
fn our_open_carries_the_capabilities() {
    let mut c = cfg();
    c.local_asn = 4_200_000_000;
    let o = Fsm::new(c).open_message();
    assert_eq!(o.my_as as u32, AS_TRANS);
    assert_eq!(o.asn(), 4_200_000_000);
    assert!(o.capabilities().any(|c| matches!(
        c,
        Capability::GracefulRestart(GracefulRestart {
            restart_time: 120,
            ..
        })
    )));
}

#[test]
fn collision_keeps_the_higher_identifier_s_connection() {
    assert!(keep_outgoing(
        "10.0.0.2".parse().unwrap(),
        "10.0.0.1".parse().unwrap()
    ));
    assert!(!keep_outgoing(
        "10.0.0.1".parse().unwrap(),
        "10.0.0.2".parse().unwrap()
    ));
}

/// An established session (hold time 90 s) at `t`.
fn established(t: Instant) -> Fsm {
    let mut f = Fsm::new(cfg());
    to_open_sent(&mut f, t);
    f.handle(
        t,
        Input::Message(Message::Open(peer_open(64512, 90, "10.0.0.2"))),
    );
    let out = f.handle(t, Input::Message(Message::Keepalive));
    assert!(matches!(out[0], Output::Established(_)));
    f
}

#[test]
fn a_peer_that_stops_taking_our_messages_is_reset_after_the_send_hold_time() {
    let t0 = Instant::now();
    let min = |m: u64| t0 + Duration::from_secs(60 * m);
    // Progress reported each minute keeps the session, while the peer's keepalives keep the
    // hold timer going.
    let mut f = established(t0);
    for m in 1..=20 {
        f.handle(min(m), Input::Message(Message::Keepalive));
        f.handle(min(m), Input::SendProgress);
        let out = f.handle(min(m), Input::Tick);
        assert!(!out.iter().any(|o| matches!(o, Output::Down(_))), "{out:?}");
    }
    // Without progress: RFC 9687's 8 minutes (twice 90 s is less), then 8/0 and down.
    let mut f = established(t0);
    for m in 1..8 {
        f.handle(min(m), Input::Message(Message::Keepalive));
        let out = f.handle(min(m), Input::Tick);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Down(_))),
            "minute {m}: {out:?}"
        );
    }
    f.handle(min(8), Input::Message(Message::Keepalive));
    let out = f.handle(min(8), Input::Tick);
    let expired = Notification::new(code::SEND_HOLD_TIMER_EXPIRED, 0, vec![]);
    assert_eq!(sent(&out), vec![&Message::Notification(expired.clone())]);
    assert_eq!(out.last(), Some(&Output::Down(DownReason::Sent(expired))));
    assert_eq!(f.state(), State::Idle);
}

#[test]
fn a_reset_by_the_shell_sends_its_notification_and_waits_the_idle_hold() {
    let t0 = Instant::now();
    let mut f = established(t0);
    let n = Notification::max_prefixes(AFI_IPV4, 1, 100);
    assert_eq!(
        n.data,
        vec![0, 1, 1, 0, 0, 0, 100],
        "RFC 4486 §4: AFI, SAFI, bound"
    );
    let out = f.handle(
        t0,
        Input::Reset {
            notification: n.clone(),
            idle_hold: Duration::from_secs(60),
        },
    );
    assert_eq!(sent(&out), vec![&Message::Notification(n.clone())]);
    assert!(out.contains(&Output::Close));
    assert_eq!(out.last(), Some(&Output::Down(DownReason::Sent(n))));
    // Not after the connect-retry time (5 s), only after the idle hold.
    assert!(f
        .handle(t0 + Duration::from_secs(30), Input::Tick)
        .is_empty());
    assert_eq!(
        f.handle(t0 + Duration::from_secs(60), Input::Tick),
        vec![Output::Connect]
    );
}
