//! Network policy, pure (no I/O): one model, three layers, one engine shared by enforcement and
//! explanation (see DESIGN.md "Policy").
//!
//! - [`model`]: the internal form every policy kind becomes — ordered tiers of ordered policies
//!   of ordered rules, each rule a match plus an action (Allow, Deny, Pass, Log) — and the
//!   endpoints, namespaces and network sets rules match against. Kubernetes NetworkPolicy,
//!   Calico's NetworkPolicy / GlobalNetworkPolicy / Tier / NetworkSet / GlobalNetworkSet /
//!   Profile, and sig-network's ClusterNetworkPolicy (with its v1alpha1 predecessors, in the
//!   built-in `admin` and `baseline` tiers) all translate into it.
//! - [`translate`]: stored resources (Kubernetes NetworkPolicy with upstream's semantics,
//!   Calico's kinds, namespaces, service accounts, workload endpoints) → the model.
//! - [`eval`]: given the model and a flow, the verdict and the path that decided it;
//!   `trellis policy trace` prints that path.
//! - [`compile`]: the model and a node's name → Trellis's nftables table as data
//!   ([`compile::Ruleset`]), plus an incremental engine ([`compile::PolicyEngine`]) whose
//!   changes are small nft batches; the agent's applier (a shell) carries them out atomically.
//! - [`sync`]: stored objects key by key → the engine's changes (the agent's feed).
//! - [`conformance`]: the conformance suites as data (Kubernetes' e2e cases, Calico-model
//!   cases and sig-network's ClusterNetworkPolicy cases), their expectations expanded into
//!   truth tables.

pub mod compile;
pub mod conformance;
pub mod eval;
pub mod model;
pub mod sync;
pub mod translate;
