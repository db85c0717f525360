//! Network policy, pure (no I/O): one model, three layers, one engine shared by enforcement and
//! explanation (see DESIGN.md "Policy").
//!
//! - [`model`]: the internal form every policy kind becomes — ordered tiers of ordered policies
//!   of ordered rules, each rule a match plus an action (Allow, Deny, Pass, Log) — and the
//!   endpoints, namespaces and network sets rules match against. Kubernetes NetworkPolicy,
//!   Calico's NetworkPolicy / GlobalNetworkPolicy / Tier / NetworkSet / GlobalNetworkSet /
//!   Profile all translate into it.
//! - [`translate`]: stored resources (Kubernetes NetworkPolicy with upstream's semantics,
//!   Calico's kinds, namespaces, service accounts, workload endpoints) → the model.
//! - [`eval`]: given the model and a flow, the verdict and the path that decided it;
//!   `trellis policy trace` prints that path.
//! - `compile` (to come): the model and a node's endpoints → Trellis's nftables table as data,
//!   plus incremental updates; the agent's applier (a shell) carries it out atomically.

pub mod eval;
pub mod model;
pub mod translate;
