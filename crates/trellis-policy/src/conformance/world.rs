//! The state of a replay (pure): namespaces, pods and the documents in force as a case's steps
//! leave them, the changes each step makes, and the changes that undo a case.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    doc_key, resolve, Addresses, ConformanceError, ConformanceModel, DocKey, PodRef, Step,
};
use crate::model::Labels;

/// A pod's state during a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    pub labels: Labels,
    pub profiles: Vec<String>,
    pub service_account: Option<String>,
}

/// One change a replay makes, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Delete this document (resolved; the whole document as applied when the world has it).
    Delete(Value),
    /// Apply (create or replace) this document (resolved).
    Apply(Value),
    /// The namespace's labels become exactly these.
    NamespaceLabels { name: String, labels: Labels },
    /// The pod's labels become exactly these.
    PodLabels { pod: PodRef, labels: Labels },
    /// The pod's profiles become exactly these.
    PodProfiles { pod: PodRef, profiles: Vec<String> },
}

/// What the cluster holds at a point of a replay: namespaces and pods as the steps so far left
/// them, and the documents applied and not deleted, in the order they were first applied.
/// Starts as the model says; [`World::undo`] returns to that.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: BTreeMap<PodRef, PodState>,
    documents: Vec<(DocKey, Value)>,
    base: (BTreeMap<String, Labels>, BTreeMap<PodRef, PodState>),
}

impl World {
    pub fn new(m: &ConformanceModel) -> World {
        let namespaces: BTreeMap<String, Labels> = m
            .namespaces
            .iter()
            .map(|n| (n.name.clone(), n.labels.clone()))
            .collect();
        let pods: BTreeMap<PodRef, PodState> = m
            .namespaces
            .iter()
            .flat_map(|ns| {
                m.pods.iter().map(|p| {
                    (
                        PodRef::new(&ns.name, &p.name),
                        PodState {
                            labels: p.labels.clone(),
                            profiles: Vec::new(),
                            service_account: p.service_account.clone(),
                        },
                    )
                })
            })
            .collect();
        World {
            base: (namespaces.clone(), pods.clone()),
            namespaces,
            pods,
            documents: Vec::new(),
        }
    }

    /// The documents in force (resolved), in the order they were first applied.
    pub fn documents(&self) -> impl Iterator<Item = &Value> {
        self.documents.iter().map(|(_, d)| d)
    }

    /// Carries out a step's changes on the world; returns them, resolved, in order.
    pub fn step(
        &mut self,
        step: &Step,
        addrs: &Addresses,
    ) -> Result<Vec<Change>, ConformanceError> {
        let mut out = Vec::new();
        for d in resolve(&step.delete, addrs)? {
            // The document as it was applied: a delete names an object by key, but whoever
            // carries the change out may need the whole document (`trellis delete -f`
            // validates what it reads).
            let key = doc_key("delete", &d)?;
            let full = match self.documents.iter().position(|(k, _)| *k == key) {
                Some(i) => self.documents.remove(i).1,
                None => d,
            };
            out.push(Change::Delete(full));
        }
        for d in resolve(&step.apply, addrs)? {
            let key = doc_key("apply", &d)?;
            match self.documents.iter_mut().find(|(k, _)| *k == key) {
                Some((_, old)) => *old = d.clone(),
                None => self.documents.push((key, d.clone())),
            }
            out.push(Change::Apply(d));
        }
        if let Some(l) = &step.label_namespace {
            self.namespaces.insert(l.name.clone(), l.labels.clone());
            out.push(Change::NamespaceLabels {
                name: l.name.clone(),
                labels: l.labels.clone(),
            });
        }
        if let Some(l) = &step.label_pod {
            let pod = PodRef::new(&l.namespace, &l.name);
            if let Some(p) = self.pods.get_mut(&pod) {
                p.labels = l.labels.clone();
            }
            out.push(Change::PodLabels {
                pod,
                labels: l.labels.clone(),
            });
        }
        if let Some(l) = &step.profile_pod {
            let pod = PodRef::new(&l.namespace, &l.name);
            if let Some(p) = self.pods.get_mut(&pod) {
                p.profiles = l.profiles.clone();
            }
            out.push(Change::PodProfiles {
                pod,
                profiles: l.profiles.clone(),
            });
        }
        Ok(out)
    }

    /// The changes that return the world to the model's state — every document in force
    /// deleted (last applied first), every namespace and pod that differs restored — and the
    /// world so returned.
    pub fn undo(&mut self) -> Vec<Change> {
        let mut out: Vec<Change> = self
            .documents
            .drain(..)
            .rev()
            .map(|(_, d)| Change::Delete(d))
            .collect();
        let (namespaces, pods) = self.base.clone();
        for (name, labels) in &namespaces {
            if self.namespaces.get(name) != Some(labels) {
                out.push(Change::NamespaceLabels {
                    name: name.clone(),
                    labels: labels.clone(),
                });
            }
        }
        for (pod, base) in &pods {
            let now = &self.pods[pod];
            if now.labels != base.labels {
                out.push(Change::PodLabels {
                    pod: pod.clone(),
                    labels: base.labels.clone(),
                });
            }
            if now.profiles != base.profiles {
                out.push(Change::PodProfiles {
                    pod: pod.clone(),
                    profiles: base.profiles.clone(),
                });
            }
        }
        self.namespaces = namespaces;
        self.pods = pods;
        out
    }
}
