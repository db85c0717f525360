//! The lab's one error type: which member and field of a topology is wrong, which step of a
//! build failed and on which member, and what teardown could not undo. Pure.

use std::path::PathBuf;

/// Everything that can go wrong in `trellis lab`.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The topology text is not a topology (syntax, unknown field, wrong type).
    #[error("topology: {0}")]
    Decode(String),
    /// A topology field is not usable: `field` names the member and field (`pods[3].name`),
    /// `value` the offending value as written (may be empty).
    #[error("{field}{}: {reason}", if value.is_empty() { String::new() } else { format!(" {value}") })]
    Invalid {
        field: String,
        value: String,
        reason: String,
    },
    /// Something named like this lab already exists, so `up` would build over it.
    #[error("lab {lab}: {what} already exists (trellis lab down {owner})")]
    Exists {
        lab: String,
        what: String,
        owner: String,
    },
    /// A build step failed; `member` is the topology member it was for, `step` what the lab
    /// was doing, `detail` the system's answer.
    #[error("{member}: {step}: {detail}")]
    Step {
        member: String,
        step: String,
        detail: String,
    },
    /// `up` failed and removed what it had made; `leftovers` is what the rollback could not undo.
    #[error("{error}\n{}", rollback_note(leftovers))]
    RolledBack {
        error: Box<LabError>,
        leftovers: Vec<LabError>,
    },
    /// A request to the Kubernetes API server (on the Kubernetes path) failed.
    #[error("Kubernetes API: {what}: {detail}")]
    Kube { what: String, detail: String },
    /// Teardown could not undo something.
    #[error("{what}: {detail}")]
    Teardown { what: String, detail: String },
    #[error("lab {name:?} is not up ({path}: {source})")]
    NotUp {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no lab is up (trellis lab up)")]
    NoLab,
    #[error("several labs are up ({0}); name one")]
    SeveralLabs(String),
    #[error("lab {lab} has no member {member:?}")]
    NoMember { lab: String, member: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    BadState { path: PathBuf, reason: String },
    /// A pod's WorkloadEndpoint could not be updated.
    #[error("pod {pod}: its WorkloadEndpoint: {detail}")]
    Endpoint { pod: String, detail: String },
    /// A probe could not run (not the reachability it measures: that is its result).
    #[error("probe: {0}")]
    Probe(String),
    #[error("{} not found next to {} (build the workspace)", binary.display(), exe.display())]
    MissingBinary { binary: PathBuf, exe: PathBuf },
}

fn rollback_note(leftovers: &[LabError]) -> String {
    if leftovers.is_empty() {
        "(everything the lab had made was removed)".into()
    } else {
        let list: Vec<String> = leftovers.iter().map(|e| format!("  {e}")).collect();
        format!(
            "(the rollback could not remove everything; run trellis lab down again:\n{})",
            list.join("\n")
        )
    }
}

impl LabError {
    /// A topology field error; `value` is shown as written (quote strings with `{:?}`).
    pub fn invalid(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> LabError {
        LabError::Invalid {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> LabError {
        LabError::Io {
            path: path.into(),
            source,
        }
    }
}
