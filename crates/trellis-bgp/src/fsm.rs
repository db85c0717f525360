//! The session state machine of RFC 4271 §8 for one transport connection attempt, as
//! `handle(now, input) -> outputs`: no sockets, no clock. The shell feeds it connection events,
//! decoded messages and ticks, and carries out what it returns (connect, send, close). Pure.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::attrs::AS_TRANS;
use crate::error::{code, subcode, DecodeError, Notification};
use crate::message::{Capability, GracefulRestart, Message, Open, Update};
use crate::nlri::{AFI_IPV4, SAFI_UNICAST};

/// RFC 4271 §8.2.2 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        }
    }
}

/// What this side offers and expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    pub peer_asn: u32,
    /// Proposed hold time (seconds; 0 disables keepalives, otherwise at least 3).
    pub hold_time: u16,
    pub connect_retry: Duration,
    /// Only wait for the peer to connect.
    pub passive: bool,
    /// Address families offered (AFIs, unicast).
    pub families: Vec<u16>,
    /// Graceful restart time to advertise (RFC 4724), if any.
    pub graceful_restart: Option<u16>,
}

/// What both sides agreed on, reported when the session is established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_asn: u32,
    pub peer_id: Ipv4Addr,
    pub hold_time: u16,
    pub four_octet_as: bool,
    pub families: Vec<u16>,
    pub route_refresh: bool,
    pub extended_message: bool,
    /// The peer's graceful restart capability, if it sent one.
    pub peer_graceful_restart: Option<GracefulRestart>,
}

/// Inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// ManualStart / AutomaticStart.
    Start,
    /// ManualStop: send this Cease (if connected) and stay idle.
    Stop(Notification),
    TcpConnected,
    TcpFailed,
    TcpClosed,
    Message(Message),
    /// Bytes that did not decode; the error carries the NOTIFICATION to send.
    Malformed(DecodeError),
    /// Time passed; timers are checked.
    Tick,
    /// The transport took what was queued for it, or nothing is queued: the send hold timer
    /// (RFC 9687) starts again.
    SendProgress,
    /// The shell ends the session for a reason of its own (e.g. a prefix limit, RFC 4486):
    /// send this NOTIFICATION, close, and start again only after `idle_hold`.
    Reset {
        notification: Notification,
        idle_hold: Duration,
    },
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownReason {
    Sent(Notification),
    Received(Notification),
    TransportClosed,
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownReason::Sent(n) => write!(f, "sent {n}"),
            DownReason::Received(n) => write!(f, "received {n}"),
            DownReason::TransportClosed => f.write_str("connection closed"),
        }
    }
}

/// Outputs, in the order the shell must carry them out.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Open a TCP connection to the peer.
    Connect,
    Send(Message),
    /// Close the transport (after sending anything queued before it).
    Close,
    Established(Negotiated),
    Update(Box<Update>),
    RouteRefresh {
        afi: u16,
    },
    /// The session left Established (or failed before it), with why.
    Down(DownReason),
}

/// Large hold time while waiting for the peer's OPEN (RFC 4271 §8.2.2: "suggested 4 minutes").
const OPEN_HOLD: Duration = Duration::from_secs(240);

/// RFC 9687 §4: the send hold time is at least 8 minutes, or twice the hold time if longer.
const MIN_SEND_HOLD: Duration = Duration::from_secs(480);

/// One session.
#[derive(Debug, Clone)]
pub struct Fsm {
    pub config: SessionConfig,
    state: State,
    connect_retry_at: Option<Instant>,
    hold_at: Option<Instant>,
    keepalive_at: Option<Instant>,
    /// Automatic restart after a failure.
    restart_at: Option<Instant>,
    /// The peer has not taken our messages since this long ago (RFC 9687).
    send_hold_at: Option<Instant>,
    /// After a [`Input::Reset`]: no session, incoming ones included, before this.
    idle_until: Option<Instant>,
    negotiated: Option<Negotiated>,
    /// The peer's OPEN while in OpenConfirm (for collision detection).
    peer_open: Option<Open>,
}

impl Fsm {
    pub fn new(config: SessionConfig) -> Fsm {
        Fsm {
            config,
            state: State::Idle,
            connect_retry_at: None,
            hold_at: None,
            keepalive_at: None,
            restart_at: None,
            send_hold_at: None,
            idle_until: None,
            negotiated: None,
            peer_open: None,
        }
    }

    /// Whether a connection the peer opens now must be refused: the session is idle after a
    /// [`Input::Reset`] and its idle hold has not passed.
    pub fn refuses_connections(&self, now: Instant) -> bool {
        self.state == State::Idle && self.idle_until.is_some_and(|t| now < t)
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The peer's BGP identifier once its OPEN is in.
    pub fn peer_id(&self) -> Option<Ipv4Addr> {
        self.peer_open.as_ref().map(|o| o.router_id)
    }

    /// The earliest time a [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.connect_retry_at,
            self.hold_at,
            self.keepalive_at,
            self.restart_at,
            self.send_hold_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Our OPEN (RFC 4271 §4.2 with the capabilities of RFC 5492).
    pub fn open_message(&self) -> Open {
        let c = &self.config;
        let mut caps: Vec<Capability> = c
            .families
            .iter()
            .map(|afi| Capability::Multiprotocol {
                afi: *afi,
                safi: SAFI_UNICAST,
            })
            .collect();
        caps.push(Capability::RouteRefresh);
        if let Some(t) = c.graceful_restart {
            caps.push(Capability::GracefulRestart(GracefulRestart {
                restarting: false,
                other_flags: 0,
                restart_time: t,
                families: c
                    .families
                    .iter()
                    .map(|a| (*a, SAFI_UNICAST, true))
                    .collect(),
                family_other_flags: vec![],
            }));
        }
        caps.push(Capability::FourOctetAs(c.local_asn));
        Open {
            version: 4,
            my_as: if c.local_asn > 0xffff {
                AS_TRANS as u16
            } else {
                c.local_asn as u16
            },
            hold_time: c.hold_time,
            router_id: c.router_id,
            capability_groups: vec![caps],
        }
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Start => self.start(now, &mut out),
            Input::Stop(n) => {
                self.restart_at = None;
                if self.connected() {
                    out.push(Output::Send(Message::Notification(n.clone())));
                    out.push(Output::Close);
                }
                let was = self.state;
                self.reset();
                if was != State::Idle {
                    out.push(Output::Down(DownReason::Sent(n)));
                }
                return out;
            }
            Input::TcpConnected => match self.state {
                State::Idle | State::Connect | State::Active => {
                    self.connect_retry_at = None;
                    self.restart_at = None;
                    out.push(Output::Send(Message::Open(self.open_message())));
                    self.hold_at = Some(now + OPEN_HOLD);
                    self.send_hold_at = Some(now + self.send_hold());
                    self.state = State::OpenSent;
                }
                _ => out.push(Output::Close), // one transport per session object
            },
            Input::TcpFailed => {
                if self.state == State::Connect {
                    self.state = State::Active;
                    self.connect_retry_at = Some(now + self.config.connect_retry);
                }
            }
            Input::TcpClosed => self.transport_lost(now, &mut out),
            Input::Malformed(e) => self.fail(now, e.notification().clone(), &mut out),
            Input::Message(m) => self.message(now, m, &mut out),
            Input::Tick => self.tick(now, &mut out),
            Input::SendProgress => {
                if self.connected() {
                    self.send_hold_at = Some(now + self.send_hold());
                }
            }
            Input::Reset {
                notification,
                idle_hold,
            } => {
                if self.state != State::Idle {
                    self.fail(now, notification, &mut out);
                    self.restart_at = Some(now + idle_hold);
                    self.idle_until = self.restart_at;
                }
            }
        }
        out
    }

    /// RFC 9687 §4: max(8 minutes, twice the negotiated hold time).
    fn send_hold(&self) -> Duration {
        let hold = self.negotiated.as_ref().map_or(0, |n| n.hold_time);
        MIN_SEND_HOLD.max(Duration::from_secs(2 * u64::from(hold)))
    }

    fn connected(&self) -> bool {
        matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        )
    }

    fn reset(&mut self) {
        self.state = State::Idle;
        self.connect_retry_at = None;
        self.hold_at = None;
        self.keepalive_at = None;
        self.send_hold_at = None;
        self.negotiated = None;
        self.peer_open = None;
    }

    fn start(&mut self, now: Instant, out: &mut Vec<Output>) {
        if self.state != State::Idle {
            return;
        }
        self.restart_at = None;
        self.idle_until = None;
        self.connect_retry_at = Some(now + self.config.connect_retry);
        if self.config.passive {
            self.state = State::Active;
        } else {
            self.state = State::Connect;
            out.push(Output::Connect);
        }
    }

    /// Ends the session: Idle, and start again after the connect-retry time.
    fn down(&mut self, now: Instant, reason: DownReason, out: &mut Vec<Output>) {
        self.reset();
        self.restart_at = Some(now + self.config.connect_retry);
        out.push(Output::Down(reason));
    }

    fn fail(&mut self, now: Instant, n: Notification, out: &mut Vec<Output>) {
        if self.connected() {
            out.push(Output::Send(Message::Notification(n.clone())));
            out.push(Output::Close);
        }
        self.down(now, DownReason::Sent(n), out);
    }

    fn transport_lost(&mut self, now: Instant, out: &mut Vec<Output>) {
        match self.state {
            State::Idle => {}
            State::Connect | State::Active => {
                self.state = State::Active;
                self.connect_retry_at = Some(now + self.config.connect_retry);
            }
            _ => {
                out.push(Output::Close);
                self.down(now, DownReason::TransportClosed, out);
            }
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Output>) {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.restart_at) {
            self.restart_at = None;
            self.start(now, out);
            return;
        }
        if due(self.hold_at) {
            self.fail(
                now,
                Notification::new(code::HOLD_TIMER_EXPIRED, 0, vec![]),
                out,
            );
            return;
        }
        if due(self.send_hold_at) {
            // RFC 9687 §4: the peer stopped taking our messages; the NOTIFICATION may not
            // get through, the connection closes anyway.
            self.fail(
                now,
                Notification::new(code::SEND_HOLD_TIMER_EXPIRED, 0, vec![]),
                out,
            );
            return;
        }
        if due(self.connect_retry_at) {
            self.connect_retry_at = Some(now + self.config.connect_retry);
            if !self.config.passive {
                self.state = State::Connect;
                out.push(Output::Connect);
            }
        }
        if due(self.keepalive_at) {
            out.push(Output::Send(Message::Keepalive));
            self.keepalive_at = self.keepalive_interval().map(|k| now + k);
        }
    }

    fn keepalive_interval(&self) -> Option<Duration> {
        let h = self.negotiated.as_ref()?.hold_time;
        (h > 0).then(|| Duration::from_secs((h / 3).max(1) as u64))
    }

    fn restart_hold(&mut self, now: Instant) {
        if let Some(n) = &self.negotiated {
            self.hold_at = (n.hold_time > 0).then(|| now + Duration::from_secs(n.hold_time as u64));
        }
    }

    fn message(&mut self, now: Instant, m: Message, out: &mut Vec<Output>) {
        if let Message::Notification(n) = m {
            if self.connected() {
                out.push(Output::Close);
            }
            self.down(now, DownReason::Received(n), out);
            return;
        }
        match (self.state, m) {
            (State::OpenSent, Message::Open(o)) => match self.check_open(&o) {
                Ok(n) => {
                    self.negotiated = Some(n);
                    self.peer_open = Some(o);
                    out.push(Output::Send(Message::Keepalive));
                    self.keepalive_at = self.keepalive_interval().map(|k| now + k);
                    self.restart_hold(now);
                    self.state = State::OpenConfirm;
                }
                Err(n) => self.fail(now, n, out),
            },
            (State::OpenConfirm, Message::Keepalive) => {
                self.restart_hold(now);
                self.state = State::Established;
                out.push(Output::Established(
                    self.negotiated.clone().expect("set in OpenSent"),
                ));
            }
            (State::Established, Message::Keepalive) => self.restart_hold(now),
            (State::Established, Message::Update(u)) => {
                self.restart_hold(now);
                out.push(Output::Update(u));
            }
            (State::Established, Message::RouteRefresh(r)) => {
                self.restart_hold(now);
                out.push(Output::RouteRefresh { afi: r.afi });
            }
            (state, _) if self.connected() => {
                // RFC 6608 subcodes: the state the unexpected message arrived in.
                let sub = match state {
                    State::OpenSent => 1,
                    State::OpenConfirm => 2,
                    _ => 3,
                };
                self.fail(now, Notification::new(code::FSM, sub, vec![]), out);
            }
            _ => {}
        }
    }

    /// Checks the peer's OPEN (RFC 4271 §6.2) and works out what both support.
    fn check_open(&self, o: &Open) -> Result<Negotiated, Notification> {
        let c = &self.config;
        if o.version != 4 {
            return Err(Notification::new(
                code::OPEN,
                subcode::UNSUPPORTED_VERSION,
                vec![0, 4],
            ));
        }
        let asn = o.asn();
        if asn != c.peer_asn {
            return Err(Notification::new(
                code::OPEN,
                subcode::BAD_PEER_AS,
                o.my_as.to_be_bytes().to_vec(),
            ));
        }
        if o.hold_time == 1 || o.hold_time == 2 {
            return Err(Notification::new(
                code::OPEN,
                subcode::UNACCEPTABLE_HOLD_TIME,
                vec![],
            ));
        }
        let ibgp = asn == c.local_asn;
        if o.router_id.is_unspecified() || (ibgp && o.router_id == c.router_id) {
            return Err(Notification::new(
                code::OPEN,
                subcode::BAD_BGP_IDENTIFIER,
                o.router_id.octets().to_vec(),
            ));
        }
        let mut theirs: Vec<u16> = o
            .capabilities()
            .filter_map(|cap| match cap {
                Capability::Multiprotocol {
                    afi,
                    safi: SAFI_UNICAST,
                } => Some(*afi),
                _ => None,
            })
            .collect();
        if !o
            .capabilities()
            .any(|cap| matches!(cap, Capability::Multiprotocol { .. }))
        {
            theirs.push(AFI_IPV4); // RFC 4760 §8: no capability means IPv4 unicast only
        }
        let families: Vec<u16> = c
            .families
            .iter()
            .copied()
            .filter(|a| theirs.contains(a))
            .collect();
        if families.is_empty() {
            let mut data = Vec::new();
            for afi in &c.families {
                let a = afi.to_be_bytes();
                data.extend_from_slice(&[1, 4, a[0], a[1], 0, SAFI_UNICAST]);
            }
            return Err(Notification::new(
                code::OPEN,
                subcode::UNSUPPORTED_CAPABILITY,
                data,
            ));
        }
        Ok(Negotiated {
            peer_asn: asn,
            peer_id: o.router_id,
            hold_time: c.hold_time.min(o.hold_time),
            four_octet_as: o
                .capabilities()
                .any(|cap| matches!(cap, Capability::FourOctetAs(_))),
            families,
            route_refresh: o.capabilities().any(|cap| {
                matches!(
                    cap,
                    Capability::RouteRefresh | Capability::EnhancedRouteRefresh
                )
            }),
            extended_message: false,
            peer_graceful_restart: o.capabilities().find_map(|cap| match cap {
                Capability::GracefulRestart(g) => Some(g.clone()),
                _ => None,
            }),
        })
    }
}

/// RFC 4271 §6.8: of two connections to the same peer, the one initiated by the speaker with
/// the higher BGP identifier survives. Returns true when the connection *we* initiated is kept.
pub fn keep_outgoing(local_id: Ipv4Addr, peer_id: Ipv4Addr) -> bool {
    u32::from(local_id) > u32::from(peer_id)
}

#[cfg(test)]
mod tests;
