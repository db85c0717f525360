//! Flow logs: each packet a deciding policy rule copies to the NFLOG group (the first packet
//! of a new connection — established traffic is accepted before any policy rule) becomes one
//! observation of a flow (source, destination, protocol, port, verdict, deciding rule),
//! aggregated per interval like Calico's flow logs, and kept bounded: at most
//! [`FlowSettings::max_open`] distinct flows per interval (more are counted as lost) and the
//! last [`FlowSettings::max_records`] closed records. The aggregation ([`FlowLog`]) is pure;
//! [`run`] is the shell: a blocking thread reading the NFLOG socket in the agent's network
//! namespace, never in the packet path (the kernel queues the copies and sends them batched).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_agent_api::flows::{FlowKey, FlowPeer, FlowQuery, FlowRecord, FlowVerdict, Flows};
use trellis_dataplane::nflog::{LoggedPacket, NflogSocket};
use trellis_policy::compile::names::{parse_flow_log_prefix, split_label};
use trellis_resources::{Kind, Resource};

use crate::view::SharedView;

/// Flow-log settings (`trellis agent --flow-logs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowSettings {
    /// The NFLOG group the policy rules copy to.
    pub group: u16,
    /// The aggregation interval.
    pub interval: Duration,
    /// Distinct flows per interval kept; more are counted as lost.
    pub max_open: usize,
    /// Closed records kept for queries.
    pub max_records: usize,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            group: 20,
            interval: Duration::from_secs(5),
            max_open: 20_000,
            max_records: 20_000,
        }
    }
}

/// Records one reply carries at most; the client pages through the rest.
pub const MAX_REPLY_RECORDS: usize = 5_000;

/// One interval's aggregate of a flow.
#[derive(Debug, Clone, Copy)]
struct Open {
    packets: u64,
}

/// The aggregation (pure): observations in, closed records out.
#[derive(Debug)]
pub struct FlowLog {
    node: String,
    settings: FlowSettings,
    /// The current interval's start (Unix ms).
    start: u64,
    open: HashMap<FlowKey, Open>,
    closed: VecDeque<FlowRecord>,
    next_seq: u64,
    lost: u64,
    /// Denied packets per deciding policy, since the agent started (a metric).
    denied: BTreeMap<String, u64>,
}

impl FlowLog {
    pub fn new(node: &str, settings: FlowSettings, now_ms: u64) -> FlowLog {
        FlowLog {
            node: node.to_string(),
            settings,
            start: now_ms,
            open: HashMap::new(),
            closed: VecDeque::new(),
            next_seq: 0,
            lost: 0,
            denied: BTreeMap::new(),
        }
    }

    /// Counts one logged packet; `resolve` names an address's owner. A packet whose prefix is
    /// not one of Trellis's (another rule logging to the same group) is counted as lost.
    pub fn observe(&mut self, now_ms: u64, p: &LoggedPacket, resolve: &dyn Fn(IpAddr) -> FlowPeer) {
        self.tick(now_ms);
        let Some(key) = key_of(p, resolve) else {
            self.lost += 1;
            return;
        };
        if key.verdict == FlowVerdict::Denied {
            *self.denied.entry(key.policy.clone()).or_default() += 1;
        }
        let full = self.open.len() >= self.settings.max_open;
        match self.open.get_mut(&key) {
            Some(o) => o.packets += 1,
            None if full => self.lost += 1,
            None => {
                self.open.insert(key, Open { packets: 1 });
            }
        }
    }

    /// Counts copies lost before they reached the agent (kernel queue overrun, malformed).
    pub fn lose(&mut self, n: u64) {
        self.lost += n;
    }

    /// Closes the interval when it is over.
    pub fn tick(&mut self, now_ms: u64) {
        let len = self.settings.interval.as_millis() as u64;
        if now_ms < self.start + len {
            return;
        }
        let end = now_ms.min(self.start + len);
        let mut keys: Vec<(FlowKey, Open)> = self.open.drain().collect();
        keys.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, o) in keys {
            self.next_seq += 1;
            self.closed.push_back(FlowRecord {
                seq: Some(self.next_seq),
                node: self.node.clone(),
                start: self.start,
                end,
                key,
                packets: o.packets,
            });
        }
        while self.closed.len() > self.settings.max_records {
            self.closed.pop_front();
        }
        // Intervals without traffic are skipped, not recorded.
        self.start = if now_ms >= end + len { now_ms } else { end };
    }

    /// The records a query selects, oldest first, at most [`MAX_REPLY_RECORDS`]: `next` is
    /// where the next page starts (the last record considered), and the interval still open
    /// comes (when asked for) only with the last page.
    pub fn query(&self, q: &FlowQuery, now_ms: u64) -> Flows {
        let selected = |k: &FlowKey| {
            q.verdict.is_none_or(|v| v == k.verdict)
                && q.namespace.as_deref().is_none_or(|ns| {
                    [&k.source, &k.destination]
                        .iter()
                        .any(|p| matches!(p, FlowPeer::Pod { namespace, .. } if namespace == ns))
                })
        };
        let after = q.after.unwrap_or(0);
        let mut records = Vec::new();
        let mut next = self.next_seq;
        let mut scanned = after;
        for r in self.closed.iter() {
            let seq = r.seq.unwrap_or(0);
            if seq <= after {
                continue;
            }
            if selected(&r.key) {
                if records.len() == MAX_REPLY_RECORDS {
                    next = scanned;
                    break;
                }
                records.push(r.clone());
            }
            scanned = seq;
        }
        let last_page = next == self.next_seq;
        if q.open && last_page {
            let mut open: Vec<FlowRecord> = self
                .open
                .iter()
                .filter(|(k, _)| selected(k))
                .map(|(k, o)| FlowRecord {
                    seq: None,
                    node: self.node.clone(),
                    start: self.start,
                    end: now_ms.max(self.start),
                    key: k.clone(),
                    packets: o.packets,
                })
                .collect();
            open.sort_by(|a, b| a.key.cmp(&b.key));
            records.extend(open);
        }
        Flows {
            records,
            next,
            more: !last_page,
            enabled: true,
            lost: self.lost,
        }
    }

    /// Denied packets per deciding policy since the agent started.
    pub fn denied(&self) -> &BTreeMap<String, u64> {
        &self.denied
    }

    pub fn lost(&self) -> u64 {
        self.lost
    }
}

/// A packet's flow key; `None` when its prefix is not a Trellis flow-log prefix.
fn key_of(p: &LoggedPacket, resolve: &dyn Fn(IpAddr) -> FlowPeer) -> Option<FlowKey> {
    let (allowed, label) = parse_flow_log_prefix(&p.prefix)?;
    let (policy, dir, rule) = split_label(label)?;
    Some(FlowKey {
        source: resolve(p.src),
        destination: resolve(p.dst),
        protocol: p.protocol,
        port: p.dst_port.or(p.icmp.map(|(t, _)| u16::from(t))),
        verdict: if allowed {
            FlowVerdict::Allowed
        } else {
            FlowVerdict::Denied
        },
        direction: match dir {
            "in" => "ingress",
            _ => "egress",
        }
        .to_string(),
        policy: policy.to_string(),
        rule: rule.to_string(),
    })
}

/// Who holds each address, from the agent's view of WorkloadEndpoints and Nodes.
#[derive(Debug, Default)]
pub struct Resolver {
    owners: HashMap<IpAddr, FlowPeer>,
    /// The view generations of the kinds it was built from.
    built_from: Option<(u64, u64)>,
}

impl Resolver {
    /// Rebuilds the map when endpoints or nodes changed since it was built (a rebuild costs one
    /// pass over them; it happens at most once per batch of packets read).
    pub fn refresh(&mut self, view: &SharedView) {
        let v = view.read();
        let generations = (
            v.generation(Kind::WorkloadEndpoint),
            v.generation(Kind::Node),
        );
        if self.built_from == Some(generations) {
            return;
        }
        self.owners.clear();
        for s in v.stored(Kind::Node) {
            if let Resource::Node(n) = &s.resource {
                for a in &n.spec.addresses {
                    let ip = a.address.split('/').next().unwrap_or_default();
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        let name = n.metadata.name.clone();
                        self.owners.insert(ip, FlowPeer::Node { name });
                    }
                }
            }
        }
        for s in v.stored(Kind::WorkloadEndpoint) {
            if let Resource::WorkloadEndpoint(w) = &s.resource {
                let namespace = w.metadata.namespace.clone().unwrap_or_default();
                let name = w
                    .spec
                    .pod
                    .clone()
                    .unwrap_or_else(|| w.metadata.name.clone());
                for net in &w.spec.ip_networks {
                    self.owners.insert(
                        net.addr(),
                        FlowPeer::Pod {
                            namespace: namespace.clone(),
                            name: name.clone(),
                        },
                    );
                }
            }
        }
        self.built_from = Some(generations);
    }

    pub fn resolve(&self, ip: IpAddr) -> FlowPeer {
        self.owners
            .get(&ip)
            .cloned()
            .unwrap_or(FlowPeer::External { address: ip })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the NFLOG group until `stop` is set, feeding `log`. Runs on a thread of its own (the
/// socket read blocks up to a second). Fails only when the group cannot be bound.
pub fn run(
    settings: &FlowSettings,
    log: Arc<Mutex<FlowLog>>,
    view: Arc<SharedView>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    bound: impl FnOnce(),
) -> Result<(), trellis_dataplane::DataplaneError> {
    let mut sock = NflogSocket::open(settings.group, Duration::from_secs(1))?;
    bound();
    tracing::info!(group = settings.group, "flow logs: reading the NFLOG group");
    let mut resolver = Resolver::default();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let batch = match sock.read() {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "flow logs: reading the NFLOG group");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        if !batch.packets.is_empty() {
            resolver.refresh(&view);
        }
        let now = now_ms();
        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
        l.lose(batch.malformed as u64 + u64::from(batch.overrun));
        for p in &batch.packets {
            l.observe(now, p, &|ip| resolver.resolve(ip));
        }
        l.tick(now);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
