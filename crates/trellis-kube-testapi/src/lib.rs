//! **A TEST DOUBLE, never shipped**: a small in-memory Kubernetes API server on loopback for
//! the kube-controller's tests (no real API server can be installed on these machines). Used
//! only as a dev-dependency.
//!
//! It implements what the controller relies on, as the real API server behaves:
//! - list (`GET /api/v1/pods`, `/apis/networking.k8s.io/v1/networkpolicies`, namespaced paths
//!   too) with the list's `resourceVersion`, and `labelSelector` equality terms (`k=v,k2=v2`);
//! - `?watch=1` streams from a `resourceVersion` (ADDED / MODIFIED / DELETED events, BOOKMARK
//!   events every 200 ms when `allowWatchBookmarks` is set); a resume from a compacted version
//!   gets an `ERROR` event carrying a `Status` with code 410, reason `Expired` (what the API
//!   server's watch cache sends);
//! - get / create (POST) / replace (PUT, 409 `Conflict` on a stale `resourceVersion`) / delete
//!   of single objects (the controller's Leases; the lab's Namespaces, Nodes, Pods and
//!   policies when it runs on the Kubernetes path); `Status` errors (404 `NotFound`, 409
//!   `AlreadyExists`/`Conflict`, 400 `BadRequest`);
//! - discovery of a group version's resources (`GET /api/v1`, `GET /apis/GROUP/VERSION`: an
//!   `APIResourceList`), 404 for a group version it does not serve;
//! - ClusterNetworkPolicies (`policy.networking.k8s.io`) in `v1beta1` and `v1alpha2`, each
//!   version its own collection (a real CRD converts between served versions; the tests use
//!   one at a time), either of which [`TestApiServer::unserve`] takes away as if the CRD did
//!   not serve it.
//!
//! Test hooks: [`TestApiServer::put`], [`TestApiServer::delete`],
//! [`TestApiServer::hide`] (lists — and optionally GETs — leave objects out: an API server
//! briefly answering an empty or partial list),
//! [`TestApiServer::gap`]
//! (changes made while every watch is dropped and history compacted, so the next resume gets
//! 410 and the client must list again), [`TestApiServer::compact`],
//! [`TestApiServer::drop_watches`], [`TestApiServer::unserve`], counters of requests, and
//! [`TestApiServer::seen`]: every
//! request as RBAC authorises it (verb, API group, resource, namespace, name), also those for
//! resources this server does not serve.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::{json, Value};

/// (group/version, plural) — e.g. `("v1", "pods")`, `("coordination.k8s.io/v1", "leases")`.
pub type ResourceType = (&'static str, &'static str);

pub const NAMESPACES: ResourceType = ("v1", "namespaces");
pub const PODS: ResourceType = ("v1", "pods");
pub const SERVICE_ACCOUNTS: ResourceType = ("v1", "serviceaccounts");
pub const NODES: ResourceType = ("v1", "nodes");
pub const NETWORK_POLICIES: ResourceType = ("networking.k8s.io/v1", "networkpolicies");
pub const LEASES: ResourceType = ("coordination.k8s.io/v1", "leases");
pub const CLUSTER_NETWORK_POLICIES: ResourceType =
    ("policy.networking.k8s.io/v1beta1", "clusternetworkpolicies");
pub const CLUSTER_NETWORK_POLICIES_V1ALPHA2: ResourceType = (
    "policy.networking.k8s.io/v1alpha2",
    "clusternetworkpolicies",
);

const KNOWN: [(ResourceType, &str, bool); 8] = [
    (NAMESPACES, "Namespace", false),
    (PODS, "Pod", true),
    (SERVICE_ACCOUNTS, "ServiceAccount", true),
    (NODES, "Node", false),
    (NETWORK_POLICIES, "NetworkPolicy", true),
    (LEASES, "Lease", true),
    (CLUSTER_NETWORK_POLICIES, "ClusterNetworkPolicy", false),
    (
        CLUSTER_NETWORK_POLICIES_V1ALPHA2,
        "ClusterNetworkPolicy",
        false,
    ),
];

fn kind_of(gv: &str, plural: &str) -> Option<(ResourceType, &'static str, bool)> {
    KNOWN
        .iter()
        .copied()
        .find(|((g, p), _, _)| *g == gv && *p == plural)
}

type Key = (String, String, String); // (gv/plural, namespace or "", name)

#[derive(Debug, Clone)]
struct LogEntry {
    rv: u64,
    resource: String,
    namespace: String,
    event: &'static str,
    object: Value,
}

/// The server's data: objects, the event history and the watch generation.
#[derive(Debug, Default)]
pub struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    log: Vec<LogEntry>,
    /// Resumes from a version below this get 410.
    compacted: u64,
    /// Resources whose create/replace requests are answered 500 (a failing API server).
    refused: Vec<String>,
    /// Objects that lists (and watches started without a version) leave out — an API server,
    /// or a cache in front of it, briefly answering an empty or partial list: (resource, the
    /// object's `namespace/name` or name — `None` for all —, also hidden from GETs).
    hidden: Vec<(String, Option<String>, bool)>,
    /// Bumped to end every open watch.
    watch_gen: u64,
    /// Resources answered 404 and left out of discovery (a CRD version not served).
    unserved: Vec<String>,
}

fn resource_id(r: ResourceType) -> String {
    format!("{}/{}", r.0, r.1)
}

impl State {
    /// Creates or replaces an object (its `metadata.name`/`namespace` say where); returns its
    /// new resourceVersion.
    pub fn put(&mut self, r: ResourceType, mut object: Value) -> u64 {
        let (_, kind, namespaced) = kind_of(r.0, r.1).expect("a known resource");
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let ns = if namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        self.rv += 1;
        object["apiVersion"] = json!(r.0);
        object["kind"] = json!(kind);
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        if namespaced {
            object["metadata"]["namespace"] = json!(ns);
        }
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}", self.rv));
        }
        let key = (resource_id(r), ns.clone(), name);
        let event = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key, object.clone());
        self.log.push(LogEntry {
            rv: self.rv,
            resource: resource_id(r),
            namespace: ns,
            event,
            object,
        });
        self.rv
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&mut self, r: ResourceType, namespace: &str, name: &str) -> bool {
        let key = (resource_id(r), namespace.to_string(), name.to_string());
        let Some(mut object) = self.objects.remove(&key) else {
            return false;
        };
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log.push(LogEntry {
            rv: self.rv,
            resource: key.0,
            namespace: key.1,
            event: "DELETED",
            object,
        });
        true
    }

    /// Whether a list (`get` false) or GET (`get` true) hides the object at `key`.
    fn hidden(&self, key: &Key, get: bool) -> bool {
        let named = if key.1.is_empty() {
            key.2.clone()
        } else {
            format!("{}/{}", key.1, key.2)
        };
        self.hidden.iter().any(|(r, n, gets)| {
            *r == key.0 && n.as_ref().is_none_or(|n| *n == named) && (!get || *gets)
        })
    }

    /// One object.
    pub fn get(&self, r: ResourceType, namespace: &str, name: &str) -> Option<Value> {
        self.objects
            .get(&(resource_id(r), namespace.to_string(), name.to_string()))
            .cloned()
    }
}

/// One request as the API server's authoriser sees it (RBAC's request attributes).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Request {
    /// get, list, watch, create, update, patch, delete or deletecollection.
    pub verb: String,
    /// The API group (`""` for the core group).
    pub group: String,
    /// The resource (plural), with `/subresource` when there is one.
    pub resource: String,
    /// The namespace of a namespaced path (`None`: cluster-wide).
    pub namespace: Option<String>,
    pub name: Option<String>,
}

/// RBAC's attributes of a request (`None` for paths outside `/api` and `/apis`).
fn authz_attributes(method: &Method, uri: &Uri) -> Option<Request> {
    let segs: Vec<&str> = uri.path().trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _v, rest @ ..] => ("", rest),
        ["apis", g, _v, rest @ ..] => (*g, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name) = match rest {
        [r] => (r.to_string(), None),
        [r, n] => (r.to_string(), Some(n.to_string())),
        [r, n, sub] => (format!("{r}/{sub}"), Some(n.to_string())),
        _ => return None,
    };
    let watch = matches!(
        query(uri).get("watch").map(String::as_str),
        Some("1" | "true")
    );
    let verb = match (method.as_str(), name.is_some()) {
        ("GET", false) if watch => "watch",
        ("GET", false) => "list",
        ("GET", true) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", false) => "deletecollection",
        ("DELETE", true) => "delete",
        _ => return None,
    };
    Some(Request {
        verb: verb.into(),
        group: group.into(),
        resource,
        namespace,
        name,
    })
}

struct Shared {
    state: Mutex<State>,
    /// Every request's RBAC attributes, in arrival order.
    seen: Mutex<Vec<Request>>,
    changed: tokio::sync::watch::Sender<u64>,
    requests: AtomicU64,
    watches: AtomicU64,
    lists: AtomicU64,
}

impl Shared {
    fn notify(&self) {
        self.changed.send_modify(|n| *n += 1);
    }
}

/// The running test API server (stopped when dropped).
pub struct TestApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestApiServer {
    /// Starts on a free loopback port (inside a tokio runtime).
    pub async fn start() -> TestApiServer {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            seen: Mutex::new(Vec::new()),
            changed: tokio::sync::watch::channel(0).0,
            requests: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            lists: AtomicU64::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TestApiServer { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file's text pointing at this server (no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\nusers:\n- name: test\n  user: {{}}\n",
            self.url()
        )
    }

    /// Creates or replaces an object.
    pub fn put(&self, r: ResourceType, object: Value) -> u64 {
        let rv = self.shared.state.lock().expect("state").put(r, object);
        self.shared.notify();
        rv
    }

    /// Deletes an object; whether it existed.
    pub fn delete(&self, r: ResourceType, namespace: &str, name: &str) -> bool {
        let done = self
            .shared
            .state
            .lock()
            .expect("state")
            .delete(r, namespace, name);
        self.shared.notify();
        done
    }

    pub fn get(&self, r: ResourceType, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .state
            .lock()
            .expect("state")
            .get(r, namespace, name)
    }

    /// Changes made in a gap: every open watch is ended before any of them is sent and the
    /// history up to them compacted, so clients see them only by listing again (after 410).
    pub fn gap(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.shared.state.lock().expect("state");
        st.watch_gen += 1;
        f(&mut st);
        st.compacted = st.rv;
        drop(st);
        self.shared.notify();
    }

    /// Changes made while every open watch is ended (history kept): clients see them only by
    /// resuming from their last version.
    pub fn while_dropped(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.shared.state.lock().expect("state");
        st.watch_gen += 1;
        f(&mut st);
        drop(st);
        self.shared.notify();
    }

    /// Answers every create and replace of `r` with 500 (`refuse`), or serves them again.
    pub fn refuse_writes(&self, r: ResourceType, refuse: bool) {
        let mut st = self.shared.state.lock().expect("state");
        st.refused.retain(|x| *x != resource_id(r));
        if refuse {
            st.refused.push(resource_id(r));
        }
    }

    /// Lists of `r` leave out the object `name` (`namespace/name` when namespaced; `None`:
    /// every object), and with `gets` GETs answer 404 for it too — until [`Self::unhide`].
    /// Watches already open are not affected; a client sees the lie when it lists again.
    pub fn hide(&self, r: ResourceType, name: Option<&str>, gets: bool) {
        let mut st = self.shared.state.lock().expect("state");
        st.hidden
            .push((resource_id(r), name.map(str::to_string), gets));
    }

    /// Lists and GETs of `r` answer truthfully again.
    pub fn unhide(&self, r: ResourceType) {
        let mut st = self.shared.state.lock().expect("state");
        st.hidden.retain(|(x, _, _)| *x != resource_id(r));
    }

    /// Stops serving `r` (404 to every request, absent from discovery), as a cluster without
    /// that CRD version; `serve` again with `false`.
    pub fn unserve(&self, r: ResourceType, unserved: bool) {
        let mut st = self.shared.state.lock().expect("state");
        st.unserved.retain(|x| *x != resource_id(r));
        if unserved {
            st.unserved.push(resource_id(r));
        }
        drop(st);
        self.drop_watches();
    }

    /// Forgets the history: a resume from any version before now gets 410.
    pub fn compact(&self) {
        let mut st = self.shared.state.lock().expect("state");
        st.compacted = st.rv;
    }

    /// Ends every open watch (clients resume from their last version).
    pub fn drop_watches(&self) {
        self.shared.state.lock().expect("state").watch_gen += 1;
        self.shared.notify();
    }

    /// Requests served, and watches opened, so far.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    pub fn watches(&self) -> u64 {
        self.shared.watches.load(Ordering::Relaxed)
    }

    /// Every request so far as RBAC authorises it, in arrival order.
    pub fn seen(&self) -> Vec<Request> {
        self.shared.seen.lock().expect("seen").clone()
    }

    /// Collection reads (lists) served so far.
    pub fn lists(&self) -> u64 {
        self.shared.lists.load(Ordering::Relaxed)
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    json_response(code, &body)
}

fn json_response(code: u16, v: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).expect("status"))
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .expect("response")
}

/// A parsed request path.
struct Target {
    resource: ResourceType,
    kind: &'static str,
    namespaced: bool,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (gv, rest): (String, &[&str]) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        ["namespaces", ns, plural] if !plural.is_empty() => (Some(ns.to_string()), *plural, None),
        [plural, name] => (None, *plural, Some(name.to_string())),
        [plural] => (None, *plural, None),
        _ => return None,
    };
    let (resource, kind, namespaced) = kind_of(&gv, plural)?;
    Some(Target {
        resource,
        kind,
        namespaced,
        namespace,
        name,
    })
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `k=v,k2=v2` (equality terms only; what these tests use).
fn selector_matches(selector: &str, object: &Value) -> bool {
    selector.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term
            .split_once("==")
            .or_else(|| term.split_once('='))
            .unwrap_or((term, ""));
        object["metadata"]["labels"][k].as_str() == Some(v)
    })
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = authz_attributes(&method, &uri) {
        shared.seen.lock().expect("seen").push(r);
    }
    if method == Method::GET {
        if let Some(gv) = discovery_path(uri.path()) {
            return discovery(&shared, &gv);
        }
    }
    let unserved = |t: &Target| {
        let st = shared.state.lock().expect("state");
        st.unserved.contains(&resource_id(t.resource))
    };
    let Some(t) = parse_path(uri.path()).filter(|t| !unserved(t)) else {
        return status(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource {}",
                uri.path()
            ),
        );
    };
    let q = query(&uri);
    let ns = t.namespace.clone().unwrap_or_default();
    match (&method, &t.name) {
        (&Method::GET, None)
            if matches!(q.get("watch").map(String::as_str), Some("1" | "true")) =>
        {
            watch(shared, t, q)
        }
        (&Method::GET, None) => list(&shared, &t, &q),
        (&Method::GET, Some(name)) => match get_visible(&shared, &t, &ns, name) {
            Some(o) => json_response(200, &o),
            None => status(
                404,
                "NotFound",
                format!("{} {name:?} not found", t.resource.1),
            ),
        },
        (&Method::POST, None) => write(&shared, &t, &body, None),
        (&Method::PUT, Some(name)) => write(&shared, &t, &body, Some(name.clone())),
        (&Method::DELETE, Some(name)) => {
            let existed = shared
                .state
                .lock()
                .expect("state")
                .delete(t.resource, &ns, name);
            shared.notify();
            if existed {
                status(200, "", "deleted".into())
            } else {
                status(
                    404,
                    "NotFound",
                    format!("{} {name:?} not found", t.resource.1),
                )
            }
        }
        _ => status(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        ),
    }
}

/// One object as a GET sees it (`None` also when a test hides it from GETs).
fn get_visible(shared: &Shared, t: &Target, ns: &str, name: &str) -> Option<Value> {
    let st = shared.state.lock().expect("state");
    let key = (resource_id(t.resource), ns.to_string(), name.to_string());
    st.get(t.resource, ns, name)
        .filter(|_| !st.hidden(&key, true))
}

/// The group version a discovery path names (`/api/v1` → `v1`, `/apis/g/v` → `g/v`).
fn discovery_path(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", v] => Some(v.to_string()),
        ["apis", g, v] => Some(format!("{g}/{v}")),
        _ => None,
    }
}

/// An `APIResourceList` of the served resources of group version `gv` (404 when none).
fn discovery(shared: &Shared, gv: &str) -> Response {
    let st = shared.state.lock().expect("state");
    let resources: Vec<Value> = KNOWN
        .iter()
        .filter(|(r, _, _)| r.0 == gv && !st.unserved.contains(&resource_id(*r)))
        .map(|((_, plural), kind, namespaced)| {
            json!({"name": plural, "singularName": kind.to_lowercase(), "namespaced": namespaced,
                   "kind": kind, "verbs": ["create", "delete", "get", "list", "update", "watch"]})
        })
        .collect();
    if resources.is_empty() {
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource (group version {gv})"),
        );
    }
    json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": resources}),
    )
}

fn list(shared: &Shared, t: &Target, q: &BTreeMap<String, String>) -> Response {
    shared.lists.fetch_add(1, Ordering::Relaxed);
    let st = shared.state.lock().expect("state");
    let id = resource_id(t.resource);
    let selector = q.get("labelSelector").cloned().unwrap_or_default();
    let items: Vec<Value> = st
        .objects
        .iter()
        .filter(|(k, _)| !st.hidden(k, false))
        .filter(|((r, ns, _), _)| *r == id && t.namespace.as_ref().is_none_or(|n| n == ns))
        .filter(|(_, o)| selector_matches(&selector, o))
        .map(|(_, o)| o.clone())
        .collect();
    json_response(
        200,
        &json!({
            "apiVersion": t.resource.0, "kind": format!("{}List", t.kind),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        }),
    )
}

fn write(shared: &Shared, t: &Target, body: &[u8], name: Option<String>) -> Response {
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return status(400, "BadRequest", "the body is not JSON".into());
    };
    if t.namespaced {
        object["metadata"]["namespace"] = json!(t.namespace.clone().unwrap_or_default());
    }
    let Some(obj_name) = object["metadata"]["name"].as_str().map(str::to_string) else {
        return status(400, "BadRequest", "metadata.name is required".into());
    };
    if name.as_ref().is_some_and(|n| *n != obj_name) {
        return status(
            400,
            "BadRequest",
            "the name in the body does not match the URL".into(),
        );
    }
    let ns = t.namespace.clone().unwrap_or_default();
    let mut st = shared.state.lock().expect("state");
    if st.refused.contains(&resource_id(t.resource)) {
        return status(500, "InternalError", "writes refused by the test".into());
    }
    let current = st.get(t.resource, &ns, &obj_name);
    match (&name, &current) {
        (None, Some(_)) => {
            return status(
                409,
                "AlreadyExists",
                format!("{} {obj_name:?} already exists", t.resource.1),
            )
        }
        (Some(_), None) => {
            return status(
                404,
                "NotFound",
                format!("{} {obj_name:?} not found", t.resource.1),
            )
        }
        (Some(_), Some(cur)) => {
            let given = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
            let stored = cur["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !given.is_empty() && given != stored {
                return status(
                    409,
                    "Conflict",
                    format!("Operation cannot be fulfilled on {} {obj_name:?}: the object has been modified; please apply your changes to the latest version and try again", t.resource.1),
                );
            }
            object["metadata"]["uid"] = cur["metadata"]["uid"].clone();
        }
        (None, None) => {}
    }
    st.put(t.resource, object);
    let stored = st.get(t.resource, &ns, &obj_name).expect("just written");
    drop(st);
    shared.notify();
    json_response(if name.is_none() { 201 } else { 200 }, &stored)
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": kind, "object": object})))
}

fn watch(shared: Arc<Shared>, t: Target, q: BTreeMap<String, String>) -> Response {
    shared.watches.fetch_add(1, Ordering::Relaxed);
    let from: Option<u64> = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0);
    let bookmarks = q
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true" || v == "1");
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    let mut changed = shared.changed.subscribe();
    tokio::spawn(async move {
        let id = resource_id(t.resource);
        let matches = |r: &str, ns: &str| r == id && t.namespace.as_deref().is_none_or(|n| n == ns);
        let (gen, mut sent_up_to, first) = {
            let st = shared.state.lock().expect("state");
            match from {
                Some(rv) if rv < st.compacted => {
                    let gone = json!({
                        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {rv} ({})", st.compacted),
                        "reason": "Expired", "code": 410,
                    });
                    (st.watch_gen, rv, vec![event_line("ERROR", &gone)])
                }
                Some(rv) => (st.watch_gen, rv, Vec::new()),
                // No version: the current state as ADDED events, then changes.
                None => {
                    let lines = st
                        .objects
                        .iter()
                        .filter(|(k, _)| !st.hidden(k, false))
                        .filter(|((r, ns, _), _)| matches(r, ns))
                        .map(|(_, o)| event_line("ADDED", o))
                        .collect();
                    (st.watch_gen, st.rv, lines)
                }
            }
        };
        let expired = from.is_some_and(|rv| rv < shared.state.lock().expect("state").compacted);
        for l in first {
            if tx.send(l).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        loop {
            let lines: Vec<Bytes> = {
                let st = shared.state.lock().expect("state");
                if st.watch_gen != gen {
                    return;
                }
                let new: Vec<Bytes> = st
                    .log
                    .iter()
                    .filter(|e| e.rv > sent_up_to && matches(&e.resource, &e.namespace))
                    .map(|e| event_line(e.event, &e.object))
                    .collect();
                sent_up_to = st.rv;
                new
            };
            for l in lines {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            let tick = tokio::time::timeout(Duration::from_millis(200), changed.changed()).await;
            if tick.is_err() && bookmarks {
                let bm = json!({"kind": t.kind, "apiVersion": t.resource.0,
                                "metadata": {"resourceVersion": sent_up_to.to_string()}});
                if tx.send(event_line("BOOKMARK", &bm)).await.is_err() {
                    return;
                }
            }
            if matches!(tick, Ok(Err(_))) {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<Bytes, Infallible>(b), rx))
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(method: Method, uri: &str) -> Option<(String, String, String, Option<String>)> {
        authz_attributes(&method, &uri.parse().unwrap())
            .map(|r| (r.verb, r.group, r.resource, r.namespace))
    }

    #[test]
    fn requests_are_recorded_as_rbac_sees_them() {
        let s = |x: &str| x.to_string();
        assert_eq!(
            attrs(Method::GET, "/api/v1/pods?limit=500"),
            Some((s("list"), s(""), s("pods"), None))
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/apis/networking.k8s.io/v1/networkpolicies?watch=true&resourceVersion=3"
            ),
            Some((
                s("watch"),
                s("networking.k8s.io"),
                s("networkpolicies"),
                None
            ))
        );
        assert_eq!(
            attrs(
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/l"
            ),
            Some((
                s("get"),
                s("coordination.k8s.io"),
                s("leases"),
                Some(s("kube-system"))
            ))
        );
        assert_eq!(
            attrs(
                Method::POST,
                "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"
            ),
            Some((
                s("create"),
                s("coordination.k8s.io"),
                s("leases"),
                Some(s("kube-system"))
            ))
        );
        assert_eq!(
            attrs(Method::PUT, "/api/v1/namespaces/a/pods/p/status"),
            Some((s("update"), s(""), s("pods/status"), Some(s("a"))))
        );
        // A Namespace object itself is cluster-scoped.
        assert_eq!(
            attrs(Method::GET, "/api/v1/namespaces/a"),
            Some((s("get"), s(""), s("namespaces"), None))
        );
        assert_eq!(attrs(Method::GET, "/version"), None);
    }
}
