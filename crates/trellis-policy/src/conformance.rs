//! Conformance cases as data (pure, no I/O): the suites in `conformance/kubernetes.yaml`
//! (Kubernetes' e2e `network_policy.go`, transcribed), `conformance/calico.yaml` (Calico's
//! model) and `conformance/cluster.yaml` (sig-network's ClusterNetworkPolicy tests), parsed and
//! checked, their documents resolved against the pods' addresses, and their
//! expectations expanded into truth tables. The evaluator test replays every case against the
//! model; the lab replays it with real traffic.
//!
//! # The format
//!
//! ```yaml
//! model:                     # every pod in every namespace
//!   namespaces: [{name: x, labels: {ns: x}}, {name: y, labels: {ns: y}}]
//!   pods: [{name: a, labels: {pod: a}, serviceAccount: alpha}, {name: b, labels: {pod: b}}]
//!   ports: [80, 81]          # each pod serves each port on each of `protocols`
//!   protocols: [TCP, UDP]    # (the default) and declares the named port serve-80-tcp, ...
//! cases:
//! - name: should support a 'default-deny-ingress' policy
//!   source: where it comes from
//!   skip: why it cannot run here        # optional: the case is listed, not replayed
//!   steps:                   # in order; within a step: delete, apply, labelNamespace,
//!   - apply: |               # labelPod, profilePod, then the probes
//!       apiVersion: networking.k8s.io/v1
//!       kind: NetworkPolicy
//!       ...
//!     delete: |              # documents to delete (kind, namespace and name matter)
//!       ...
//!     labelNamespace: {name: y, labels: {ns: y, extra: "1"}}     # replaces its labels
//!     labelPod: {namespace: x, name: b, labels: {pod: b, new: "1"}} # replaces its labels
//!     profilePod: {namespace: x, name: a, profiles: [p1]}      # replaces its profiles
//!     probes:
//!     - port: 80             # none for ICMP (an echo request)
//!       protocol: TCP        # TCP, UDP, SCTP or ICMP
//!       expect:              # like the e2e `Reachability`: a default for every pair,
//!         default: true      # then overrides applied in order (a later one wins)
//!         peers:
//!         - {from: {}, to: {namespace: x}, reach: false}   # a missing namespace/pod = any
//! ```
//!
//! `Expect(from, to)` of the e2e suite is a peer rule naming both pods, `ExpectAllIngress(p)`
//! is `{from: {}, to: p}`, `ExpectAllEgress(p)` is `{from: p, to: {}}`. A pod to itself is never
//! compared (the e2e suite ignores loopback too).
//!
//! Documents may refer to pod addresses the lab only knows at run time, inside any string:
//! `$(ip x/a)` is pod x/a's address; `$(cidr x/a)` its host CIDR (`/32`, or `/128` for IPv6,
//! the e2e `hostMask`); `$(cidr x/a/4)` the `/4` network holding it (host bits cleared, the
//! e2e `makeLargeCIDRForIP`). [`resolve`] replaces them; [`parse`] already checks that each is
//! well formed and names a model pod.

mod placeholder;
mod table;
#[cfg(test)]
mod tests;
mod world;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use placeholder::resolve;
pub use table::{Cell, Difference, TruthTable};
pub use world::{Change, PodState, World};

use placeholder::check_placeholders;

use crate::model::Labels;

/// Most cases in a suite, steps in a case and probes in a step (the files are ours, but a
/// parser of input bounds what it builds).
pub const MAX_CASES: usize = 500;
pub const MAX_STEPS: usize = 20;
pub const MAX_PROBES: usize = 20;
/// Most namespaces and pods per namespace in a model (the e2e model is 3 × 3).
pub const MAX_NAMESPACES: usize = 16;
pub const MAX_PODS: usize = 16;

/// What can be wrong with a suite, a reference or a truth table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConformanceError {
    /// Not YAML, too large or too deep (the bounded parser's error).
    #[error("{field}: {reason}")]
    Syntax { field: String, reason: String },
    /// A field is not usable: `field` names it (`cases[3].steps[0].probes[1].port`), `value`
    /// is the offending value as written.
    #[error("{field} {value}: {reason}")]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    /// A document refers to a pod whose address is not known.
    #[error("no address for pod {pod}")]
    NoAddress { pod: String },
    /// A truth table's text is not a table.
    #[error("truth table line {line}: {reason}")]
    Table { line: usize, reason: String },
}

fn invalid(
    field: impl Into<String>,
    value: impl fmt::Debug,
    reason: impl Into<String>,
) -> ConformanceError {
    ConformanceError::Invalid {
        field: field.into(),
        value: format!("{value:?}"),
        reason: reason.into(),
    }
}

/// A pod of the model: namespace and name, written `x/a`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl PodRef {
    pub fn new(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl std::str::FromStr for PodRef {
    type Err = String;

    fn from_str(s: &str) -> Result<PodRef, String> {
        match s.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                Ok(PodRef::new(ns, pod))
            }
            _ => Err(format!("{s:?} is not NAMESPACE/POD")),
        }
    }
}

/// Pod addresses, as the lab (or a test) assigned them.
pub type Addresses = BTreeMap<PodRef, IpAddr>;

/// The protocol a probe uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProbeProtocol {
    Tcp,
    Udp,
    Sctp,
    /// An ICMP (ICMPv6 for IPv6) echo request; no port.
    Icmp,
}

impl ProbeProtocol {
    /// Lower case, as named ports and the CLI write it.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeProtocol::Tcp => "tcp",
            ProbeProtocol::Udp => "udp",
            ProbeProtocol::Sctp => "sctp",
            ProbeProtocol::Icmp => "icmp",
        }
    }
}

impl fmt::Display for ProbeProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn tcp_udp() -> Vec<ProbeProtocol> {
    vec![ProbeProtocol::Tcp, ProbeProtocol::Udp]
}

/// A namespace of the model and its labels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelNamespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// A pod the model runs in every namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPod {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// The pods every case of a suite runs against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConformanceModel {
    pub namespaces: Vec<ModelNamespace>,
    pub pods: Vec<ModelPod>,
    pub ports: Vec<u16>,
    #[serde(default = "tcp_udp")]
    pub protocols: Vec<ProbeProtocol>,
}

impl ConformanceModel {
    /// Every pod, namespaces in order and pods in order within each: the rows (and columns)
    /// of the truth tables.
    pub fn pods(&self) -> Vec<PodRef> {
        self.namespaces
            .iter()
            .flat_map(|ns| self.pods.iter().map(|p| PodRef::new(&ns.name, &p.name)))
            .collect()
    }

    fn has_pod(&self, p: &PodRef) -> bool {
        self.namespaces.iter().any(|n| n.name == p.namespace)
            && self.pods.iter().any(|q| q.name == p.name)
    }

    /// The ports every pod declares and serves: (name, protocol, port), the e2e suite's
    /// container port names `serve-80-tcp`.
    pub fn named_ports(&self) -> Vec<(String, ProbeProtocol, u16)> {
        self.ports
            .iter()
            .flat_map(|port| {
                self.protocols
                    .iter()
                    .filter(|p| **p != ProbeProtocol::Icmp)
                    .map(move |proto| (format!("serve-{port}-{proto}"), *proto, *port))
            })
            .collect()
    }
}

/// A peer matcher: a missing namespace or pod matches every one (the e2e `Peer`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

impl Peer {
    pub fn matches(&self, p: &PodRef) -> bool {
        self.namespace.as_ref().is_none_or(|n| *n == p.namespace)
            && self.pod.as_ref().is_none_or(|n| *n == p.name)
    }
}

/// One override of an expectation: every pair matching `from` and `to` gets `reach`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerRule {
    pub from: Peer,
    pub to: Peer,
    pub reach: bool,
}

/// An expected truth table: a default for every pair, then overrides in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    pub default: bool,
    #[serde(default)]
    pub peers: Vec<PeerRule>,
}

impl Expectation {
    /// The truth table over `pods` (rows and columns in that order): the default everywhere,
    /// then each override in order, a later one overwriting an earlier one, exactly as the e2e
    /// `Reachability.ExpectPeer` does. A pod to itself is [`Cell::Skip`] (never compared).
    pub fn table(&self, pods: &[PodRef]) -> TruthTable {
        let names: Vec<String> = pods.iter().map(PodRef::to_string).collect();
        let mut t = TruthTable::new(names.clone(), names, Cell::from_bool(self.default));
        for rule in &self.peers {
            for from in pods.iter().filter(|p| rule.from.matches(p)) {
                for to in pods.iter().filter(|p| rule.to.matches(p)) {
                    t.set(
                        &from.to_string(),
                        &to.to_string(),
                        Cell::from_bool(rule.reach),
                    );
                }
            }
        }
        for p in pods {
            let n = p.to_string();
            t.set(&n, &n, Cell::Skip);
        }
        t
    }
}

/// One probe of every ordered pair of pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub protocol: ProbeProtocol,
    pub expect: Expectation,
}

/// `labelNamespace`: the namespace's labels become exactly these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceLabels {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// `labelPod`: the pod's labels become exactly these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodLabels {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// `profilePod`: the pod's (its WorkloadEndpoint's) profiles become exactly these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodProfiles {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub profiles: Vec<String>,
}

/// A step as written: documents as YAML text.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStep {
    #[serde(default)]
    delete: Option<String>,
    #[serde(default)]
    apply: Option<String>,
    #[serde(default)]
    label_namespace: Option<NamespaceLabels>,
    #[serde(default)]
    label_pod: Option<PodLabels>,
    #[serde(default)]
    profile_pod: Option<PodProfiles>,
    #[serde(default)]
    probes: Vec<Probe>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    skip: Option<String>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuite {
    model: ConformanceModel,
    cases: Vec<RawCase>,
}

/// One step of a case: what changes (in this order: delete, apply, labelNamespace, labelPod,
/// profilePod), then the probes.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Documents to delete, as parsed (placeholders unresolved: see [`resolve`]).
    pub delete: Vec<Value>,
    /// Documents to apply, as parsed (placeholders unresolved).
    pub apply: Vec<Value>,
    pub label_namespace: Option<NamespaceLabels>,
    pub label_pod: Option<PodLabels>,
    pub profile_pod: Option<PodProfiles>,
    pub probes: Vec<Probe>,
}

/// A case: a name, where it comes from, and its steps; `skip` says why it cannot run here.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub name: String,
    pub source: Option<String>,
    pub skip: Option<String>,
    pub steps: Vec<Step>,
}

/// A parsed and checked suite.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    pub model: ConformanceModel,
    pub cases: Vec<Case>,
}

/// Parses and checks a suite: bounded like every resource file, unknown fields refused, every
/// namespace, pod and placeholder a case names is one of the model's, every document parsed.
pub fn parse(text: &str) -> Result<Suite, ConformanceError> {
    let docs =
        trellis_resources::yaml::parse_values(text).map_err(|e| ConformanceError::Syntax {
            field: e.field.clone(),
            reason: e.to_string(),
        })?;
    let [doc] = docs.as_slice() else {
        return Err(invalid(
            "document",
            docs.len(),
            "a suite is one YAML document",
        ));
    };
    let raw: RawSuite =
        serde_path_to_error::deserialize(doc).map_err(|e| ConformanceError::Syntax {
            field: e.path().to_string(),
            reason: e.inner().to_string(),
        })?;
    check_model(&raw.model)?;
    if raw.cases.len() > MAX_CASES {
        return Err(invalid(
            "cases",
            raw.cases.len(),
            format!("at most {MAX_CASES}"),
        ));
    }
    let mut cases: Vec<Case> = Vec::with_capacity(raw.cases.len());
    for (i, c) in raw.cases.into_iter().enumerate() {
        let field = format!("cases[{i}]");
        if cases.iter().any(|d| d.name == c.name) {
            return Err(invalid(
                format!("{field}.name"),
                &c.name,
                "used by an earlier case",
            ));
        }
        cases.push(check_case(&raw.model, &field, c)?);
    }
    Ok(Suite {
        model: raw.model,
        cases,
    })
}

fn check_model(m: &ConformanceModel) -> Result<(), ConformanceError> {
    if m.namespaces.is_empty() || m.namespaces.len() > MAX_NAMESPACES {
        return Err(invalid(
            "model.namespaces",
            m.namespaces.len(),
            format!("1 to {MAX_NAMESPACES}"),
        ));
    }
    if m.pods.is_empty() || m.pods.len() > MAX_PODS {
        return Err(invalid(
            "model.pods",
            m.pods.len(),
            format!("1 to {MAX_PODS}"),
        ));
    }
    for (i, n) in m.namespaces.iter().enumerate() {
        if m.namespaces[..i].iter().any(|o| o.name == n.name) {
            return Err(invalid(
                format!("model.namespaces[{i}].name"),
                &n.name,
                "listed twice",
            ));
        }
        name(&format!("model.namespaces[{i}].name"), &n.name)?;
    }
    for (i, p) in m.pods.iter().enumerate() {
        if m.pods[..i].iter().any(|o| o.name == p.name) {
            return Err(invalid(
                format!("model.pods[{i}].name"),
                &p.name,
                "listed twice",
            ));
        }
        name(&format!("model.pods[{i}].name"), &p.name)?;
    }
    if m.ports.contains(&0) {
        return Err(invalid("model.ports", &m.ports, "ports are 1-65535"));
    }
    Ok(())
}

/// A namespace or pod name: a DNS label (it is also part of `x/a` and of placeholders).
fn name(field: &str, n: &str) -> Result<(), ConformanceError> {
    let ok = (1..=63).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !n.starts_with('-')
        && !n.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            n,
            "must be a DNS label (1-63 lower-case letters, digits, '-')",
        ))
    }
}

fn check_case(m: &ConformanceModel, field: &str, c: RawCase) -> Result<Case, ConformanceError> {
    if c.name.trim().is_empty() {
        return Err(invalid(
            format!("{field}.name"),
            &c.name,
            "must not be empty",
        ));
    }
    if c.steps.is_empty() && c.skip.is_none() {
        return Err(invalid(
            format!("{field}.steps"),
            0,
            "a case that is not skipped has steps",
        ));
    }
    if c.steps.len() > MAX_STEPS {
        return Err(invalid(
            format!("{field}.steps"),
            c.steps.len(),
            format!("at most {MAX_STEPS}"),
        ));
    }
    let skipped = c.skip.is_some();
    let steps = c
        .steps
        .into_iter()
        .enumerate()
        .map(|(j, s)| check_step(m, &format!("{field}.steps[{j}]"), s, skipped))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Case {
        name: c.name,
        source: c.source,
        skip: c.skip,
        steps,
    })
}

/// `skipped`: the case is listed but not replayed, so its probes may use a protocol the model's
/// pods do not serve (the e2e SCTP cases).
fn check_step(
    m: &ConformanceModel,
    field: &str,
    s: RawStep,
    skipped: bool,
) -> Result<Step, ConformanceError> {
    let docs = |what: &str, text: &Option<String>| -> Result<Vec<Value>, ConformanceError> {
        let Some(text) = text else {
            return Ok(Vec::new());
        };
        let f = format!("{field}.{what}");
        let docs =
            trellis_resources::yaml::parse_values(text).map_err(|e| ConformanceError::Syntax {
                field: f.clone(),
                reason: e.to_string(),
            })?;
        for (k, d) in docs.iter().enumerate() {
            let f = format!("{f} document {}", k + 1);
            doc_key(&f, d)?;
            check_placeholders(m, &f, d)?;
        }
        Ok(docs)
    };
    let step = Step {
        delete: docs("delete", &s.delete)?,
        apply: docs("apply", &s.apply)?,
        label_namespace: s.label_namespace,
        label_pod: s.label_pod,
        profile_pod: s.profile_pod,
        probes: s.probes,
    };
    if let Some(l) = &step.label_namespace {
        if !m.namespaces.iter().any(|n| n.name == l.name) {
            return Err(invalid(
                format!("{field}.labelNamespace.name"),
                &l.name,
                "not a model namespace",
            ));
        }
    }
    let pod = |what: &str, ns: &str, n: &str| {
        let p = PodRef::new(ns, n);
        if m.has_pod(&p) {
            Ok(())
        } else {
            Err(invalid(
                format!("{field}.{what}"),
                p.to_string(),
                "not a model pod",
            ))
        }
    };
    if let Some(l) = &step.label_pod {
        pod("labelPod", &l.namespace, &l.name)?;
    }
    if let Some(l) = &step.profile_pod {
        pod("profilePod", &l.namespace, &l.name)?;
    }
    if step.probes.len() > MAX_PROBES {
        return Err(invalid(
            format!("{field}.probes"),
            step.probes.len(),
            format!("at most {MAX_PROBES}"),
        ));
    }
    for (k, p) in step.probes.iter().enumerate() {
        check_probe(m, &format!("{field}.probes[{k}]"), p, skipped)?;
    }
    Ok(step)
}

fn check_probe(
    m: &ConformanceModel,
    field: &str,
    p: &Probe,
    skipped: bool,
) -> Result<(), ConformanceError> {
    match (p.protocol, p.port) {
        (ProbeProtocol::Icmp, Some(port)) => {
            return Err(invalid(
                format!("{field}.port"),
                port,
                "an ICMP probe has no port",
            ))
        }
        (ProbeProtocol::Icmp, None) => {}
        (proto, None) => {
            return Err(invalid(
                format!("{field}.port"),
                "",
                format!("a {proto} probe needs a port"),
            ))
        }
        (proto, Some(port)) => {
            if !m.ports.contains(&port) || !(skipped || m.protocols.contains(&proto)) {
                return Err(invalid(
                    format!("{field}.port"),
                    port,
                    format!("the model's pods serve {:?} on {:?}", m.ports, m.protocols),
                ));
            }
        }
    }
    for (k, r) in p.expect.peers.iter().enumerate() {
        for (side, peer) in [("from", &r.from), ("to", &r.to)] {
            let f = format!("{field}.expect.peers[{k}].{side}");
            if let Some(ns) = &peer.namespace {
                if !m.namespaces.iter().any(|n| &n.name == ns) {
                    return Err(invalid(
                        format!("{f}.namespace"),
                        ns,
                        "not a model namespace",
                    ));
                }
            }
            if let Some(pod) = &peer.pod {
                if !m.pods.iter().any(|n| &n.name == pod) {
                    return Err(invalid(format!("{f}.pod"), pod, "not a model pod"));
                }
            }
        }
    }
    Ok(())
}

/// What identifies a document: (apiVersion, kind, namespace, name). Applying a document with
/// the key of an earlier one replaces it; deleting removes it.
pub type DocKey = (String, String, Option<String>, String);

/// A document's key; every document needs `apiVersion`, `kind` and `metadata.name`.
pub fn doc_key(field: &str, d: &Value) -> Result<DocKey, ConformanceError> {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let api = s(d.get("apiVersion"));
    let kind = s(d.get("kind"));
    let meta = d.get("metadata");
    let name = s(meta.and_then(|m| m.get("name")));
    match (api, kind, name) {
        (Some(a), Some(k), Some(n)) => Ok((a, k, s(meta.and_then(|m| m.get("namespace"))), n)),
        _ => Err(invalid(
            field,
            "",
            "a document needs apiVersion, kind and metadata.name",
        )),
    }
}
