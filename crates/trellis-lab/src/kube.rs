//! The lab's writes to the Kubernetes API on the Kubernetes path (I/O): objects created or
//! replaced (the lab's Namespaces, Nodes, ServiceAccounts and Pods, and the Kubernetes kinds
//! among its resources and policies), labels changed, objects deleted — through the real kube
//! client with the topology's kubeconfig, so a real API server serves as well as the in-tree
//! test double. Each object's resource and scope come from the server's discovery. A
//! [`Session`] owns a single-threaded runtime and drives it only inside its calls.

use std::collections::BTreeMap;
use std::path::Path;

use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::discovery::{pinned_kind, Scope};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::LabError;

/// Attempts of a read-modify-write that keeps meeting concurrent writers (409 Conflict).
const ATTEMPTS: u32 = 10;

/// An object in the Kubernetes API, by what names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeRef {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

impl KubeRef {
    /// What names `object` (`metadata.namespace` as given; a namespaced kind without one is
    /// put in `default`, as kubectl does).
    pub fn of(object: &Value) -> Result<KubeRef, String> {
        let s = |v: &Value, what: &str| {
            v.as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| format!("the object has no {what}: {object}"))
        };
        Ok(KubeRef {
            api_version: s(&object["apiVersion"], "apiVersion")?,
            kind: s(&object["kind"], "kind")?,
            namespace: object["metadata"]["namespace"].as_str().map(str::to_string),
            name: s(&object["metadata"]["name"], "metadata.name")?,
        })
    }
}

impl std::fmt::Display for KubeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A client of one API server.
pub struct Session {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

fn failed(what: impl std::fmt::Display, e: impl std::fmt::Display) -> LabError {
    LabError::Kube {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

impl Session {
    /// A client from a kubeconfig file.
    pub fn open(kubeconfig: &str) -> Result<Session, LabError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed("start a runtime", e))?;
        let client = rt
            .block_on(trellis_kube::controller::client(Some(Path::new(
                kubeconfig,
            ))))
            .map_err(|e| failed(format!("connect with {kubeconfig}"), e))?;
        Ok(Session { rt, client })
    }

    /// The API of `r`'s kind where `r` lives.
    async fn api(&self, r: &KubeRef) -> Result<Api<DynamicObject>, kube::Error> {
        let (group, version) = r
            .api_version
            .rsplit_once('/')
            .unwrap_or(("", &r.api_version));
        let gvk = GroupVersionKind::gvk(group, version, &r.kind);
        let (ar, caps) = pinned_kind(&self.client, &gvk).await?;
        Ok(match caps.scope {
            Scope::Namespaced => Api::namespaced_with(
                self.client.clone(),
                r.namespace.as_deref().unwrap_or("default"),
                &ar,
            ),
            Scope::Cluster => Api::all_with(self.client.clone(), &ar),
        })
    }

    /// Creates `object`, or replaces the one of its name; `Some` (what names it) when it was
    /// created, `None` when it replaced one.
    pub fn put(&self, object: &Value) -> Result<Option<KubeRef>, LabError> {
        let r = KubeRef::of(object).map_err(|e| failed("write an object", e))?;
        let obj: DynamicObject =
            serde_json::from_value(object.clone()).map_err(|e| failed(&r, e))?;
        self.rt
            .block_on(async {
                let api = self.api(&r).await?;
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => return Ok(Some(r.clone())),
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(e),
                }
                let mut last = None;
                for _ in 0..ATTEMPTS {
                    let current = api.get(&r.name).await?;
                    let mut o = obj.clone();
                    o.metadata.resource_version = current.metadata.resource_version;
                    match api.replace(&r.name, &PostParams::default(), &o).await {
                        Ok(_) => return Ok(None),
                        Err(kube::Error::Api(s)) if s.code == 409 => last = Some(s),
                        Err(e) => return Err(e),
                    }
                }
                Err(kube::Error::Api(last.expect("ATTEMPTS > 0")))
            })
            .map_err(|e| failed(format!("create or replace {r}"), e))
    }

    /// Sets the labels of `r` to exactly `labels` (read, modify, replace with the version
    /// read; again on a conflict).
    pub fn set_labels(
        &self,
        r: &KubeRef,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), LabError> {
        self.rt
            .block_on(async {
                let api = self.api(r).await?;
                let mut last = None;
                for _ in 0..ATTEMPTS {
                    let mut o = api.get(&r.name).await?;
                    o.metadata.labels = Some(labels.clone());
                    match api.replace(&r.name, &PostParams::default(), &o).await {
                        Ok(_) => return Ok(()),
                        Err(kube::Error::Api(s)) if s.code == 409 => last = Some(s),
                        Err(e) => return Err(e),
                    }
                }
                Err(kube::Error::Api(last.expect("ATTEMPTS > 0")))
            })
            .map_err(|e| failed(format!("label {r}"), e))
    }

    /// Deletes `r` at once (no grace period: the lab's pods have no kubelet to confirm their
    /// end); one already gone is not an error.
    pub fn delete(&self, r: &KubeRef) -> Result<(), LabError> {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        self.rt
            .block_on(async {
                match self.api(r).await?.delete(&r.name, &dp).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .map_err(|e| failed(format!("delete {r}"), e))
    }
}

/// Deletes what the lab created, newest first (pods before their namespaces); every failure
/// is collected, none stops the rest.
pub fn delete_created(kubeconfig: &str, created: &[KubeRef]) -> Vec<LabError> {
    if created.is_empty() {
        return Vec::new();
    }
    let session = match Session::open(kubeconfig) {
        Ok(s) => s,
        Err(e) => return vec![e],
    };
    created
        .iter()
        .rev()
        .filter_map(|r| session.delete(r).err())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_is_named_by_its_version_kind_namespace_and_name() {
        let r = KubeRef::of(&serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x"}}))
        .unwrap();
        assert_eq!(r.to_string(), "Pod x/a");
        let e = KubeRef::of(&serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {}}))
        .unwrap_err();
        assert!(e.contains("metadata.name"), "{e}");
    }
}
