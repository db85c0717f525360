//! The agent's Prometheus endpoint (`--metrics-listen`): per-peer BGP session state, prefix
//! counts and message counters, from the speaker's latest status; the pod MTU; and the stored
//! records the agent skips because they do not decode. The same listener serves `/healthz` and
//! `/readyz` (see [`crate::health`]). Does I/O (an HTTP listener).
//!
//! The listener is usually reachable from pods, so its clients are bounded: at most
//! [`MAX_CONNECTIONS`] are open at once (the rest wait in the kernel's accept queue, holding
//! none of the agent's file descriptors), and each is closed [`CONNECTION_DEADLINE`] after it
//! was accepted. Unbounded, idle connections held one descriptor each for good: enough of them
//! left the agent none to accept the CNI plugin's connections or open its datastore.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use trellis_resources::{BgpStatusSpec, Kind};

use crate::Agent;

type Labels = Vec<(String, String)>;

/// Renders the metrics text for a status snapshot; `invalid` counts the stored records of each
/// kind that are currently skipped because they do not decode.
pub fn render(
    status: Option<&BgpStatusSpec>,
    pod_mtu: u32,
    invalid: &BTreeMap<Kind, usize>,
    policy: &crate::policy::Status,
    flows: Option<&crate::flows::FlowLog>,
) -> String {
    let mut reg = Registry::with_prefix("trellis");
    register_policy(&mut reg, policy);
    if let Some(f) = flows {
        register_flows(&mut reg, f);
    }
    let mtu = Gauge::<i64>::default();
    mtu.set(pod_mtu as i64);
    reg.register("pod_mtu", "MTU handed to new pods (0 until measured)", mtu);
    let bad = Family::<Labels, Gauge>::default();
    for kind in Kind::ALL {
        let n = invalid.get(&kind).copied().unwrap_or(0);
        bad.get_or_create(&vec![("kind".into(), kind.name().into())])
            .set(n as i64);
    }
    reg.register(
        "datastore_invalid_records",
        "Stored records skipped because they do not decode (each is logged by key)",
        bad,
    );
    let state = Family::<Labels, Gauge>::default();
    let gauges: [(&str, &str, Family<Labels, Gauge>); 3] = [
        (
            "bgp_prefixes_received",
            "Prefixes the peer announces",
            Family::default(),
        ),
        (
            "bgp_prefixes_accepted",
            "Prefixes accepted from the peer (loop checks passed)",
            Family::default(),
        ),
        (
            "bgp_prefixes_advertised",
            "Prefixes advertised to the peer",
            Family::default(),
        ),
    ];
    let counters: [(&str, &str, Family<Labels, Counter>); 6] = [
        (
            "bgp_updates_received",
            "UPDATE messages received",
            Family::default(),
        ),
        (
            "bgp_updates_sent",
            "UPDATE messages sent",
            Family::default(),
        ),
        (
            "bgp_notifications_received",
            "NOTIFICATION messages received",
            Family::default(),
        ),
        (
            "bgp_notifications_sent",
            "NOTIFICATION messages sent",
            Family::default(),
        ),
        (
            "bgp_established_transitions",
            "Times the session reached Established",
            Family::default(),
        ),
        (
            "bgp_prefixes_over_limit",
            "Announcements of new prefixes beyond the peer's maxPrefixes limit",
            Family::default(),
        ),
    ];
    for p in status.map(|s| s.peers.as_slice()).unwrap_or_default() {
        let peer: Labels = vec![("peer".into(), p.address.clone())];
        let mut full = peer.clone();
        full.push(("asn".into(), p.as_number.to_string()));
        full.push(("type".into(), p.kind.clone()));
        state
            .get_or_create(&full)
            .set((p.state == "Established") as i64);
        gauges[0].2.get_or_create(&peer).set(p.received as i64);
        gauges[1].2.get_or_create(&peer).set(p.accepted as i64);
        gauges[2].2.get_or_create(&peer).set(p.advertised as i64);
        let values = [
            p.updates_received,
            p.updates_sent,
            p.notifications_received,
            p.notifications_sent,
            p.established_transitions,
            p.prefixes_over_limit,
        ];
        for ((_, _, f), v) in counters.iter().zip(values) {
            f.get_or_create(&peer).inc_by(v);
        }
    }
    reg.register(
        "bgp_session_established",
        "1 when the BGP session with the peer is Established",
        state,
    );
    for (name, help, f) in gauges {
        reg.register(name, help, f);
    }
    for (name, help, f) in counters {
        reg.register(name, help, f);
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    out
}

/// The policy applier's series: enforcement, synced revision, repairs, programming latency,
/// and each rule's packets and bytes (labels: policy, direction, rule index).
fn register_policy(reg: &mut Registry, p: &crate::policy::Status) {
    let enforced = Gauge::<i64>::default();
    enforced.set(p.enforced.load(Ordering::Acquire) as i64);
    reg.register(
        "policy_enforced",
        "1 once the policy table is in the kernel and follows the datastore",
        enforced,
    );
    let synced = Gauge::<i64>::default();
    synced.set(p.synced_revision.load(Ordering::Acquire));
    reg.register(
        "policy_synced_revision",
        "The datastore revision the kernel's policy table reflects",
        synced,
    );
    reg.register(
        "policy_drift_repairs",
        "Times the kernel's policy table differed from the expected one and was replaced",
        p.drift_repairs.clone(),
    );
    reg.register(
        "policy_refused_batches",
        "Policy batches nft refused (each followed by a whole-table replace)",
        p.refused.clone(),
    );
    reg.register(
        "policy_programming_seconds",
        "From a policy-relevant change reaching the agent to the kernel holding it",
        p.programming.clone(),
    );
    reg.register(
        "policy_endpoint_ready_seconds",
        "How long CNI ADDs (endpointReady) waited for their pod's policy to be in the kernel",
        p.endpoint_ready.clone(),
    );
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let counters = p.counters.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (label, c) in &counters {
        let l = rule_labels(label);
        packets.get_or_create(&l).inc_by(c.packets);
        bytes.get_or_create(&l).inc_by(c.bytes);
    }
    reg.register(
        "policy_rule_packets",
        "Packets a policy rule matched (read from nft at least every 10th resync and after any nftables change)",
        packets,
    );
    reg.register(
        "policy_rule_bytes",
        "Bytes a policy rule matched (read from nft at least every 10th resync and after any nftables change)",
        bytes,
    );
}

/// The flow log's counters: denied packets per deciding policy (every packet a Deny rule or a
/// default Deny copied — new connections and their retries), and copies it could not record.
fn register_flows(reg: &mut Registry, f: &crate::flows::FlowLog) {
    let denied = Family::<Labels, Counter>::default();
    for (policy, n) in f.denied() {
        denied
            .get_or_create(&vec![("policy".into(), policy.clone())])
            .inc_by(*n);
    }
    reg.register(
        "flow_denied_packets",
        "Packets denied, by the deciding policy (flow logs on)",
        denied,
    );
    let lost = Counter::<u64>::default();
    lost.inc_by(f.lost());
    reg.register(
        "flow_log_lost",
        "Flow-log packet copies not recorded (kernel queue overrun, malformed, over the per-interval bound)",
        lost,
    );
}

/// `policy`, `direction` and `rule` of a rule label (`knp/NS/NAME/in/0`).
fn rule_labels(label: &str) -> Labels {
    match trellis_policy::compile::names::split_label(label) {
        Some((p, d, r)) => vec![
            ("policy".into(), p.into()),
            ("direction".into(), d.into()),
            ("rule".into(), r.into()),
        ],
        None => vec![("policy".into(), label.into())],
    }
}

/// Serves `/metrics` until the agent stops.
/// Metrics connections open at once (a Prometheus server needs one).
pub const MAX_CONNECTIONS: usize = 16;
/// How long a metrics connection stays open (a scrape takes milliseconds).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);

/// A listener that accepts only while fewer than [`MAX_CONNECTIONS`] are open.
struct Bounded {
    inner: TcpListener,
    places: Arc<Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Limited;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Limited, SocketAddr) {
        let place = self
            .places
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let deadline = Box::pin(tokio::time::sleep(CONNECTION_DEADLINE));
        (
            Limited {
                io,
                deadline,
                _place: place,
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: frees its place when dropped, and fails its reads and writes once
/// its deadline has passed (so the server closes it, idle or not).
struct Limited {
    io: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _place: OwnedSemaphorePermit,
}

impl Limited {
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "metrics connection open too long",
            )
        })
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if let Some(e) = self.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

pub async fn serve(agent: Arc<Agent>, addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving metrics");
    serve_on(agent, listener).await
}

/// Serves metrics on a bound listener (see the module docs for the bounds).
async fn serve_on(agent: Arc<Agent>, listener: TcpListener) -> std::io::Result<()> {
    let listener = Bounded {
        inner: listener,
        places: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let (live, ready) = (agent.clone(), agent.clone());
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let agent = agent.clone();
            async move {
                let status = agent.bgp.status.borrow().clone();
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(
                        status.as_ref(),
                        agent.pod_mtu.load(Ordering::Relaxed),
                        &trellis_cluster::invalid::counts(),
                        &agent.policy,
                        agent
                            .flows
                            .as_ref()
                            .map(|f| f.lock().unwrap_or_else(|e| e.into_inner()))
                            .as_deref(),
                    ),
                )
            }
        }),
    );
    let app = app
        .route("/healthz", get(move || health(live.clone(), true)))
        .route("/readyz", get(move || health(ready.clone(), false)));
    axum::serve(listener, app).await
}

/// `/healthz` (`liveness_only`) or `/readyz`: 200 when every check passes, else 503; the body
/// lists the checks ([`trellis_agent_api::HealthReport::text`]), naming the failing ones.
async fn health(agent: Arc<Agent>, liveness_only: bool) -> impl axum::response::IntoResponse {
    let report = agent.health_report();
    let ok = if liveness_only {
        report.live
    } else {
        report.ready
    };
    let code = if ok {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [("content-type", "text/plain; charset=utf-8")],
        report.text(liveness_only),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resources::BgpSessionStatus;

    #[test]
    fn per_peer_series() {
        let s = BgpStatusSpec {
            peers: vec![BgpSessionStatus {
                address: "192.0.2.1".into(),
                as_number: 65001,
                kind: "global".into(),
                state: "Established".into(),
                received: 3,
                accepted: 2,
                advertised: 1,
                updates_received: 7,
                ..Default::default()
            }],
            ..Default::default()
        };
        let invalid = BTreeMap::from([(Kind::IpPool, 2)]);
        let policy = crate::policy::Status::default();
        policy.enforced.store(true, Ordering::Relaxed);
        policy.synced_revision.store(42, Ordering::Relaxed);
        policy.drift_repairs.inc();
        policy.counters.lock().unwrap().insert(
            "knp/x/np/in/0".into(),
            trellis_policy::compile::drift::RuleCounter {
                packets: 3,
                bytes: 180,
            },
        );
        let mut flows = crate::flows::FlowLog::new("n1", Default::default(), 0);
        let denied = trellis_dataplane::nflog::LoggedPacket {
            prefix: "deny gnp/quarantine/in/0".into(),
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            protocol: 6,
            src_port: Some(1),
            dst_port: Some(80),
            icmp: None,
        };
        let resolve = |ip| trellis_agent_api::flows::FlowPeer::External { address: ip };
        flows.observe(1, &denied, &resolve);
        flows.observe(2, &denied, &resolve);
        flows.lose(3);
        let text = render(Some(&s), 1450, &invalid, &policy, Some(&flows));
        for line in [
            "trellis_flow_denied_packets_total{policy=\"gnp/quarantine\"} 2",
            "trellis_flow_log_lost_total 3",
            "trellis_policy_enforced 1",
            "trellis_policy_synced_revision 42",
            "trellis_policy_drift_repairs_total 1",
            "trellis_policy_rule_packets_total{policy=\"knp/x/np\",direction=\"in\",rule=\"0\"} 3",
            "trellis_policy_rule_bytes_total{policy=\"knp/x/np\",direction=\"in\",rule=\"0\"} 180",
            "trellis_policy_programming_seconds_count 0",
            "trellis_policy_endpoint_ready_seconds_count 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}\n{text}");
        }
        assert!(text.contains("trellis_bgp_session_established{peer=\"192.0.2.1\",asn=\"65001\",type=\"global\"} 1"), "{text}");
        assert!(
            text.contains("trellis_bgp_prefixes_accepted{peer=\"192.0.2.1\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("trellis_bgp_updates_received_total{peer=\"192.0.2.1\"} 7"),
            "{text}"
        );
        assert!(text.contains("trellis_pod_mtu 1450"), "{text}");
        assert!(
            text.contains("trellis_datastore_invalid_records{kind=\"IPPool\"} 2")
                && text.contains("trellis_datastore_invalid_records{kind=\"Node\"} 0"),
            "{text}"
        );
    }
}
