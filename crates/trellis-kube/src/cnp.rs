//! ClusterNetworkPolicies (`policy.networking.k8s.io`, a CRD: no k8s-openapi types) for the
//! sync shell (I/O): which version the API server serves — `v1beta1`, else `v1alpha2`, asked
//! of its discovery endpoint (a non-resource URL every authenticated client may read, so no
//! RBAC grant) — then a watcher of that version as [`DynamicObject`]s, translated by
//! [`crate::translate::cluster_network_policy`] and mirrored like NetworkPolicies.
//!
//! A cluster without the CRD is not an error: the controller says so and asks again every
//! [`DISCOVERY_RETRY`]; until a version is found the kind is never planned, so nothing stored
//! is deleted meanwhile.

use std::time::Duration;

use kube::api::{ApiResource, DynamicObject, GroupVersionKind, TypeMeta};
use kube::{Api, Client};
use tokio::sync::mpsc;
use trellis_resources::cnp::{CNP_API_VERSION, CNP_API_VERSION_ALPHA2};
use trellis_resources::Kind;

use crate::controller::{mirror, watch_kind, Entry, Input, Target};
use crate::gc_plan::Identity;
use crate::translate;

/// The API group and kind.
pub const GROUP: &str = "policy.networking.k8s.io";
pub const KIND: &str = "ClusterNetworkPolicy";
/// The resource (plural) the versions are served under.
pub const PLURAL: &str = "clusternetworkpolicies";

/// How long the controller waits before asking again when no version is served.
pub const DISCOVERY_RETRY: Duration = Duration::from_secs(10);

/// The versions Trellis reads, preferred first (the newest the API server serves wins).
pub const VERSIONS: [&str; 2] = [CNP_API_VERSION, CNP_API_VERSION_ALPHA2];

/// The first of [`VERSIONS`] whose discovery lists [`PLURAL`]; `None` when none does (the CRD
/// is not installed) or discovery fails (reported, asked again later).
pub async fn served_version(client: &Client) -> Option<&'static str> {
    for v in VERSIONS {
        match client.list_api_group_resources(v).await {
            Ok(list) if list.resources.iter().any(|r| r.name == PLURAL) => return Some(v),
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(group_version = v, error = %e, "ClusterNetworkPolicy discovery failed");
            }
        }
    }
    None
}

/// The cache entry of one object seen at `api_version`: list items of a custom resource carry
/// their `apiVersion`, but one without it is read as the version it was listed at.
pub(crate) fn entry(api_version: &str, o: &DynamicObject) -> (String, Entry) {
    let mut o = o.clone();
    if o.types.is_none() {
        o.types = Some(TypeMeta {
            api_version: api_version.to_string(),
            kind: KIND.to_string(),
        });
    }
    mirror(
        Kind::ClusterNetworkPolicy,
        &o.metadata,
        translate::cluster_network_policy(&o),
    )
}

/// Finds the served version (asking again until there is one), then follows it.
pub(crate) fn spawn_watch(client: Client, tx: mpsc::Sender<Input>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let version = loop {
            if let Some(v) = served_version(&client).await {
                break v;
            }
            tracing::info!(
                group = GROUP,
                retry_seconds = DISCOVERY_RETRY.as_secs(),
                "the API server serves no ClusterNetworkPolicy version Trellis reads (v1beta1, v1alpha2): not syncing them; asking again"
            );
            tokio::time::sleep(DISCOVERY_RETRY).await;
        };
        tracing::info!(api_version = version, "syncing ClusterNetworkPolicies");
        let (group, v) = version.split_once('/').expect("a group version");
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, v, KIND), PLURAL);
        let api: Api<DynamicObject> = Api::all_with(client, &ar);
        watch_kind(api, Target::ClusterNetworkPolicies, tx, move |o| {
            let (k, e) = entry(version, o);
            (k, e, Identity::default())
        })
        .await;
    })
}
