//! What the lab writes onto a pod's WorkloadEndpoint after CNI ADD (I/O): its labels, named
//! ports and service account — what Kubernetes would sync and a runtime does not pass — and,
//! for conformance replays, label and profile changes. The CNI plugin already recorded the
//! pod's namespace and name (K8S_POD_NAMESPACE / K8S_POD_NAME). Each change is a typed
//! read-modify-write through the datastore API, committed with the endpoint's revision as its
//! precondition (retried on a concurrent writer). With etcd in the lab's control namespace the
//! store is reached from a thread that has entered that namespace.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use trellis_cluster::objects;
use trellis_resources::policy::RuleProtocol;
use trellis_resources::{Object, Resource, WorkloadEndpointSpec};
use trellis_store::{Datastore, Precondition, TxnOp, TxnOutcome};

use crate::state::State;
use crate::topology::{LabPort, PortProtocol};
use crate::LabError;

/// Attempts before a change that keeps meeting concurrent writers gives up.
const ATTEMPTS: u32 = 10;

/// A change to a pod's WorkloadEndpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointChange {
    /// What the topology says of the pod (after ADD).
    Pod {
        labels: BTreeMap<String, String>,
        ports: Vec<LabPort>,
        service_account: Option<String>,
    },
    /// The labels become exactly these.
    Labels(BTreeMap<String, String>),
    /// The profiles become exactly these.
    Profiles(Vec<String>),
}

/// Applies `change` to an endpoint object (pure). A pod's named ports (those with a name)
/// and service account are recorded as Calico's WorkloadEndpoint `ports` and
/// `serviceAccountName`, for policies that name ports or select service accounts.
pub fn apply_change(w: &mut Object<WorkloadEndpointSpec>, change: &EndpointChange) {
    match change {
        EndpointChange::Pod {
            labels,
            ports,
            service_account,
        } => {
            w.metadata.labels = labels.clone();
            w.spec.ports = ports
                .iter()
                .filter_map(|p| {
                    Some(trellis_resources::EndpointPort {
                        name: p.name.clone()?,
                        protocol: match p.protocol {
                            PortProtocol::Tcp => RuleProtocol::Tcp,
                            PortProtocol::Udp => RuleProtocol::Udp,
                        },
                        port: p.port,
                        host_port: None,
                        host_ip: None,
                    })
                })
                .collect();
            w.spec.service_account_name = service_account.clone();
        }
        EndpointChange::Labels(labels) => w.metadata.labels = labels.clone(),
        EndpointChange::Profiles(p) => w.spec.profiles = p.clone(),
    }
}

/// Updates the WorkloadEndpoint of lab pod `member` (found by its namespace and container ID).
pub fn update(state: &State, member: &str, change: &EndpointChange) -> Result<(), LabError> {
    let pod = state
        .topology
        .as_ref()
        .and_then(|t| t.pods.iter().find(|p| p.name == member))
        .ok_or_else(|| LabError::NoMember {
            lab: state.name.clone(),
            member: member.to_string(),
        })?;
    let namespace = pod.namespace.clone();
    let container_id = crate::plan::container_id(&state.name, member);
    let spec = state.datastore.clone();
    let failed = |detail: String| LabError::Endpoint {
        pod: pod.qualified(),
        detail,
    };
    let control = state.namespaces.get("control").cloned();
    let change = change.clone();
    in_netns(control.as_deref(), move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            let store = trellis_store::open(&spec)
                .await
                .map_err(|e| e.to_string())?;
            write(store, &namespace, &container_id, &change).await
        })
    })
    .map_err(|e| failed(e.to_string()))?
    .map_err(failed)
}

/// The read-modify-write, guarded by the endpoint's revision.
async fn write(
    store: Arc<dyn Datastore>,
    namespace: &str,
    container_id: &str,
    change: &EndpointChange,
) -> Result<(), String> {
    for _ in 0..ATTEMPTS {
        let found = objects::endpoints(&*store)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|(w, _)| {
                w.metadata.namespace.as_deref() == Some(namespace)
                    && w.spec.container_id.as_deref() == Some(container_id)
            });
        let Some((mut w, revision)) = found else {
            return Err(format!(
                "no WorkloadEndpoint in namespace {namespace} for container {container_id}"
            ));
        };
        let before = w.clone();
        apply_change(&mut w, change);
        if w == before {
            return Ok(());
        }
        let r = Resource::WorkloadEndpoint(w);
        r.validate().map_err(|e| e.to_string())?;
        let key = r.key();
        let outcome = store
            .txn(
                vec![Precondition::ModRevision(key.clone(), revision)],
                vec![TxnOp::Put(key, objects::encode(&r))],
            )
            .await
            .map_err(|e| e.to_string())?;
        if let TxnOutcome::Committed { .. } = outcome {
            return Ok(());
        }
    }
    Err(format!(
        "gave up after {ATTEMPTS} attempts that met concurrent writers"
    ))
}

/// Runs `f` on a thread in network namespace `ns` (`None`: this one). setns(2) changes only
/// the calling thread, so the rest of the process stays where it is.
fn in_netns<T: Send>(ns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, std::io::Error> {
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some(ns) = ns {
                let file = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
                // SAFETY: setns(2) on a descriptor we own, for this thread only.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(f())
        })
        .join()
        .map_err(|_| std::io::Error::other("the datastore thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resources::Metadata;

    #[test]
    fn changes_replace_labels_and_profiles_and_keep_the_rest() {
        let mut w = Object {
            metadata: Metadata {
                name: "e".into(),
                namespace: Some("x".into()),
                labels: [("old".to_string(), "1".to_string())].into(),
                ..Default::default()
            },
            spec: WorkloadEndpointSpec {
                node: "n1".into(),
                pod: Some("a".into()),
                profiles: vec!["p".into()],
                ..Default::default()
            },
            status: None,
        };
        let labels: BTreeMap<String, String> = [("pod".to_string(), "a".to_string())].into();
        apply_change(
            &mut w,
            &EndpointChange::Pod {
                labels: labels.clone(),
                ports: vec![
                    LabPort {
                        name: Some("web".into()),
                        port: 80,
                        protocol: PortProtocol::Tcp,
                    },
                    LabPort {
                        name: None,
                        port: 81,
                        protocol: PortProtocol::Udp,
                    },
                ],
                service_account: Some("sa".into()),
            },
        );
        assert_eq!(w.metadata.labels, labels);
        assert_eq!(w.spec.service_account_name.as_deref(), Some("sa"));
        let ports: Vec<(&str, u16)> = w
            .spec
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, [("web", 80)], "only named ports are recorded");
        assert_eq!(w.spec.profiles, ["p"]);
        apply_change(&mut w, &EndpointChange::Profiles(vec![]));
        assert!(w.spec.profiles.is_empty());
        apply_change(&mut w, &EndpointChange::Labels(BTreeMap::new()));
        assert!(w.metadata.labels.is_empty());
        assert_eq!(w.spec.pod.as_deref(), Some("a"));
    }
}
