//! `trellis lab`: a cluster made of network namespaces on this machine — a fabric namespace with
//! a bridge per subnet, a router namespace joining subnets, one namespace per node running a
//! real `trellis agent`, pods created by the real `trellis-cni` with the environment a runtime
//! gives, external hosts (optionally running BGP daemons), and optionally etcd in a control
//! namespace.
//!
//! A build is: [`topology`] (the YAML, pure) → [`validate()`] (everything checked before anything
//! is made, pure) → [`plan()`] (plain-data steps, pure) → [`apply`] (I/O, every step recorded in
//! the state file as it is made) → on failure [`down`] rolls back. `down` also works after a
//! crash or a half-built `up`, and kills only processes that are still the lab's.

pub mod apply;
pub mod check;
pub mod daemons;
pub mod endpoint;
mod error;
pub mod kube;
pub mod plan;
pub mod probe;
pub mod process;
pub mod resources;
pub mod state;
pub mod teardown;
pub mod topology;
pub mod traffic;
pub mod validate;

use std::process::Command;

pub use check::{check, Outcome};
pub use error::LabError;
pub use plan::{plan, Observed, Step};
pub use state::{lab_dir, labs, pick, State, LAB_ROOT};
pub use teardown::{down, Teardown};
pub use validate::{validate, Lab};

/// What exists under lab `name`'s name now.
pub fn observe(name: &str) -> Result<Observed, LabError> {
    Ok(Observed {
        namespaces: teardown::existing_namespaces(name)?,
        labs: labs(),
    })
}

/// Builds a validated lab. On failure everything it made is removed again.
pub fn up(lab: &Lab, progress: &mut dyn FnMut(&str)) -> Result<State, LabError> {
    let t = lab.topology();
    let steps = plan(lab, &observe(&t.name)?)?;
    let programs = apply::programs(&steps)?;
    progress(&format!(
        "lab {}: {} subnet(s), {} node(s), {} pod(s), {} step(s)",
        t.name,
        t.subnets.len(),
        t.nodes.len(),
        t.pods.len(),
        steps.len()
    ));
    let state = State::new(t);
    if let Err(e) = state.save() {
        return Err(rolled_back(&t.name, e));
    }
    let mut applier = apply::Applier::new(state, programs, progress);
    match applier.run(&steps) {
        Ok(()) => Ok(applier.state),
        Err(e) => Err(rolled_back(&t.name, e)),
    }
}

fn rolled_back(name: &str, error: LabError) -> LabError {
    LabError::RolledBack {
        error: Box::new(error),
        leftovers: down(name).errors,
    }
}

/// A command run in a member's namespace.
pub fn exec_cmd(state: &State, member: &str, argv: &[String]) -> Result<Command, LabError> {
    let ns = state
        .namespaces
        .get(member)
        .ok_or_else(|| LabError::NoMember {
            lab: state.name.clone(),
            member: member.to_string(),
        })?;
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/var/run/netns/{ns}")).args(argv);
    Ok(c)
}
