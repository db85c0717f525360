//! The speaker: one task owning the RIB and every peer's session state machines. It feeds the
//! pure FSMs connection events, messages and ticks, carries out their outputs (connect, send,
//! close), resolves connection collisions (RFC 4271 §6.8), keeps a gracefully restarting
//! peer's routes until End-of-RIB or its restart time (RFC 4724), and publishes the best routes
//! for the dataplane loop to install. Its queues are bounded: readers wait while it is behind,
//! a peer whose transport is behind gets no UPDATEs until it catches up (the RIB coalesces what
//! changed meanwhile) and is reset if it takes nothing for the send hold time (RFC 9687), and a
//! peer's `maxPrefixes` bounds what is held for it. Does I/O (sockets via [`super::net`]).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use trellis_bgp::error::{code, subcode};
use trellis_bgp::fsm::{keep_outgoing, DownReason};
use trellis_bgp::message::{pack_announcements, pack_withdrawals, RouteRefresh, MAX_LEN};
use trellis_bgp::nlri::{AFI_IPV4, AFI_IPV6};
use trellis_bgp::restart::{self, Stale};
use trellis_bgp::{
    Context, Fsm, Input, LimitAction, Message, Negotiated, Notification, Origin, Output, PathAttrs,
    PeerId, PeerInfo, Rib, RibConfig, SessionConfig, State, Update,
};
use trellis_resources::{BgpSessionStatus, BgpStatusSpec};

use super::config::{PeerConfig, SpeakerConfig};
use super::net::{self, ConnectOptions, Read};
use super::Shared;

mod outbound;
mod status;

const CONNECT_RETRY: Duration = Duration::from_secs(3);
const HOLD_TIME: u16 = 90;
const TICK: Duration = Duration::from_millis(250);
/// How often a failed listen is retried.
const LISTEN_RETRY: Duration = Duration::from_secs(3);
/// How long the listener waits after a failed accept (out of descriptors) before the next.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// How long a restarting agent keeps the routes it finds before its peers have sent theirs.
const STARTUP_GRACE: Duration = Duration::from_secs(30);
/// Decoded messages waiting for the speaker, from all connections together; a reader whose
/// message does not fit waits and stops reading its socket.
const READ_QUEUE: usize = 1024;
/// Connection events (accepted, connected, failed) waiting for the speaker.
const EVENT_QUEUE: usize = 64;
/// A peer with this many bytes still queued for its socket is sent no more UPDATEs until it
/// catches up.
const HIGH_WATER: usize = 256 * 1024;
/// After a reset for exceeding `maxPrefixes` (action Restart), the session waits this long
/// before it starts again (as BIRD's `error wait time` does), so a peer that always sends too
/// much is not reloaded every few seconds.
const PREFIX_LIMIT_IDLE_HOLD: Duration = Duration::from_secs(60);

/// Which connection of a peer an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnTag {
    peer: IpAddr,
    conn: u64,
}

struct Conn {
    id: u64,
    fsm: Fsm,
    tx: Option<net::Writer>,
    /// Bytes the socket had taken at the last tick (progress for the send hold timer).
    written_seen: u64,
    outgoing: bool,
}

impl Conn {
    /// Queues bytes for the peer; a full queue means it stopped reading: the session is reset
    /// (Cease / Out of Resources, RFC 4486) at the end of the current step.
    fn send(&mut self, bytes: Vec<u8>) -> Option<Notification> {
        match &self.tx {
            Some(w) if !w.send(bytes) => Some(cease(subcode::OUT_OF_RESOURCES)),
            _ => None,
        }
    }
}

struct Peer {
    cfg: PeerConfig,
    id: PeerId,
    main: Conn,
    /// A second connection during a collision (RFC 4271 §6.8).
    second: Option<Conn>,
    connecting: u64,
    negotiated: Option<Negotiated>,
    since: u64,
    last_error: Option<String>,
    /// The peer's routes kept through its graceful restart (RFC 4724 §4.2).
    stale: Option<Stale>,
    eor_received: bool,
    counters: MessageCounters,
    /// The peer passed its `maxPrefixes` limit in this session (logged once).
    over_limit_logged: bool,
    /// A reset decided while handling one input, carried out after it ([`Speaker::drive`]).
    reset: Option<(Notification, Duration)>,
}

/// Per-peer message counts (for status and metrics).
#[derive(Debug, Clone, Copy, Default)]
struct MessageCounters {
    updates_in: u64,
    updates_out: u64,
    notifications_in: u64,
    notifications_out: u64,
    established: u64,
    /// Announcements of new prefixes beyond the peer's `maxPrefixes` limit.
    over_limit: u64,
}

enum Event {
    Accepted(TcpStream, SocketAddr),
    Connected(IpAddr, u64, TcpStream),
    ConnectFailed(IpAddr, u64, String),
}

/// The speaker's state.
pub struct Speaker {
    cfg: SpeakerConfig,
    shared: Arc<Shared>,
    rib: Rib,
    peers: BTreeMap<IpAddr, Peer>,
    next_peer_id: PeerId,
    next_conn: u64,
    started: Instant,
    reads: mpsc::Sender<(ConnTag, Read)>,
    events: mpsc::Sender<Event>,
    /// Where the listener is bound.
    listener_at: Option<SocketAddr>,
    /// The last failed attempt to listen (retried from the tick every few seconds).
    listen_failed_at: Option<Instant>,
    listener: Option<Arc<tokio::net::TcpListener>>,
    accept_task: Option<tokio::task::JoinHandle<()>>,
    md5_keys: HashMap<IpAddr, String>,
}

fn now_secs() -> u64 {
    trellis_cluster::now_secs()
}

fn cease(sub: u8) -> Notification {
    Notification::new(code::CEASE, sub, vec![])
}

/// The RIB's identity: next hops on the node's subnet are directly reachable, others resolve
/// through the host's routes.
fn rib_config(cfg: &SpeakerConfig) -> RibConfig {
    RibConfig {
        asn: cfg.asn,
        router_id: cfg.router_id,
        cluster_id: cfg.cluster_id,
        connected: vec![cfg.subnet],
    }
}

impl Speaker {
    /// Runs until the configuration channel closes.
    pub async fn run(shared: Arc<Shared>, mut config: watch::Receiver<Option<SpeakerConfig>>) {
        let (reads_tx, mut reads) = mpsc::channel(READ_QUEUE);
        let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
        let mut sp: Option<Speaker> = None;
        let mut tick = tokio::time::interval(TICK);
        let mut last_status: Option<BgpStatusSpec> = None;
        let mut last_status_write = Instant::now() - Duration::from_secs(60);
        let mut igp = shared.igp.subscribe();
        let taken = shared.table_receiver.lock().ok().and_then(|mut r| r.take());
        let Some(mut table_requests) = taken else {
            tracing::error!("a second BGP speaker for one agent; not started");
            return;
        };
        loop {
            tokio::select! {
                Some(reply) = table_requests.recv() => {
                    let routes = sp.as_ref().map_or_else(Vec::new, |s| s.learned_routes());
                    // A pass that stopped waiting needs no answer.
                    let _ = reply.send(Arc::new(routes));
                    continue;
                }
                changed = config.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let want = config.borrow_and_update().clone();
                    match (&mut sp, want) {
                        (Some(s), Some(c)) => s.reconfigure(c),
                        (None, Some(c)) => {
                            let mut s = Speaker::new(c, shared.clone(), reads_tx.clone(), events_tx.clone());
                            s.reconfigure_peers();
                            sp = Some(s);
                        }
                        (Some(s), None) => {
                            s.shutdown();
                            sp = None;
                            shared.routes_changed();
                        }
                        (None, None) => {}
                    }
                }
                Some((tag, r)) = reads.recv() => {
                    if let Some(s) = &mut sp {
                        s.on_read(tag, r);
                        // Take what is already queued before deciding (batches big tables), at
                        // most a queue's worth so ticks are not starved while readers refill it.
                        for _ in 0..READ_QUEUE {
                            let Ok((tag, r)) = reads.try_recv() else { break };
                            s.on_read(tag, r);
                        }
                    }
                }
                Some(ev) = events.recv() => {
                    if let Some(s) = &mut sp {
                        s.on_event(ev);
                    }
                }
                Ok(()) = igp.changed() => {
                    let routes = igp.borrow_and_update().len();
                    tracing::info!(routes, "host routes changed; next hops resolve again");
                    if let Some(s) = &mut sp {
                        s.update_host_routes();
                    }
                }
                _ = tick.tick() => {
                    if let Some(s) = &mut sp {
                        s.on_tick();
                        if last_status_write.elapsed() >= Duration::from_secs(2) {
                            let st = s.status();
                            if last_status.as_ref() != Some(&st) {
                                s.shared.status.send_replace(Some(st.clone()));
                                last_status = Some(st);
                                last_status_write = Instant::now();
                            }
                        }
                    }
                }
            }
            if let Some(s) = &mut sp {
                s.flush();
            }
        }
    }

    fn new(
        cfg: SpeakerConfig,
        shared: Arc<Shared>,
        reads: mpsc::Sender<(ConnTag, Read)>,
        events: mpsc::Sender<Event>,
    ) -> Speaker {
        let rib = Rib::new(rib_config(&cfg));
        let mut s = Speaker {
            cfg,
            shared,
            rib,
            peers: BTreeMap::new(),
            next_peer_id: 1,
            next_conn: 1,
            started: Instant::now(),
            reads,
            events,
            listener_at: None,
            listen_failed_at: None,
            listener: None,
            accept_task: None,
            md5_keys: HashMap::new(),
        };
        s.update_host_routes();
        s.publish_routes(); // the reachableBy routes, before any session needs them
        s.sync_exports();
        s
    }

    /// Next hops beyond the subnet resolve through the host's gateway routes and the peers'
    /// `reachableBy` routes (BIRD's `gateway recursive` over Calico's static peer routes).
    fn update_host_routes(&mut self) {
        let host = self.shared.igp.borrow().clone();
        self.rib
            .set_igp_routes(host.iter().copied().chain(self.cfg.peer_routes()));
    }

    fn session_config(&self, p: &PeerConfig) -> SessionConfig {
        // Between two Trellis nodes only the one with the higher ID connects: no collisions.
        let passive = p.node.is_some()
            && matches!(p.address, IpAddr::V4(a) if u32::from(a) > u32::from(self.cfg.router_id));
        SessionConfig {
            local_asn: self.cfg.asn,
            router_id: self.cfg.router_id,
            peer_asn: p.asn,
            hold_time: HOLD_TIME,
            connect_retry: CONNECT_RETRY,
            passive,
            families: vec![if p.address.is_ipv4() {
                AFI_IPV4
            } else {
                AFI_IPV6
            }],
            graceful_restart: Some(p.options.restart_time),
        }
    }

    fn new_conn(&mut self, fsm: Fsm, outgoing: bool) -> Conn {
        self.next_conn += 1;
        Conn {
            id: self.next_conn,
            fsm,
            tx: None,
            written_seen: 0,
            outgoing,
        }
    }

    /// Applies a new configuration; sessions whose settings did not change are left alone.
    fn reconfigure(&mut self, cfg: SpeakerConfig) {
        let identity = (cfg.asn, cfg.router_id, cfg.cluster_id, cfg.subnet)
            != (
                self.cfg.asn,
                self.cfg.router_id,
                self.cfg.cluster_id,
                self.cfg.subnet,
            );
        if identity {
            tracing::info!(asn = cfg.asn, router_id = %cfg.router_id, cluster_id = ?cfg.cluster_id, "BGP identity changed; resetting every session");
            for addr in self.peers.keys().copied().collect::<Vec<_>>() {
                self.remove_peer(addr, subcode::OTHER_CONFIGURATION_CHANGE);
            }
            self.rib.set_config(rib_config(&cfg));
        }
        let peer_routes_changed = !self.cfg.peer_routes().eq(cfg.peer_routes());
        self.cfg = cfg;
        self.sync_exports();
        self.reconfigure_peers();
        if peer_routes_changed {
            self.update_host_routes();
            self.publish_routes();
        }
    }

    fn reconfigure_peers(&mut self) {
        self.ensure_listener();
        let want = self.cfg.peers.clone();
        for addr in self.peers.keys().copied().collect::<Vec<_>>() {
            match want.get(&addr) {
                Some(c) if !same_session(c, &self.peers[&addr].cfg) => {
                    self.remove_peer(addr, subcode::OTHER_CONFIGURATION_CHANGE)
                }
                // Only how the peering came about or its filters changed (mesh → BGPPeer):
                // keep the session.
                Some(c) => self.refilter(addr, c.clone()),
                None => self.remove_peer(addr, subcode::PEER_DECONFIGURED),
            }
        }
        self.sync_md5();
        for (addr, c) in want {
            if self.peers.contains_key(&addr) {
                continue;
            }
            let id = self.next_peer_id;
            self.next_peer_id += 1;
            let fsm = Fsm::new(self.session_config(&c));
            let main = self.new_conn(fsm, true);
            tracing::info!(peer = %addr, asn = c.asn, kind = c.kind.name(), rr_client = c.rr_client, "BGP peer configured");
            self.peers.insert(
                addr,
                Peer {
                    cfg: c,
                    id,
                    main,
                    second: None,
                    connecting: 0,
                    negotiated: None,
                    since: now_secs(),
                    last_error: None,
                    stale: None,
                    eor_received: false,
                    counters: MessageCounters::default(),
                    over_limit_logged: false,
                    reset: None,
                },
            );
            self.drive(addr, false, Input::Start);
        }
    }

    /// Takes a peer's new configuration, which differs at most in its label and its filters.
    /// New filters apply without a reset: what it is sent is decided again, and when the import
    /// filter changed it is asked to send its routes again (ROUTE-REFRESH, RFC 2918 §3) — or, if
    /// it cannot, the session is reset.
    fn refilter(&mut self, addr: IpAddr, c: PeerConfig) {
        let p = self.peers.get_mut(&addr).expect("present");
        let (import, export) = c.options.filters.clone();
        let changed = p.cfg.options.filters != c.options.filters;
        p.cfg = c;
        if !changed || p.negotiated.is_none() {
            return; // a session not up yet takes the filters when it comes up
        }
        tracing::info!(peer = %addr, "BGP filters changed");
        if !self.rib.set_peer_filters(p.id, import, export) {
            return;
        }
        let refresh = p.negotiated.as_ref().filter(|n| n.route_refresh).map(|n| {
            let ctx = ctx_for(Some(n), p.cfg.asn == self.cfg.asn);
            n.families
                .iter()
                .flat_map(|afi| {
                    Message::RouteRefresh(RouteRefresh {
                        afi: *afi,
                        subtype: 0,
                        safi: 1,
                    })
                    .encode(ctx)
                })
                .collect::<Vec<u8>>()
        });
        match refresh {
            Some(bytes) if p.main.tx.is_some() => {
                if let Some(full) = p.main.send(bytes) {
                    p.reset.get_or_insert((full, CONNECT_RETRY));
                }
            }
            _ => self.remove_peer(addr, subcode::OTHER_CONFIGURATION_CHANGE),
        }
    }

    fn remove_peer(&mut self, addr: IpAddr, sub: u8) {
        self.drive(addr, false, Input::Stop(cease(sub)));
        if let Some(p) = self.peers.remove(&addr) {
            self.rib.peer_down(p.id, &[]);
            tracing::info!(peer = %addr, "BGP peer removed");
        }
    }

    fn shutdown(&mut self) {
        for addr in self.peers.keys().copied().collect::<Vec<_>>() {
            self.remove_peer(addr, subcode::ADMIN_SHUTDOWN);
        }
        if let Some(t) = self.accept_task.take() {
            t.abort();
        }
        self.shared.set_listen_error(None);
    }

    fn ensure_listener(&mut self) {
        let ip = if self.cfg.listen_on_node_ip {
            self.cfg.address
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        let at = SocketAddr::new(ip, self.cfg.port);
        if self.listener_at == Some(at) && self.listener.is_some() {
            return;
        }
        if let Some(t) = self.accept_task.take() {
            t.abort();
        }
        self.listener = None;
        match net::listen(at) {
            Ok(l) => {
                let l = Arc::new(l);
                let events = self.events.clone();
                let acc = l.clone();
                self.accept_task = Some(tokio::spawn(async move {
                    // While the speaker is behind, connections wait in the kernel's backlog.
                    let mut failing = false;
                    loop {
                        match acc.accept().await {
                            Ok((s, a)) => {
                                failing = false;
                                if events.send(Event::Accepted(s, a)).await.is_err() {
                                    return;
                                }
                            }
                            // Out of descriptors (EMFILE/ENFILE) or memory: the listener is
                            // fine, so accept again after a pause. Ending here left the speaker
                            // bound but deaf for good, peers' connections piling up unanswered.
                            Err(e) => {
                                if !failing {
                                    tracing::warn!(error = %e, "accepting a BGP connection failed; retrying");
                                }
                                failing = true;
                                tokio::time::sleep(ACCEPT_RETRY).await;
                            }
                        }
                    }
                }));
                self.listener = Some(l);
                self.listener_at = Some(at);
                self.listen_failed_at = None;
                self.md5_keys.clear();
                self.shared.set_listen_error(None);
                tracing::info!(%at, "BGP listening");
            }
            Err(e) => {
                // Also when rebinding elsewhere: the aborted accept task may still hold the old
                // socket for a moment.
                tracing::warn!(%at, error = %e, "cannot listen for BGP; will retry");
                self.listen_failed_at = Some(Instant::now());
                self.shared
                    .set_listen_error(Some(format!("cannot listen on {at}: {e}")));
            }
        }
    }

    /// Keeps the listener's MD5 keys equal to the configured passwords.
    fn sync_md5(&mut self) {
        let Some(l) = &self.listener else { return };
        let want: HashMap<IpAddr, String> = self
            .cfg
            .peers
            .values()
            .filter_map(|p| p.options.password.clone().map(|k| (p.address, k)))
            .collect();
        for (a, _) in self.md5_keys.iter().filter(|(a, k)| want.get(a) != Some(k)) {
            let _ = net::set_md5(&**l, *a, None);
        }
        for (a, k) in &want {
            if self.md5_keys.get(a) != Some(k) {
                if let Err(e) = net::set_md5(&**l, *a, Some(k)) {
                    tracing::warn!(peer = %a, error = %e, "cannot set the TCP MD5 key");
                }
            }
        }
        self.md5_keys = want;
    }

    /// Originates this node's prefixes; withdraws the ones no longer configured.
    fn sync_exports(&mut self) {
        let have: Vec<IpNet> = self.rib.local_prefixes();
        for p in have {
            if !self.cfg.exports.contains_key(&p) {
                self.rib.withdraw_local(p);
            }
        }
        let mut by_comms: HashMap<Vec<u32>, Arc<PathAttrs>> = HashMap::new();
        for (prefix, comms) in self.cfg.exports.clone() {
            let attrs = by_comms
                .entry(comms.clone())
                .or_insert_with(|| {
                    Arc::new(PathAttrs {
                        origin: Origin::Igp,
                        communities: comms,
                        ..Default::default()
                    })
                })
                .clone();
            self.rib.originate(prefix, attrs, self.cfg.address);
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Accepted(stream, from) => self.on_accept(stream, from.ip()),
            Event::Connected(addr, gen, stream) => {
                let Some(p) = self.peers.get(&addr) else {
                    return;
                };
                if p.connecting != gen
                    || !matches!(p.main.fsm.state(), State::Connect | State::Active)
                {
                    return; // superseded: the socket is dropped
                }
                self.attach(addr, stream, false);
                self.drive(addr, false, Input::TcpConnected);
            }
            Event::ConnectFailed(addr, gen, error) => {
                if let Some(p) = self.peers.get_mut(&addr) {
                    if p.connecting == gen {
                        // A session's own error says more than the reconnect attempts after it.
                        p.last_error.get_or_insert(format!("connect: {error}"));
                        self.drive(addr, false, Input::TcpFailed);
                    }
                }
            }
        }
    }

    fn on_accept(&mut self, stream: TcpStream, from: IpAddr) {
        let Some(p) = self.peers.get(&from) else {
            tracing::debug!(%from, "BGP connection from an unconfigured address refused");
            return;
        };
        match net::accepted(&stream, self.cfg.ttl_policy(&p.cfg)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                // Dropping the stream closes it; the session's own attempts go on.
                tracing::debug!(peer = %from, error = %e, "BGP connection refused");
                return;
            }
            Err(e) => {
                tracing::warn!(peer = %from, error = %e, "setting the TTL on an accepted BGP connection");
            }
        }
        if p.main.fsm.refuses_connections(Instant::now()) {
            tracing::debug!(peer = %from, "BGP connection refused: the session is held idle after a reset");
            return;
        }
        match p.main.fsm.state() {
            State::Idle | State::Connect | State::Active => {
                let p = self.peers.get_mut(&from).expect("present");
                p.connecting += 1; // a pending outgoing attempt is superseded
                p.main.outgoing = false;
                self.attach(from, stream, false);
                self.drive(from, false, Input::TcpConnected);
            }
            State::OpenSent | State::OpenConfirm if p.second.is_none() => {
                let mut sc = self.session_config(&p.cfg);
                sc.passive = true;
                let mut c = self.new_conn(Fsm::new(sc), false);
                c.fsm.handle(Instant::now(), Input::Start);
                self.peers.get_mut(&from).expect("present").second = Some(c);
                self.attach(from, stream, true);
                self.drive(from, true, Input::TcpConnected);
            }
            _ => {
                // Established (or already two): RFC 4271 §6.8, the new connection is closed.
                let ibgp = p.cfg.asn == self.cfg.asn;
                let w = net::spawn_io(
                    stream,
                    ibgp,
                    ConnTag {
                        peer: from,
                        conn: 0,
                    },
                    self.reads.clone(),
                );
                let refusal = Message::Notification(cease(subcode::CONNECTION_COLLISION));
                if !w.send(refusal.encode(ctx_for(None, ibgp))) {
                    tracing::debug!(peer = %from, "the refused connection is already gone");
                }
            }
        }
    }

    fn attach(&mut self, addr: IpAddr, stream: TcpStream, second: bool) {
        let ibgp = self.peers[&addr].cfg.asn == self.cfg.asn;
        // Every stream gets its own id: reads of an earlier stream on this slot still queued
        // for the speaker are then told apart and dropped (`on_read`).
        self.next_conn += 1;
        let id = self.next_conn;
        let p = self.peers.get_mut(&addr).expect("present");
        let c = if second {
            p.second.as_mut().expect("second")
        } else {
            &mut p.main
        };
        c.id = id;
        let tag = ConnTag {
            peer: addr,
            conn: c.id,
        };
        c.tx = Some(net::spawn_io(stream, ibgp, tag, self.reads.clone()));
        c.written_seen = 0;
    }

    fn on_read(&mut self, tag: ConnTag, r: Read) {
        let Some(p) = self.peers.get(&tag.peer) else {
            return;
        };
        let second = match (&p.second, p.main.id == tag.conn) {
            (_, true) => false,
            (Some(s), false) if s.id == tag.conn => true,
            _ => return, // a connection already dropped
        };
        let c = &mut self.peers.get_mut(&tag.peer).expect("present").counters;
        match &r {
            Read::Message(Message::Update(_)) => c.updates_in += 1,
            Read::Message(Message::Notification(_)) => c.notifications_in += 1,
            _ => {}
        }
        let input = match r {
            Read::Message(m) => Input::Message(m),
            Read::Malformed(e) => {
                tracing::warn!(peer = %tag.peer, error = %e, "malformed message from peer");
                Input::Malformed(e)
            }
            Read::Closed => Input::TcpClosed,
        };
        self.drive(tag.peer, second, input);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if self
            .listen_failed_at
            .is_some_and(|t| now.duration_since(t) >= LISTEN_RETRY)
        {
            self.ensure_listener();
            self.sync_md5();
        }
        for addr in self.peers.keys().copied().collect::<Vec<_>>() {
            for second in [false, true] {
                if self.conn_progressed(addr, second) {
                    self.drive(addr, second, Input::SendProgress);
                }
            }
            self.drive(addr, false, Input::Tick);
            if self.peers[&addr].second.is_some() {
                self.drive(addr, true, Input::Tick);
            }
            let p = self.peers.get_mut(&addr).expect("present");
            if p.stale.as_ref().is_some_and(|s| s.expired(now)) {
                tracing::info!(peer = %addr, "graceful restart time passed; removing the peer's stale routes");
                p.stale = None;
                self.rib.sweep_stale(p.id);
            }
        }
        let converged = self.started.elapsed() >= STARTUP_GRACE
            || self.peers.values().all(|p| {
                p.eor_received
                    || p.cfg.node.is_none() && p.negotiated.is_none() && p.last_error.is_some()
            });
        self.shared
            .converged
            .store(converged, std::sync::atomic::Ordering::Relaxed);
    }

    /// Feeds one input to a connection's FSM and carries out the outputs.
    fn drive(&mut self, addr: IpAddr, second: bool, input: Input) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let c = if second {
            match p.second.as_mut() {
                Some(c) => c,
                None => return,
            }
        } else {
            &mut p.main
        };
        let outs = c.fsm.handle(now, input);
        for o in outs {
            self.output(addr, second, o);
        }
        if let Some((notification, idle_hold)) =
            self.peers.get_mut(&addr).and_then(|p| p.reset.take())
        {
            self.drive(
                addr,
                false,
                Input::Reset {
                    notification,
                    idle_hold,
                },
            );
        }
        self.resolve_collision(addr);
    }

    fn output(&mut self, addr: IpAddr, second: bool, o: Output) {
        match o {
            Output::Established(n) => return self.established(addr, n),
            Output::Update(u) => return self.update(addr, *u),
            Output::Down(reason) if !second => return self.down(addr, reason),
            _ => {}
        }
        let ibgp = self
            .peers
            .get(&addr)
            .is_some_and(|p| p.cfg.asn == self.cfg.asn);
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let ttl = self.cfg.ttl_policy(&p.cfg);
        let local = p.cfg.options.bind_source.then_some(self.cfg.address);
        let ctx = ctx_for(p.negotiated.as_ref(), ibgp);
        if let Output::RouteRefresh { .. } = o {
            return self.rib.refresh(p.id);
        }
        if let Output::Down(_) = o {
            p.second = None;
            return;
        }
        let conn = if second {
            p.second.as_mut()
        } else {
            Some(&mut p.main)
        };
        let Some(c) = conn else { return };
        match o {
            Output::Connect if !second => {
                p.connecting += 1;
                c.outgoing = true;
                let gen = p.connecting;
                let opts = ConnectOptions {
                    local,
                    peer: SocketAddr::new(addr, p.cfg.port),
                    password: p.cfg.options.password.clone(),
                    ttl,
                };
                let events = self.events.clone();
                tokio::spawn(async move {
                    let ev = match net::connect(&opts).await {
                        Ok(s) => Event::Connected(addr, gen, s),
                        Err(e) => Event::ConnectFailed(addr, gen, e.to_string()),
                    };
                    // An error means the speaker stopped: nobody to tell.
                    let _ = events.send(ev).await;
                });
            }
            Output::Send(m) => {
                let notification = matches!(m, Message::Notification(_));
                if notification {
                    p.counters.notifications_out += 1;
                }
                // A NOTIFICATION ends the session anyway; a full queue on the main connection
                // resets it.
                if let Some(full) = c.send(m.encode(ctx)) {
                    if !notification && !second {
                        p.reset.get_or_insert((full, CONNECT_RETRY));
                    }
                }
            }
            Output::Close => c.tx = None,
            _ => {}
        }
    }

    /// RFC 4271 §6.8: with two connections and the peer's identifier known, keep the one opened
    /// by the side with the higher identifier.
    fn resolve_collision(&mut self, addr: IpAddr) {
        let Some(p) = self.peers.get_mut(&addr) else {
            return;
        };
        let Some(s) = &p.second else { return };
        if p.main.fsm.state() == State::Established {
            self.drive(
                addr,
                true,
                Input::Stop(cease(subcode::CONNECTION_COLLISION)),
            );
            return;
        }
        let Some(remote) = p.main.fsm.peer_id().or(s.fsm.peer_id()) else {
            return;
        };
        let outgoing_wins = keep_outgoing(self.cfg.router_id, remote);
        let second_wins = s.outgoing == outgoing_wins;
        tracing::debug!(peer = %addr, second_wins, "connection collision resolved");
        if second_wins {
            self.drive(
                addr,
                false,
                Input::Stop(cease(subcode::CONNECTION_COLLISION)),
            );
            let p = self.peers.get_mut(&addr).expect("present");
            let mut s = p.second.take().expect("second");
            s.fsm.config.passive = p.main.fsm.config.passive;
            p.main = s;
        } else {
            self.drive(
                addr,
                true,
                Input::Stop(cease(subcode::CONNECTION_COLLISION)),
            );
            if let Some(p) = self.peers.get_mut(&addr) {
                p.second = None;
            }
        }
    }

    fn established(&mut self, addr: IpAddr, n: Negotiated) {
        let local = self.cfg.address;
        let p = self.peers.get_mut(&addr).expect("present");
        let peer_gr = n.peer_graceful_restart.as_ref().map_or("none".into(), |g| {
            let fams: Vec<String> = g
                .families
                .iter()
                .map(|(a, s, f)| format!("{a}/{s} F={}", u8::from(*f)))
                .collect();
            format!(
                "restart {}s, families [{}]",
                g.restart_time,
                fams.join(", ")
            )
        });
        tracing::info!(peer = %addr, asn = n.peer_asn, peer_id = %n.peer_id, hold = n.hold_time, %peer_gr, "BGP session established");
        p.since = now_secs();
        p.last_error = None;
        p.eor_received = false;
        p.over_limit_logged = false;
        p.counters.established += 1;
        self.rib.peer_up(
            p.id,
            PeerInfo {
                asn: n.peer_asn,
                router_id: n.peer_id,
                address: addr,
                local_address: local,
                rr_client: p.cfg.rr_client,
                next_hop: p.cfg.options.next_hop,
                families: n.families.clone(),
                allow_local_as: p.cfg.options.allow_local_as,
                import: p.cfg.options.filters.0.clone(),
                export: p.cfg.options.filters.1.clone(),
                max_prefixes: p.cfg.options.max_prefixes,
            },
        );
        // RFC 4724 §4.2: families the peer no longer preserves lose their stale routes now.
        if let Some(stale) = &mut p.stale {
            for afi in stale.on_reestablished(n.peer_graceful_restart.as_ref()) {
                tracing::info!(peer = %addr, afi, "peer did not preserve forwarding for this family; removing its stale routes");
                self.rib.sweep_stale_family(p.id, afi);
            }
            if stale.is_done() {
                p.stale = None;
            }
        }
        p.negotiated = Some(n);
        // The initial table goes out at the next flush, then End-of-RIB (RFC 4724 §2).
        self.flush();
        let p = self.peers.get_mut(&addr).expect("present");
        if let Some(n) = &p.negotiated {
            for afi in &n.families {
                let eor = Message::Update(Box::new(Update::end_of_rib(*afi)));
                if let Some(full) = p.main.send(eor.encode(ctx_for(Some(n), false))) {
                    p.reset.get_or_insert((full, CONNECT_RETRY));
                }
            }
        }
    }

    fn update(&mut self, addr: IpAddr, u: Update) {
        let p = self.peers.get_mut(&addr).expect("present");
        if let Some(afi) = u.end_of_rib_afi() {
            p.eor_received = true;
            if let Some(stale) = &mut p.stale {
                if stale.end_of_rib(afi) {
                    tracing::info!(peer = %addr, afi, "End-of-RIB after restart; removing stale routes");
                    self.rib.sweep_stale_family(p.id, afi);
                }
                if stale.is_done() {
                    p.stale = None;
                }
            }
            return;
        }
        if let Some(why) = &u.treat_as_withdraw {
            tracing::warn!(peer = %addr, reason = %why, "UPDATE treated as withdraw (RFC 7606)");
            p.last_error = Some(format!("treat-as-withdraw: {why}"));
        }
        for d in &u.discarded {
            tracing::debug!(peer = %addr, attribute = %d, "attribute discarded (RFC 7606)");
        }
        let r = self.rib.apply_update(p.id, &u);
        if let Some((prefix, why)) = r.rejected.first() {
            tracing::debug!(peer = %addr, %prefix, why, count = r.rejected.len(), "routes rejected");
        }
        if r.over_limit > 0 {
            p.counters.over_limit += r.over_limit as u64;
            over_limit(addr, p, r.over_limit_afi.unwrap_or(AFI_IPV4));
        }
    }

    fn down(&mut self, addr: IpAddr, reason: DownReason) {
        let p = self.peers.get_mut(&addr).expect("present");
        let was = p.negotiated.take();
        p.since = now_secs();
        p.last_error = Some(reason.to_string());
        p.main.tx = None;
        let Some(n) = was else { return };
        // RFC 4724 §4.2: only the families the peer listed in its Graceful Restart capability
        // stay (stale) for its restart time, and only if the transport just went away.
        let stale = restart::on_session_loss(&n, &reason, Instant::now());
        let retained = stale.as_ref().map_or(&[][..], |s| &s.families[..]);
        tracing::warn!(peer = %addr, %reason, graceful = stale.is_some(), retained = ?retained, "BGP session down");
        self.rib.peer_down(p.id, retained);
        p.stale = stale;
    }
}

/// A peer announced new prefixes beyond its `maxPrefixes` limit (the RIB kept them only with
/// Warn): log it once per session, or with Restart reset the session with Cease / Maximum
/// Number of Prefixes Reached carrying the family and the limit (RFC 4486 §4).
fn over_limit(addr: IpAddr, p: &mut Peer, afi: u16) {
    let Some(l) = p.cfg.options.max_prefixes else {
        return;
    };
    match l.action {
        LimitAction::Restart => {
            tracing::error!(peer = %addr, limit = l.limit, "peer exceeded its maxPrefixes limit; resetting the session");
            let bound = u32::try_from(l.limit).unwrap_or(u32::MAX);
            let n = Notification::max_prefixes(afi, trellis_bgp::nlri::SAFI_UNICAST, bound);
            p.reset.get_or_insert((n, PREFIX_LIMIT_IDLE_HOLD));
        }
        action if !p.over_limit_logged => {
            p.over_limit_logged = true;
            tracing::warn!(peer = %addr, limit = l.limit, ?action, "peer exceeded its maxPrefixes limit");
        }
        _ => {}
    }
}

/// Whether two peer configurations describe the same session (everything but the label, the
/// filters and the `reachableBy` route, which change without a reset).
fn same_session(a: &PeerConfig, b: &PeerConfig) -> bool {
    let mut a = a.clone();
    a.kind = b.kind;
    a.options.filters = b.options.filters.clone();
    a.reachable_by = b.reachable_by;
    a == *b
}

fn ctx_for(n: Option<&Negotiated>, ibgp: bool) -> Context {
    Context {
        four_octet_as: n.is_none_or(|n| n.four_octet_as),
        ibgp,
    }
}
