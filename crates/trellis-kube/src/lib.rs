//! Kubernetes sync: `trellis kube-controller` mirrors Kubernetes objects into the Trellis
//! datastore, as Calico's etcd-mode kube-controllers do.
//!
//! - [`translate`] (pure): Kubernetes objects → Trellis's stored form.
//! - [`plan`] (pure): desired (from Kubernetes) against observed (the store) → guarded writes.
//! - [`lease`] (pure core + shell): leader election with a `coordination.k8s.io/v1` Lease.
//! - [`controller`] (I/O): kube-runtime watchers, the store watch, the apply loop.
//! - [`gc_plan`] (pure) and [`gc`] (I/O): IPAM garbage collection of addresses of pods and of
//!   nodes gone from the API server (grace period, two observations, a re-check by list and
//!   GET, guarded releases; never from an untrustworthy view).
//! - [`cnp`] (I/O): which ClusterNetworkPolicy version the API server serves, and its watch.
//! - [`cli`]: `trellis kube-controller`'s flags and entry point.
//!
//! Each pod is stored as a record (kind `Pod`: labels, node, service account, named ports and
//! its Calico IPAM annotations) as soon as it is listed, so the agent's CNI ADD creates the
//! pod's endpoint with its labels already on it.
//!
//! Nodes' `spec.podCIDRs` are stored on their Trellis Nodes (the agent's `--use-pod-cidr` makes
//! each the node's block); their addresses are validated but not stored (the agent publishes
//! the address it routes with). The allocator honours the pod's IPAM annotations (from its record) and its
//! namespace's pools (`trellis_cluster::annotations`).

pub mod cli;
pub mod cnp;
pub mod controller;
pub mod gc;
pub mod gc_plan;
pub mod lease;
pub mod plan;
pub mod translate;

/// Errors of the Kubernetes sync.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: String, reason: String },
    #[error(transparent)]
    Store(#[from] trellis_store::StoreError),
    #[error(transparent)]
    Cluster(#[from] trellis_cluster::ClusterError),
    #[error(transparent)]
    Translate(#[from] translate::TranslateError),
    #[error("{field}: {reason}")]
    Config { field: String, reason: String },
}

pub type Result<T, E = KubeError> = std::result::Result<T, E>;
