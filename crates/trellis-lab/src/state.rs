//! The state file of a lab (`/run/trellis/lab/NAME/state.json`): what the lab made, written
//! as it is made so `down` works after a crash or a half-built `up`. I/O (the file).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::topology::Topology;
use crate::LabError;

/// Where labs keep their state.
pub const LAB_ROOT: &str = "/run/trellis/lab";

/// A lab's directory: state, logs, sockets, the embedded datastore, daemon configuration.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// The socket of a lab node's agent.
pub fn agent_socket(lab: &str, node: &str) -> PathBuf {
    lab_dir(lab).join(format!("{node}.sock"))
}

/// What a lab made, recorded as it goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub name: String,
    pub datastore: String,
    /// Member name → namespace name (nodes, pods, externals, fabric, router, control).
    pub namespaces: BTreeMap<String, String>,
    /// The processes the lab started.
    pub pids: Vec<Process>,
    pub node_ips: BTreeMap<String, String>,
    pub pod_ips: BTreeMap<String, String>,
    pub pod_nodes: BTreeMap<String, String>,
    pub external_ips: BTreeMap<String, String>,
    pub topology: Option<Topology>,
    /// The Kubernetes API objects the lab created (on the Kubernetes path), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kube_objects: Vec<crate::kube::KubeRef>,
}

/// A process the lab started, and what tells it apart from a later process that reuses its PID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "ProcessRecord")]
pub struct Process {
    pub member: String,
    /// What it is (`agent`, `etcd`, `bird`, ...).
    pub what: String,
    pub pid: i32,
    /// Field 22 of `/proc/PID/stat` (clock ticks after boot) when it was started; `None` for a
    /// bare PID written by an older Trellis, which is then identified by its namespace.
    pub start_time: Option<u64>,
}

/// A process as stored: older state files hold bare PIDs.
#[derive(Deserialize)]
#[serde(untagged)]
enum ProcessRecord {
    Bare(i32),
    Full {
        member: String,
        what: String,
        pid: i32,
        start_time: Option<u64>,
    },
}

impl From<ProcessRecord> for Process {
    fn from(r: ProcessRecord) -> Process {
        match r {
            ProcessRecord::Bare(pid) => Process {
                member: String::new(),
                what: String::new(),
                pid,
                start_time: None,
            },
            ProcessRecord::Full {
                member,
                what,
                pid,
                start_time,
            } => Process {
                member,
                what,
                pid,
                start_time,
            },
        }
    }
}

impl State {
    /// The state of a lab about to be built.
    pub fn new(t: &Topology) -> State {
        State {
            name: t.name.clone(),
            topology: Some(t.clone()),
            ..Default::default()
        }
    }

    /// Writes the state file (atomically: a crash leaves the old or the new one).
    pub fn save(&self) -> Result<(), LabError> {
        let d = lab_dir(&self.name);
        std::fs::create_dir_all(&d).map_err(|e| LabError::io(&d, e))?;
        let tmp = d.join("state.json.tmp");
        let bytes = serde_json::to_vec_pretty(self).expect("the state serialises");
        std::fs::write(&tmp, bytes).map_err(|e| LabError::io(&tmp, e))?;
        let path = d.join("state.json");
        std::fs::rename(&tmp, &path).map_err(|e| LabError::io(&path, e))
    }

    pub fn load(name: &str) -> Result<State, LabError> {
        let path = lab_dir(name).join("state.json");
        let bytes = std::fs::read(&path).map_err(|source| LabError::NotUp {
            name: name.to_string(),
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| LabError::BadState {
            path,
            reason: e.to_string(),
        })
    }
}

/// The labs that are up (that have a state file).
pub fn labs() -> Vec<String> {
    std::fs::read_dir(LAB_ROOT)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join("state.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves an omitted lab name when exactly one lab is up.
pub fn pick(name: Option<String>) -> Result<String, LabError> {
    match name {
        Some(n) => Ok(n),
        None => match labs().as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(LabError::NoLab),
            many => Err(LabError::SeveralLabs(many.join(", "))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_pids_of_older_state_files_still_load() {
        let s: State = serde_json::from_str(
            r#"{"name":"x","datastore":"","namespaces":{},"pids":[42,{"member":"n1","what":"agent","pid":7,"start_time":99}],"node_ips":{},"pod_ips":{},"pod_nodes":{},"external_ips":{},"topology":null}"#,
        )
        .unwrap();
        assert_eq!(s.pids[0].pid, 42);
        assert_eq!(s.pids[0].start_time, None);
        assert_eq!(s.pids[1].start_time, Some(99));
        assert_eq!(s.pids[1].member, "n1");
    }
}
