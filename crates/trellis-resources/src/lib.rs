//! Trellis's resources: typed, validated objects read from YAML or JSON documents (Trellis's
//! `trellis.dev/v1` and, for the kinds Calico has, `projectcalico.org/v3`), written back as
//! canonical JSON under stable datastore keys. Pure: no I/O.

pub mod addr;
pub mod anp;
pub mod cnp;
pub mod k8s;
pub mod kinds;
pub mod labels;
pub mod pod;
pub mod policy;
pub mod policy_validate;
pub mod selector;
pub mod validate;
pub mod yaml;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub use k8s::{
    KubernetesNetworkPolicySpec, LabelSelector, NamespaceSpec, ServiceAccountSpec,
    CORE_API_VERSION, NETWORKING_API_VERSION,
};
pub use kinds::*;
pub use policy::{
    GlobalNetworkPolicySpec, NetworkPolicySpec, NetworkSetSpec, ProfileSpec, RuleSpec, TierSpec,
};
pub use selector::{Selector, SelectorError};

/// Trellis's API version.
pub const API_VERSION: &str = "trellis.dev/v1";
/// Calico's, accepted on input for the kinds Calico has.
pub const CALICO_API_VERSION: &str = "projectcalico.org/v3";
/// Root of every key Trellis stores.
pub const KEY_ROOT: &str = "/trellis/v1";
/// The label Calico gives every namespaced endpoint and network set: its namespace.
pub const LABEL_NAMESPACE: &str = "projectcalico.org/namespace";
/// The label Kubernetes gives every namespace: its own name.
pub const LABEL_NAMESPACE_NAME: &str = "kubernetes.io/metadata.name";

/// The kinds Trellis knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    IpPool,
    Node,
    IpamBlock,
    IpamHandle,
    BlockAffinity,
    IpReservation,
    IpamConfiguration,
    WorkloadEndpoint,
    BgpConfiguration,
    BgpPeer,
    BgpFilter,
    BgpStatus,
    /// `networking.k8s.io/v1` NetworkPolicy.
    KubernetesNetworkPolicy,
    /// Calico's (and Trellis's) namespaced NetworkPolicy.
    NetworkPolicy,
    GlobalNetworkPolicy,
    Tier,
    NetworkSet,
    GlobalNetworkSet,
    Profile,
    /// `v1` Namespace.
    Namespace,
    /// `v1` ServiceAccount.
    ServiceAccount,
    /// `policy.networking.k8s.io/v1beta1` (or `v1alpha2`) ClusterNetworkPolicy.
    ClusterNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy.
    AdminNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy.
    BaselineAdminNetworkPolicy,
    /// Trellis's record of a Kubernetes pod (see [`pod`]).
    Pod,
}

impl Kind {
    pub const ALL: [Kind; 25] = [
        Kind::IpPool,
        Kind::Node,
        Kind::IpamBlock,
        Kind::IpamHandle,
        Kind::BlockAffinity,
        Kind::IpReservation,
        Kind::IpamConfiguration,
        Kind::WorkloadEndpoint,
        Kind::BgpConfiguration,
        Kind::BgpPeer,
        Kind::BgpFilter,
        Kind::BgpStatus,
        Kind::KubernetesNetworkPolicy,
        Kind::NetworkPolicy,
        Kind::GlobalNetworkPolicy,
        Kind::Tier,
        Kind::NetworkSet,
        Kind::GlobalNetworkSet,
        Kind::Profile,
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::ClusterNetworkPolicy,
        Kind::AdminNetworkPolicy,
        Kind::BaselineAdminNetworkPolicy,
        Kind::Pod,
    ];

    /// The `kind:` field.
    pub fn name(self) -> &'static str {
        match self {
            Kind::IpPool => "IPPool",
            Kind::Node => "Node",
            Kind::IpamBlock => "IPAMBlock",
            Kind::IpamHandle => "IPAMHandle",
            Kind::BlockAffinity => "BlockAffinity",
            Kind::IpReservation => "IPReservation",
            Kind::IpamConfiguration => "IPAMConfiguration",
            Kind::WorkloadEndpoint => "WorkloadEndpoint",
            Kind::BgpConfiguration => "BGPConfiguration",
            Kind::BgpPeer => "BGPPeer",
            Kind::BgpFilter => "BGPFilter",
            Kind::BgpStatus => "BGPStatus",
            Kind::KubernetesNetworkPolicy | Kind::NetworkPolicy => "NetworkPolicy",
            Kind::GlobalNetworkPolicy => "GlobalNetworkPolicy",
            Kind::Tier => "Tier",
            Kind::NetworkSet => "NetworkSet",
            Kind::GlobalNetworkSet => "GlobalNetworkSet",
            Kind::Profile => "Profile",
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::ClusterNetworkPolicy => "ClusterNetworkPolicy",
            Kind::AdminNetworkPolicy => "AdminNetworkPolicy",
            Kind::BaselineAdminNetworkPolicy => "BaselineAdminNetworkPolicy",
            Kind::Pod => "Pod",
        }
    }

    /// The `apiVersion` objects of this kind are stored and printed with.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::KubernetesNetworkPolicy => NETWORKING_API_VERSION,
            Kind::Namespace | Kind::ServiceAccount => CORE_API_VERSION,
            Kind::ClusterNetworkPolicy => cnp::CNP_API_VERSION,
            Kind::AdminNetworkPolicy | Kind::BaselineAdminNetworkPolicy => anp::ANP_API_VERSION,
            _ => API_VERSION,
        }
    }

    /// Whether this kind is one of Kubernetes' own (stored as Kubernetes writes them).
    pub fn is_kubernetes(self) -> bool {
        matches!(
            self,
            Kind::KubernetesNetworkPolicy
                | Kind::Namespace
                | Kind::ServiceAccount
                | Kind::ClusterNetworkPolicy
                | Kind::AdminNetworkPolicy
                | Kind::BaselineAdminNetworkPolicy
        )
    }

    /// Whether a document of this kind may be written with `api_version`: Kubernetes' kinds
    /// with their own version (ClusterNetworkPolicy also with `v1alpha2`, the same schema).
    fn accepts_kubernetes_version(self, api_version: &str) -> bool {
        api_version == self.api_version()
            || (self == Kind::ClusterNetworkPolicy && api_version == cnp::CNP_API_VERSION_ALPHA2)
    }

    /// The kind a document's `apiVersion` and `kind` name, if Trellis knows it.
    pub fn from_api(api_version: &str, kind: &str) -> Result<Kind, ResourceError> {
        let candidates: Vec<Kind> = Kind::ALL.into_iter().filter(|k| k.name() == kind).collect();
        if candidates.is_empty() {
            return Err(ResourceError::field(
                "kind",
                format!("unknown kind {kind:?}"),
            ));
        }
        let accepts = |k: Kind| match k {
            k if k.is_kubernetes() => k.accepts_kubernetes_version(api_version),
            k => {
                api_version == API_VERSION
                    || (api_version == CALICO_API_VERSION && k.in_calico_v3())
            }
        };
        if let Some(k) = candidates.iter().copied().find(|k| accepts(*k)) {
            return Ok(k);
        }
        let mut versions: Vec<&str> = Vec::new();
        for k in &candidates {
            if k.is_kubernetes() {
                versions.push(k.api_version());
                if *k == Kind::ClusterNetworkPolicy {
                    versions.push(cnp::CNP_API_VERSION_ALPHA2);
                }
            } else {
                versions.push(API_VERSION);
                if k.in_calico_v3() {
                    versions.push(CALICO_API_VERSION);
                }
            }
        }
        Err(ResourceError::field(
            "apiVersion",
            format!(
                "{api_version:?} is not supported for {kind} (use {})",
                versions.join(" or ")
            ),
        ))
    }

    /// Lower-case plural: the key segment and the CLI's name for the kind.
    pub fn plural(self) -> &'static str {
        match self {
            Kind::IpPool => "ippools",
            Kind::Node => "nodes",
            Kind::IpamBlock => "ipamblocks",
            Kind::IpamHandle => "ipamhandles",
            Kind::BlockAffinity => "blockaffinities",
            Kind::IpReservation => "ipreservations",
            Kind::IpamConfiguration => "ipamconfigurations",
            Kind::WorkloadEndpoint => "workloadendpoints",
            Kind::BgpConfiguration => "bgpconfigurations",
            Kind::BgpPeer => "bgppeers",
            Kind::BgpFilter => "bgpfilters",
            Kind::BgpStatus => "bgpstatuses",
            Kind::KubernetesNetworkPolicy => "kubernetesnetworkpolicies",
            Kind::NetworkPolicy => "networkpolicies",
            Kind::GlobalNetworkPolicy => "globalnetworkpolicies",
            Kind::Tier => "tiers",
            Kind::NetworkSet => "networksets",
            Kind::GlobalNetworkSet => "globalnetworksets",
            Kind::Profile => "profiles",
            Kind::Namespace => "namespaces",
            Kind::ServiceAccount => "serviceaccounts",
            Kind::ClusterNetworkPolicy => "clusternetworkpolicies",
            Kind::AdminNetworkPolicy => "adminnetworkpolicies",
            Kind::BaselineAdminNetworkPolicy => "baselineadminnetworkpolicies",
            Kind::Pod => "pods",
        }
    }

    pub fn namespaced(self) -> bool {
        matches!(
            self,
            Kind::WorkloadEndpoint
                | Kind::KubernetesNetworkPolicy
                | Kind::NetworkPolicy
                | Kind::NetworkSet
                | Kind::ServiceAccount
                | Kind::Pod
        )
    }

    /// Whether Calico's `projectcalico.org/v3` has this kind.
    pub fn in_calico_v3(self) -> bool {
        matches!(
            self,
            Kind::IpPool
                | Kind::Node
                | Kind::IpReservation
                | Kind::WorkloadEndpoint
                | Kind::BlockAffinity
                | Kind::BgpConfiguration
                | Kind::BgpPeer
                | Kind::BgpFilter
                | Kind::NetworkPolicy
                | Kind::GlobalNetworkPolicy
                | Kind::Tier
                | Kind::NetworkSet
                | Kind::GlobalNetworkSet
                | Kind::Profile
        )
    }

    /// Parses a kind from its name, plural or singular lower-case form (`ippool`, `ippools`, `IPPool`).
    pub fn parse(s: &str) -> Option<Kind> {
        let l = s.to_ascii_lowercase();
        let aliases = [
            ("blockaffinity", Kind::BlockAffinity),
            ("anp", Kind::AdminNetworkPolicy),
            ("banp", Kind::BaselineAdminNetworkPolicy),
            ("cnp", Kind::ClusterNetworkPolicy),
            ("bgpstatus", Kind::BgpStatus),
            ("globalnetworkpolicy", Kind::GlobalNetworkPolicy),
            ("gnp", Kind::GlobalNetworkPolicy),
            ("knp", Kind::KubernetesNetworkPolicy),
            ("kubernetesnetworkpolicy", Kind::KubernetesNetworkPolicy),
            ("ns", Kind::Namespace),
            ("sa", Kind::ServiceAccount),
            ("wep", Kind::WorkloadEndpoint),
        ];
        if let Some((_, k)) = aliases.iter().find(|(a, _)| *a == l) {
            return Some(*k);
        }
        Kind::ALL.into_iter().find(|k| {
            // `NetworkPolicy` names Calico's kind here; Kubernetes' is `kubernetesnetworkpolicies`.
            (k.name().to_ascii_lowercase() == l && *k != Kind::KubernetesNetworkPolicy)
                || k.plural() == l
                || k.plural().trim_end_matches('s') == l
        })
    }

    /// Key prefix of all objects of this kind.
    pub fn prefix(self) -> String {
        format!("{KEY_ROOT}/{}/", self.plural())
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // As kubectl names it, apart from Calico's NetworkPolicy.
            Kind::KubernetesNetworkPolicy => f.write_str("NetworkPolicy.networking.k8s.io"),
            k => f.write_str(k.name()),
        }
    }
}

/// An object of some kind: metadata plus its typed spec (and status where the kind has one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object<S> {
    pub metadata: Metadata,
    pub spec: S,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
}

/// Any resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    IpPool(Object<IpPoolSpec>),
    Node(Object<NodeSpec>),
    IpamBlock(Object<IpamBlockSpec>),
    IpamHandle(Object<IpamHandleSpec>),
    BlockAffinity(Object<BlockAffinitySpec>),
    IpReservation(Object<IpReservationSpec>),
    IpamConfiguration(Object<IpamConfigurationSpec>),
    WorkloadEndpoint(Object<WorkloadEndpointSpec>),
    BgpConfiguration(Object<BgpConfigurationSpec>),
    BgpPeer(Object<BgpPeerSpec>),
    BgpFilter(Object<BgpFilterSpec>),
    BgpStatus(Object<BgpStatusSpec>),
    KubernetesNetworkPolicy(Object<KubernetesNetworkPolicySpec>),
    NetworkPolicy(Object<NetworkPolicySpec>),
    GlobalNetworkPolicy(Object<GlobalNetworkPolicySpec>),
    Tier(Object<TierSpec>),
    NetworkSet(Object<NetworkSetSpec>),
    GlobalNetworkSet(Object<NetworkSetSpec>),
    Profile(Object<ProfileSpec>),
    Namespace(Object<NamespaceSpec>),
    ServiceAccount(Object<ServiceAccountSpec>),
    ClusterNetworkPolicy(Object<cnp::ClusterNetworkPolicySpec>),
    AdminNetworkPolicy(Object<anp::AdminNetworkPolicySpec>),
    BaselineAdminNetworkPolicy(Object<anp::BaselineAdminNetworkPolicySpec>),
    Pod(Object<pod::PodSpec>),
}

/// A document that is not a valid resource: which one, and which field is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ResourceError {
    /// 1-based document number in the input.
    pub doc: Option<usize>,
    /// `Kind/name` when known.
    pub object: Option<String>,
    /// The offending field (`spec.blockSize`), or `document` for syntax errors.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ResourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        let text = match (self.doc, &self.object) {
            (Some(d), Some(o)) => format!("document {d} ({o}): "),
            (Some(d), None) => format!("document {d}: "),
            (None, Some(o)) => format!("{o}: "),
            (None, None) => String::new(),
        } + &format!("{}: {}", self.field, self.reason);
        // Names, keys and values quoted here come from the input: control characters (NUL, a
        // terminal's escape sequences) are shown escaped, never sent to a terminal raw.
        for c in text.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

impl ResourceError {
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> ResourceError {
        ResourceError {
            doc: None,
            object: None,
            field: field.into(),
            reason: reason.into(),
        }
    }
}

macro_rules! each {
    ($self:expr, $o:ident => $e:expr) => {
        match $self {
            Resource::IpPool($o) => $e,
            Resource::Node($o) => $e,
            Resource::IpamBlock($o) => $e,
            Resource::IpamHandle($o) => $e,
            Resource::BlockAffinity($o) => $e,
            Resource::IpReservation($o) => $e,
            Resource::IpamConfiguration($o) => $e,
            Resource::WorkloadEndpoint($o) => $e,
            Resource::BgpConfiguration($o) => $e,
            Resource::BgpPeer($o) => $e,
            Resource::BgpFilter($o) => $e,
            Resource::BgpStatus($o) => $e,
            Resource::KubernetesNetworkPolicy($o) => $e,
            Resource::NetworkPolicy($o) => $e,
            Resource::GlobalNetworkPolicy($o) => $e,
            Resource::Tier($o) => $e,
            Resource::NetworkSet($o) => $e,
            Resource::GlobalNetworkSet($o) => $e,
            Resource::Profile($o) => $e,
            Resource::Namespace($o) => $e,
            Resource::ServiceAccount($o) => $e,
            Resource::ClusterNetworkPolicy($o) => $e,
            Resource::AdminNetworkPolicy($o) => $e,
            Resource::BaselineAdminNetworkPolicy($o) => $e,
            Resource::Pod($o) => $e,
        }
    };
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::IpPool(_) => Kind::IpPool,
            Resource::Node(_) => Kind::Node,
            Resource::IpamBlock(_) => Kind::IpamBlock,
            Resource::IpamHandle(_) => Kind::IpamHandle,
            Resource::BlockAffinity(_) => Kind::BlockAffinity,
            Resource::IpReservation(_) => Kind::IpReservation,
            Resource::IpamConfiguration(_) => Kind::IpamConfiguration,
            Resource::WorkloadEndpoint(_) => Kind::WorkloadEndpoint,
            Resource::BgpConfiguration(_) => Kind::BgpConfiguration,
            Resource::BgpPeer(_) => Kind::BgpPeer,
            Resource::BgpFilter(_) => Kind::BgpFilter,
            Resource::BgpStatus(_) => Kind::BgpStatus,
            Resource::KubernetesNetworkPolicy(_) => Kind::KubernetesNetworkPolicy,
            Resource::NetworkPolicy(_) => Kind::NetworkPolicy,
            Resource::GlobalNetworkPolicy(_) => Kind::GlobalNetworkPolicy,
            Resource::Tier(_) => Kind::Tier,
            Resource::NetworkSet(_) => Kind::NetworkSet,
            Resource::GlobalNetworkSet(_) => Kind::GlobalNetworkSet,
            Resource::Profile(_) => Kind::Profile,
            Resource::Namespace(_) => Kind::Namespace,
            Resource::ServiceAccount(_) => Kind::ServiceAccount,
            Resource::ClusterNetworkPolicy(_) => Kind::ClusterNetworkPolicy,
            Resource::AdminNetworkPolicy(_) => Kind::AdminNetworkPolicy,
            Resource::BaselineAdminNetworkPolicy(_) => Kind::BaselineAdminNetworkPolicy,
            Resource::Pod(_) => Kind::Pod,
        }
    }

    pub fn metadata(&self) -> &Metadata {
        each!(self, o => &o.metadata)
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        each!(self, o => &mut o.metadata)
    }

    /// The datastore key.
    pub fn key(&self) -> String {
        key_for(
            self.kind(),
            self.metadata().namespace.as_deref(),
            &self.metadata().name,
        )
    }

    /// The canonical document (`trellis.dev/v1`, or Kubernetes' own version for its kinds), as
    /// stored and as `get -o json|yaml` prints.
    pub fn to_value(&self) -> Value {
        let body = each!(self, o => serde_json::to_value(o).expect("resources serialise"));
        let mut v = json!({"apiVersion": self.kind().api_version(), "kind": self.kind().name()});
        for (k, val) in body.as_object().expect("object").clone() {
            v[k] = val;
        }
        v
    }

    /// Checks the semantic rules of the kind (CIDRs, ranges, selectors, names).
    pub fn validate(&self) -> Result<(), ResourceError> {
        validate::resource(self).map_err(|mut e| {
            e.object = Some(format!("{}/{}", self.kind(), self.metadata().name));
            e
        })
    }

    /// Parses and validates one document (already decoded to JSON).
    pub fn from_value(v: &Value) -> Result<Resource, ResourceError> {
        let obj = v
            .as_object()
            .ok_or_else(|| ResourceError::field("document", "must be a mapping"))?;
        let kind_name = obj
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| ResourceError::field("kind", "is required"))?;
        let api = obj
            .get("apiVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| ResourceError::field("apiVersion", "is required"))?;
        let kind = Kind::from_api(api, kind_name)?;
        let mut body = v.clone();
        let b = body.as_object_mut().expect("object");
        b.remove("apiVersion");
        b.remove("kind");
        normalise_body(kind, b);
        let object = b
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map(|n| format!("{kind_name}/{n}"));
        let mut r = parse_body(kind, &body).map_err(|mut e| {
            e.object = object.clone();
            e
        })?;
        r.apply_defaults();
        r.validate()?;
        Ok(r)
    }

    /// What the API servers fill in (Kubernetes' and Calico's): a namespaced policy kind's
    /// namespace (`default`), policy types, port protocols, tiers, a Namespace's
    /// `kubernetes.io/metadata.name` label. Idempotent, so stored objects read back unchanged.
    fn apply_defaults(&mut self) {
        let kind = self.kind();
        let meta = self.metadata_mut();
        if kind.namespaced() && kind != Kind::WorkloadEndpoint && meta.namespace.is_none() {
            meta.namespace = Some("default".into());
        }
        match self {
            Resource::KubernetesNetworkPolicy(o) => o.spec.apply_defaults(),
            Resource::NetworkPolicy(o) => o.spec.apply_defaults(),
            Resource::GlobalNetworkPolicy(o) => o.spec.apply_defaults(),
            Resource::Tier(o) => o.spec.apply_defaults(&o.metadata.name),
            Resource::Namespace(o) => {
                let name = o.metadata.name.clone();
                o.metadata.labels.insert(LABEL_NAMESPACE_NAME.into(), name);
            }
            _ => {}
        }
    }
}

/// Documents as users write them: a kind whose spec is all optional (Tier, NetworkSet,
/// GlobalNetworkSet, Profile, Namespace, ServiceAccount) may leave `spec` out. For Kubernetes'
/// kinds, `status` is the server's and is dropped, as the API server does on create, and a
/// ServiceAccount's token fields (meaningless to networking) are dropped too.
fn normalise_body(kind: Kind, b: &mut serde_json::Map<String, Value>) {
    if kind.is_kubernetes() {
        b.remove("status");
    }
    if kind == Kind::ServiceAccount {
        for k in [
            "secrets",
            "imagePullSecrets",
            "automountServiceAccountToken",
        ] {
            b.remove(k);
        }
    }
    let optional_spec = matches!(
        kind,
        Kind::Tier
            | Kind::NetworkSet
            | Kind::GlobalNetworkSet
            | Kind::Profile
            | Kind::Namespace
            | Kind::ServiceAccount
    );
    if optional_spec && matches!(b.get("spec"), None | Some(Value::Null)) {
        b.insert("spec".into(), json!({}));
    }
}

fn typed<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ResourceError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        // serde names the unknown field in its message; keep the path to where it was found.
        ResourceError::field(
            if path == "." {
                "document".to_string()
            } else {
                path
            },
            msg,
        )
    })
}

fn parse_body(kind: Kind, body: &Value) -> Result<Resource, ResourceError> {
    Ok(match kind {
        Kind::IpPool => Resource::IpPool(typed(body)?),
        Kind::Node => Resource::Node(typed(body)?),
        Kind::IpamBlock => Resource::IpamBlock(typed(body)?),
        Kind::IpamHandle => Resource::IpamHandle(typed(body)?),
        Kind::BlockAffinity => Resource::BlockAffinity(typed(body)?),
        Kind::IpReservation => Resource::IpReservation(typed(body)?),
        Kind::IpamConfiguration => Resource::IpamConfiguration(typed(body)?),
        Kind::WorkloadEndpoint => Resource::WorkloadEndpoint(typed(body)?),
        Kind::BgpConfiguration => Resource::BgpConfiguration(typed(body)?),
        Kind::BgpPeer => Resource::BgpPeer(typed(body)?),
        Kind::BgpFilter => Resource::BgpFilter(typed(body)?),
        Kind::BgpStatus => Resource::BgpStatus(typed(body)?),
        Kind::KubernetesNetworkPolicy => Resource::KubernetesNetworkPolicy(typed(body)?),
        Kind::NetworkPolicy => Resource::NetworkPolicy(typed(body)?),
        Kind::GlobalNetworkPolicy => Resource::GlobalNetworkPolicy(typed(body)?),
        Kind::Tier => Resource::Tier(typed(body)?),
        Kind::NetworkSet => Resource::NetworkSet(typed(body)?),
        Kind::GlobalNetworkSet => Resource::GlobalNetworkSet(typed(body)?),
        Kind::Profile => Resource::Profile(typed(body)?),
        Kind::Namespace => Resource::Namespace(typed(body)?),
        Kind::ServiceAccount => Resource::ServiceAccount(typed(body)?),
        Kind::ClusterNetworkPolicy => Resource::ClusterNetworkPolicy(typed(body)?),
        Kind::AdminNetworkPolicy => Resource::AdminNetworkPolicy(typed(body)?),
        Kind::BaselineAdminNetworkPolicy => Resource::BaselineAdminNetworkPolicy(typed(body)?),
        Kind::Pod => Resource::Pod(typed(body)?),
    })
}

/// The datastore key of an object.
pub fn key_for(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) if kind.namespaced() => format!("{}{ns}/{name}", kind.prefix()),
        _ => format!("{}{name}", kind.prefix()),
    }
}

/// Reads resources from YAML (`---` separated documents) or JSON (an object or an array of
/// objects), within the limits of [`yaml::parse_values`]. A `List` (`kind: List`, as
/// `get -o json` prints) stands for its `items`. Documents are numbered from 1 in input order,
/// each item of an array or `List` counting as one; errors carry that number.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ResourceError> {
    let json = yaml::is_json(text);
    let mut docs: Vec<Value> = Vec::new();
    for v in yaml::parse_values(text)? {
        match v {
            Value::Array(items) if json => docs.extend(items),
            Value::Object(mut o) if o.get("kind").and_then(Value::as_str) == Some("List") => {
                match o.remove("items") {
                    Some(Value::Array(items)) => docs.extend(items),
                    None | Some(Value::Null) => {}
                    Some(other) => {
                        return Err(ResourceError {
                            doc: Some(docs.len() + 1),
                            object: Some("List".into()),
                            field: "items".into(),
                            reason: format!(
                                "must be a list of resources, not {}",
                                json_type(&other)
                            ),
                        })
                    }
                }
            }
            other => docs.push(other),
        }
    }
    docs.iter()
        .enumerate()
        .map(|(i, d)| {
            Resource::from_value(d).map_err(|mut e| {
                e.doc = Some(i + 1);
                e
            })
        })
        .collect()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Renders resources as YAML documents (separated by `---`).
pub fn to_yaml(resources: &[Resource]) -> String {
    resources
        .iter()
        .map(|r| serde_norway::to_string(&r.to_value()).expect("yaml serialises"))
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod tests;
