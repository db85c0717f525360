//! Network policy, pure (no I/O): one model, three layers, one engine shared by enforcement and
//! explanation (see DESIGN.md "Policy").
//!
//! - [`model`]: the internal form every policy kind becomes — ordered tiers of ordered policies
//!   of ordered rules, each rule a match plus an action (Allow, Deny, Pass, Log) — and the
//!   endpoints, namespaces and network sets rules match against. Kubernetes NetworkPolicy,
//!   Calico's NetworkPolicy / GlobalNetworkPolicy / Tier / NetworkSet / GlobalNetworkSet /
//!   Profile all translate into it.
//! - `eval` (to come): given the model and a flow, the verdict and the path that decided it;
//!   `trellis policy trace` prints that path.
//! - `compile` (to come): the model and a node's endpoints → Trellis's nftables table as data,
//!   plus incremental updates; the agent's applier (a shell) carries it out atomically.
//! - [`conformance`]: the conformance suites as data (Kubernetes' e2e cases and Calico-model
//!   cases), their expectations expanded into truth tables.

pub mod conformance;
pub mod model;
