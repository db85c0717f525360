//! `lab down` and the rollback of a failed `up` (I/O): deletes the Kubernetes API objects it
//! created (on the Kubernetes path), kills the lab's processes — only those still its own
//! (recorded start time, or running in one of its namespaces) — deletes its namespaces and its
//! directory. Idempotent; every failure is collected, none stops the rest.

use std::process::Command;
use std::time::Duration;

use crate::plan::shadows;
use crate::process::{kill_if, netns_id, Fate, Identity, NetnsId};
use crate::state::{lab_dir, labs, Process, State};
use crate::LabError;

/// How long a killed process gets to be gone.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `down` did.
#[derive(Debug, Default)]
pub struct Teardown {
    /// Namespaces deleted.
    pub removed: Vec<String>,
    /// Recorded processes whose PID now belongs to another process, left alone.
    pub spared: Vec<Process>,
    /// What could not be undone.
    pub errors: Vec<LabError>,
}

/// The namespaces named `tl-NAME-...` that are not another lab's (lab `a-b`'s `tl-a-b-x` is
/// not lab `a`'s).
pub fn lab_namespaces(name: &str, listed: &str, others: &[String]) -> Vec<String> {
    let prefix = format!("tl-{name}-");
    let longer: Vec<String> = others
        .iter()
        .filter(|o| shadows(name, o))
        .map(|o| format!("tl-{o}-"))
        .collect();
    listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix) && !longer.iter().any(|p| n.starts_with(p)))
        .map(str::to_string)
        .collect()
}

/// Runs `ip`; a failure is reported as `what` went wrong.
fn ip(what: impl Fn() -> String, args: &[&str]) -> Result<String, LabError> {
    let failed = |detail: String| LabError::Teardown {
        what: what(),
        detail,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| failed(format!("ip: {e}")))?;
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `tl-NAME-*` namespaces that exist now.
pub fn existing_namespaces(name: &str) -> Result<Vec<String>, LabError> {
    let listed = ip(|| "list namespaces".into(), &["netns", "list"])?;
    Ok(lab_namespaces(name, &listed, &labs()))
}

/// Removes everything lab `name` made; works on half-built labs and without a state file.
pub fn down(name: &str) -> Teardown {
    let mut td = Teardown::default();
    if let Err(e) = crate::validate::lab_name(name) {
        td.errors.push(e);
        return td;
    }
    let state = match State::load(name) {
        Ok(s) => Some(s),
        Err(LabError::NotUp { .. }) => None,
        Err(e) => {
            td.errors.push(e);
            None
        }
    };
    // The lab's Kubernetes objects first: its pods' endpoints go with its agents below.
    if let Some(s) = &state {
        if let Some(k) = s.topology.as_ref().and_then(|t| t.kubernetes.as_ref()) {
            td.errors
                .extend(crate::kube::delete_created(&k.kubeconfig, &s.kube_objects));
        }
    }
    let mut all = existing_namespaces(name).unwrap_or_else(|e| {
        td.errors.push(e);
        Vec::new()
    });
    if let Some(s) = &state {
        all.extend(s.namespaces.values().cloned());
    }
    all.sort();
    all.dedup();
    // Namespaces that exist (a recorded one may never have been made).
    let present: Vec<(String, NetnsId)> = all
        .iter()
        .filter_map(|ns| netns_id(ns).ok().map(|id| (ns.clone(), id)))
        .collect();
    let ids: Vec<NetnsId> = present.iter().map(|(_, id)| *id).collect();
    for p in state.iter().flat_map(|s| &s.pids) {
        let identity = match p.start_time {
            Some(t) => Identity::StartedAt(t),
            None => Identity::InNetns(ids.clone()),
        };
        match kill_if(p.pid, &identity, EXIT_TIMEOUT) {
            Ok(Fate::Spared) => td.spared.push(p.clone()),
            Ok(Fate::Killed | Fate::Gone) => {
                if p.what.starts_with("frr") {
                    // FRR's per-process scratch directories live at a fixed system path.
                    for scratch in crate::daemons::frr_scratch_dirs(p.pid) {
                        match std::fs::remove_dir_all(&scratch) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                                td.errors.push(LabError::io(scratch, e))
                            }
                            _ => {}
                        }
                    }
                }
            }
            Err(e) => td.errors.push(LabError::Teardown {
                what: format!("kill {} {} (pid {})", p.member, p.what, p.pid),
                detail: e.to_string(),
            }),
        }
    }
    for (ns, id) in &present {
        kill_namespace(ns, *id, &mut td);
        match ip(|| format!("delete namespace {ns}"), &["netns", "del", ns]) {
            Ok(_) => td.removed.push(ns.clone()),
            Err(e) => td.errors.push(e),
        }
    }
    let d = lab_dir(name);
    match std::fs::remove_dir_all(&d) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => td.errors.push(LabError::io(d, e)),
        _ => {}
    }
    td
}

/// Kills every process still in namespace `ns` (started by the lab, or by hand in it).
fn kill_namespace(ns: &str, id: NetnsId, td: &mut Teardown) {
    let pids = match ip(
        || format!("list the processes in {ns}"),
        &["netns", "pids", ns],
    ) {
        Ok(p) => p,
        Err(e) => {
            td.errors.push(e);
            return;
        }
    };
    let inside = Identity::InNetns(vec![id]);
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if let Err(e) = kill_if(pid, &inside, EXIT_TIMEOUT) {
            td.errors.push(LabError::Teardown {
                what: format!("kill pid {pid} in {ns}"),
                detail: e.to_string(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_labs_namespaces_are_not_this_labs() {
        let listed = "tl-a-node1 (id: 3)\ntl-a-b-node1\ntl-ab-x\nother\ntl-a-c-x\n";
        assert_eq!(
            lab_namespaces("a", listed, &["a".into(), "a-b".into()]),
            vec!["tl-a-node1", "tl-a-c-x"]
        );
        assert_eq!(lab_namespaces("a-b", listed, &[]), vec!["tl-a-b-node1"]);
    }
}
