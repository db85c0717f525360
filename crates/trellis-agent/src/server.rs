//! The Unix-socket server: one JSON request line in, one JSON reply line out, per connection.
//! Errors become codes the plugin passes on: 11 when the datastore is unreachable (or the agent
//! is busy), 100 when no address is available, 7 for requests the configuration cannot satisfy.
//!
//! Clients are bounded so none can hold the agent: at most [`MAX_CLIENTS`] connections are
//! served at once; up to [`MAX_CONNECTIONS`] in all are accepted, the others waiting (without a
//! buffer) for a place for up to [`QUEUE_DEADLINE`] — a node's burst of ADDs and DELs queues
//! rather than failing — and beyond that a connection is answered "busy" (code 11) and closed at
//! once. A request line is at most [`MAX_REQUEST_LINE`] bytes; a served connection's requests
//! must all arrive within [`REQUEST_DEADLINE`] of its being served (one deadline for the
//! connection, not one per line: a client that keeps asking must not keep its place while
//! others wait), and a reply that cannot be written within [`REPLY_DEADLINE`] ends the
//! connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use trellis_agent_api::{Attachment, ErrorReply, Ok as Done, Reply, Request};
use trellis_cluster::ipam::{release_unlisted, Request as IpamRequest};
use trellis_cluster::ClusterError;
use trellis_ipam::cluster::ClusterIpamError;

use crate::{Agent, AgentError};

/// Connections served at once (each may buffer a request line): the bound keeps a flood of
/// connections from exhausting memory.
pub const MAX_CLIENTS: usize = 128;
/// Connections accepted in all, served or waiting to be (a waiting one holds only its socket):
/// a runtime's burst of a few hundred ADDs or DELs on one node queues instead of failing.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long an accepted connection waits for a place before it is answered "busy".
pub const QUEUE_DEADLINE: Duration = Duration::from_secs(30);
/// Longest request line. The largest legitimate request is a GC listing every attachment on
/// the node (~110 bytes each): 256 KiB holds over 2 000.
pub const MAX_REQUEST_LINE: usize = 256 * 1024;
/// Time a served client has to send its request lines, counted once from when it was given its
/// place (the plugin sends one request per connection; a client that sends a line every few
/// seconds would otherwise hold its place forever, and [`MAX_CLIENTS`] such clients every place).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Time a reply may take to be written before the client is given up.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(10);

pub(crate) fn bind(path: &Path) -> Result<UnixListener, AgentError> {
    let err = |source| AgentError::Socket {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket file left by a previous run (kill -9) would make bind fail.
    if std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(err)
}

fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut out = serde_json::to_vec(reply).expect("reply serialises");
    out.push(b'\n');
    out
}

fn error_reply(code: u32, msg: impl Into<String>) -> Reply {
    Reply::Error(ErrorReply {
        code,
        msg: msg.into(),
    })
}

/// Descriptors kept for everything but socket clients (datastore, netlink, nft, metrics).
pub(crate) const RESERVED_FILES: usize = 256;

/// How many connections to accept in all with `files` descriptors allowed: [`MAX_CONNECTIONS`],
/// or fewer when the limit would not leave [`RESERVED_FILES`] for the rest.
fn connection_bound(files: u64) -> usize {
    let spare = usize::try_from(files)
        .unwrap_or(usize::MAX)
        .saturating_sub(RESERVED_FILES);
    MAX_CONNECTIONS.min(spare).max(1)
}

/// Serves the socket; `files` is the process's limit on open descriptors.
pub(crate) async fn serve(
    agent: Arc<Agent>,
    listener: UnixListener,
    files: u64,
) -> Result<(), AgentError> {
    let bound = connection_bound(files);
    let serving = Arc::new(Semaphore::new(MAX_CLIENTS.min(bound)));
    let accepted = Arc::new(Semaphore::new(bound));
    let busy = reply_line(&error_reply(
        11,
        format!("the agent has {bound} clients already; try again"),
    ));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors or a connection aborted before accept: transient.
                // Ending here would stop the agent serving every later ADD.
                tracing::warn!(error = %e, socket = %agent.config.socket.display(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(place) = accepted.clone().try_acquire_owned() else {
            // A fresh connection's send buffer is empty, so this short write never blocks;
            // no task is spawned for a client that is refused.
            let _ = stream.try_write(&busy);
            continue;
        };
        let (agent, serving, busy) = (agent.clone(), serving.clone(), busy.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(QUEUE_DEADLINE, serving.acquire_owned()).await {
                Ok(Ok(slot)) => {
                    if let Err(e) = connection(agent, stream).await {
                        tracing::debug!(error = %e, "client connection ended");
                    }
                    drop(slot);
                }
                _ => {
                    let _ = stream.try_write(&busy);
                }
            }
            drop(place);
        });
    }
}

/// How reading one request line ended.
enum Line {
    Request,
    /// The client closed the connection between requests.
    Closed,
    /// The line is longer than [`MAX_REQUEST_LINE`].
    TooLong,
    /// No whole line before the connection's deadline; `partial` when some bytes came.
    Late {
        partial: bool,
    },
}

async fn read_line(
    r: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) -> std::io::Result<Line> {
    buf.clear();
    // One byte more than the limit tells a line of exactly the limit from a longer one.
    let mut limited = r.take(MAX_REQUEST_LINE as u64 + 1);
    match tokio::time::timeout_at(deadline, limited.read_until(b'\n', buf)).await {
        Err(_) => Ok(Line::Late {
            partial: !buf.is_empty(),
        }),
        Ok(Err(e)) => Err(e),
        Ok(Ok(0)) => Ok(Line::Closed),
        Ok(Ok(_)) if buf.len() > MAX_REQUEST_LINE => Ok(Line::TooLong),
        // A last line without a newline before EOF is still a request.
        Ok(Ok(_)) => Ok(Line::Request),
    }
}

async fn send(w: &mut OwnedWriteHalf, reply: &Reply) -> std::io::Result<()> {
    tokio::time::timeout(REPLY_DEADLINE, w.write_all(&reply_line(reply)))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not read its reply",
            )
        })?
}

async fn connection(agent: Arc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
    loop {
        let reply = match read_line(&mut r, &mut line, deadline).await? {
            Line::Request => match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(&agent, req).await,
                Err(e) => error_reply(6, format!("cannot decode request: {e}")),
            },
            Line::Closed | Line::Late { partial: false } => return Ok(()),
            Line::TooLong => {
                let msg = format!("request line longer than {MAX_REQUEST_LINE} bytes");
                return send(&mut w, &error_reply(6, msg)).await;
            }
            Line::Late { partial: true } => {
                let msg = format!(
                    "request not received whole within {}s",
                    REQUEST_DEADLINE.as_secs()
                );
                return send(&mut w, &error_reply(6, msg)).await;
            }
        };
        send(&mut w, &reply).await?;
    }
}

fn code_of(e: &ClusterError) -> u32 {
    match e {
        ClusterError::Store(_)
        | ClusterError::Contention { .. }
        | ClusterError::NodeNotRegistered { .. }
        | ClusterError::PodNotSynced { .. } => 11,
        ClusterError::Ipam(ClusterIpamError::Exhausted { .. } | ClusterIpamError::InUse { .. })
        | ClusterError::HandleTaken { .. }
        | ClusterError::EndpointTaken { .. } => 100,
        ClusterError::Ipam(_)
        | ClusterError::Invalid(_)
        | ClusterError::Annotation { .. }
        | ClusterError::PodIpamRefused { .. }
        | ClusterError::FeatureDisabled { .. } => 7,
        _ => 999,
    }
}

fn failed(e: ClusterError) -> Reply {
    Reply::Error(ErrorReply {
        code: code_of(&e),
        msg: e.to_string(),
    })
}

fn ipam_request(a: &Attachment) -> IpamRequest {
    IpamRequest {
        network: a.network.clone(),
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
        ..Default::default()
    }
}

async fn handle(agent: &Agent, req: Request) -> Reply {
    match req {
        Request::Allocate {
            attachment,
            namespace,
            pod,
            pod_uid,
            host_interface,
            ips,
            ipv4_pools,
            ipv6_pools,
        } => {
            if let Some(uid) = &pod_uid {
                if let Err(reason) = trellis_cluster::ipam::check_pod_uid(uid) {
                    return error_reply(7, format!("K8S_POD_UID {uid:?}: {reason}"));
                }
            }
            if let (true, Some(name)) = (agent.config.kubernetes, &pod) {
                let ns = namespace.as_deref().filter(|n| !n.is_empty());
                let uid = pod_uid.as_deref();
                if let Err(reply) = wait_pod_record(agent, ns.unwrap_or("default"), name, uid).await
                {
                    return reply;
                }
            }
            let r = IpamRequest {
                namespace,
                pod,
                pod_uid,
                host_interface,
                requested_ips: ips,
                ipv4_pools,
                ipv6_pools,
                ..ipam_request(&attachment)
            };
            // The MTU first: a pod must not start at the wrong MTU, and failing before the
            // allocation leaves nothing to undo.
            let mtu = match crate::dataplane::current_pod_mtu(agent).await {
                Ok(m) => m,
                Err(e) => return error_reply(11, format!("cannot measure the pod MTU: {e}")),
            };
            match agent.ipam.allocate(&r).await {
                Ok(got) => Reply::Ok(Done {
                    ips: got
                        .iter()
                        .map(|(ip, block)| format!("{ip}/{}", block.prefix_len()))
                        .collect(),
                    node: Some(agent.config.node.clone()),
                    mtu: Some(mtu),
                    ..Default::default()
                }),
                Err(e) => failed(e),
            }
        }
        Request::Release { attachment } => {
            match agent.ipam.release(&ipam_request(&attachment)).await {
                Ok(released) => Reply::Ok(Done {
                    released,
                    ..Default::default()
                }),
                Err(e) => failed(e),
            }
        }
        Request::Check { attachment, ips } => {
            let req = ipam_request(&attachment);
            let handle = req.handle();
            match agent.ipam.held(&req).await {
                Ok(Some(held)) => {
                    let held: Vec<_> = held.into_iter().map(|(ip, _)| ip).collect();
                    match ips.iter().find(|ip| !held.contains(ip)) {
                        None => Reply::Ok(Done::default()),
                        Some(ip) => Reply::Error(ErrorReply {
                            code: 103,
                            msg: format!(
                                "address {ip} is not allocated to {handle} (it holds {held:?})"
                            ),
                        }),
                    }
                }
                Ok(None) => Reply::Error(ErrorReply {
                    code: 103,
                    msg: format!("no allocation for {handle}"),
                }),
                Err(e) => failed(e),
            }
        }
        Request::EndpointReady {
            attachment,
            host_interface,
        } => endpoint_ready(agent, &attachment, &host_interface).await,
        Request::Gc { network, keep } => match gc(agent, &network, &keep).await {
            Ok(released) => Reply::Ok(Done {
                released,
                ..Default::default()
            }),
            Err(e) => failed(e),
        },
        Request::Flows { query } => Reply::Ok(Done {
            node: Some(agent.config.node.clone()),
            flows: Some(match &agent.flows {
                Some(log) => log
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .query(&query, crate::flows::now_ms()),
                None => Default::default(),
            }),
            ..Default::default()
        }),
        Request::Health {} => Reply::Ok(Done {
            node: Some(agent.config.node.clone()),
            health: Some(agent.health_report()),
            ..Default::default()
        }),
        Request::Status {} => match trellis_cluster::ipam::load_settings(&*agent.store).await {
            Ok(s) if s.pools.iter().any(|p| !p.spec.disabled) => Reply::Ok(Done {
                node: Some(agent.config.node.clone()),
                ..Default::default()
            }),
            Ok(_) => Reply::Error(ErrorReply {
                code: 50,
                msg: "no enabled IPPool exists: ADD cannot get an address".into(),
            }),
            Err(e) => Reply::Error(ErrorReply {
                code: 50,
                msg: format!("datastore unusable: {e}"),
            }),
        },
    }
}

/// Kubernetes mode: waits until the agent's view holds the record of the pod an ADD names, for
/// this node — woken by the view's changes of pods' records, for at most
/// [`crate::POD_RECORD_DEADLINE`] — and otherwise answers code 11 naming the pod (the kubelet
/// retries the ADD). The kube-controller writes the record when the pod appears in the API
/// server, normally long before its sandbox exists.
async fn wait_pod_record(
    agent: &Agent,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
) -> Result<(), Reply> {
    let key = trellis_resources::key_for(trellis_resources::Kind::Pod, Some(namespace), pod);
    let node = agent.config.node.as_str();
    let deadline = tokio::time::Instant::now() + crate::POD_RECORD_DEADLINE;
    // Subscribed before the first look: a record arriving in between still wakes the wait.
    let mut changes = agent.view.subscribe_pods();
    let mut waiting = false;
    loop {
        changes.borrow_and_update();
        let found = match agent.view.read().get(&key).map(|s| &s.resource) {
            Some(trellis_resources::Resource::Pod(p)) => p.is_for(node, uid),
            _ => false,
        };
        if found {
            if waiting {
                tracing::info!(pod = %format!("{namespace}/{pod}"), "the pod's record arrived");
            }
            return Ok(());
        }
        if !waiting {
            tracing::info!(pod = %format!("{namespace}/{pod}"), "waiting for the pod's record");
            waiting = true;
        }
        if !matches!(
            tokio::time::timeout_at(deadline, changes.changed()).await,
            Ok(Ok(()))
        ) {
            let secs = crate::POD_RECORD_DEADLINE.as_secs();
            tracing::warn!(pod = %format!("{namespace}/{pod}"), "no record of the pod within {secs}s");
            return Err(error_reply(
                11,
                format!("pod {namespace}/{pod} has no record for node {node} in the datastore after {secs}s (trellis kube-controller writes it when the pod appears in the API server; is it running?); not creating its endpoint without the pod's labels"),
            ));
        }
    }
}

/// Answers once the endpoint's policy is in the kernel (never before the applier's first table is);
/// code 11 when it is not within [`ENDPOINT_READY_DEADLINE`].
async fn endpoint_ready(agent: &Agent, attachment: &Attachment, host_interface: &str) -> Reply {
    let limit = trellis_agent_api::ENDPOINT_READY_DEADLINE;
    match agent.policy.wait_programmed(host_interface, limit).await {
        Ok(()) => Reply::Ok(Done {
            node: Some(agent.config.node.clone()),
            ..Default::default()
        }),
        Err(e) => {
            tracing::warn!(container = %attachment.container_id, ifname = %attachment.ifname, error = %e, "endpoint not ready");
            error_reply(
                11,
                format!("{e}; the pod stays closed until it is (try again later)"),
            )
        }
    }
}

/// Releases this node's attachments of `network` that are not in `keep` — matched on the
/// attachment's network, container and interface, never on a handle prefix (network `k8s`
/// must not match `k8s.v2`).
async fn gc(
    agent: &Agent,
    network: &str,
    keep: &[Attachment],
) -> Result<Vec<std::net::IpAddr>, ClusterError> {
    let keep: Vec<(String, String, String)> = keep
        .iter()
        .map(|a| (a.network.clone(), a.container_id.clone(), a.ifname.clone()))
        .collect();
    release_unlisted(
        &*agent.store,
        &agent.config.node,
        network,
        &keep,
        trellis_cluster::now_secs(),
    )
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};

    use trellis_cluster::ipam::NodeIpam;
    use trellis_cluster::objects;
    use trellis_resources::parse_documents;

    use super::*;
    use crate::dataplane::{VxlanConfig, VXLAN_OVERHEAD};
    use crate::{bgp, register_node, AgentConfig};

    /// An agent on loopback (only read: its MTU), with a VXLAN pool, that has not yet run a
    /// dataplane pass.
    async fn agent(dir: &Path) -> Agent {
        let spec = format!("sqlite:{}", dir.join("t.db").display());
        let store = trellis_store::open(&spec).await.unwrap();
        let pool = "apiVersion: trellis.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.9.0.0/16, encapsulation: VXLAN}\n";
        for r in parse_documents(pool).unwrap() {
            objects::apply(&*store, &r, false).await.unwrap();
        }
        let address = "127.0.0.1/8".parse().unwrap();
        register_node(&*store, "n1", address, &BTreeMap::new())
            .await
            .unwrap();
        let vxlan = VxlanConfig {
            vni: 4096,
            port: 4789,
            mtu: None,
            checksum_offload: Default::default(),
        };
        Agent {
            config: AgentConfig {
                node: "n1".into(),
                datastore: spec,
                socket: dir.join("s.sock"),
                ip: crate::autodetect::Method::FirstFound,
                labels: BTreeMap::new(),
                heartbeat: Duration::from_secs(10),
                block_grace: Duration::from_secs(300),
                vxlan,
                resync: Duration::from_secs(2),
                bgp: bgp::Mode::Off,
                metrics: None,
                kubernetes: false,
                flow_logs: None,
                features: Default::default(),
                use_pod_cidr: false,
            },
            ipam: NodeIpam::new(store.clone(), "n1", BTreeMap::new()),
            store,
            address,
            vxlan,
            vxlan_offload: crate::offload::decide(Default::default(), "6.1"),
            pod_mtu: AtomicU32::new(0),
            bgp: Arc::new(bgp::Shared::default()),
            view: crate::view::SharedView::new(),
            dataplane_passes: std::sync::atomic::AtomicU64::new(0),
            policy: Default::default(),
            health: crate::health::Tracker::new(
                &[],
                Duration::from_secs(10),
                std::time::Instant::now(),
            ),
            flows: None,
        }
    }

    #[tokio::test]
    async fn an_add_before_the_first_pass_still_gets_the_mtu() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path()).await;
        let lo_mtu = std::fs::read_to_string("/sys/class/net/lo/mtu")
            .unwrap()
            .trim()
            .parse::<u32>()
            .unwrap();
        let req = Request::Allocate {
            attachment: Attachment {
                network: "k8s".into(),
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
            namespace: None,
            pod: None,
            pod_uid: None,
            host_interface: None,
            ips: vec![],
            ipv4_pools: vec![],
            ipv6_pools: vec![],
        };
        let Reply::Ok(done) = handle(&agent, req).await else {
            panic!("allocate failed");
        };
        assert_eq!(done.mtu, Some(lo_mtu - VXLAN_OVERHEAD));
        assert_eq!(
            agent.pod_mtu.load(Ordering::Relaxed),
            lo_mtu - VXLAN_OVERHEAD
        );
    }

    /// The pod UID the runtime passes (K8S_POD_UID) lands on the endpoint, where IPAM GC reads
    /// it; one that cannot be a UID is refused naming the variable, and nothing is allocated.
    #[tokio::test]
    async fn the_pod_uid_is_recorded_on_the_endpoint_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let agent = agent(dir.path()).await;
        let add = |cid: &str, uid: &str| Request::Allocate {
            attachment: Attachment {
                network: "k8s".into(),
                container_id: cid.into(),
                ifname: "eth0".into(),
            },
            namespace: Some("a".into()),
            pod: Some("p".into()),
            pod_uid: Some(uid.into()),
            host_interface: None,
            ips: vec![],
            ipv4_pools: vec![],
            ipv6_pools: vec![],
        };
        let Reply::Error(e) = handle(&agent, add("bad", "a b;c")).await else {
            panic!("a bad UID was taken");
        };
        assert!(e.code == 7 && e.msg.contains("K8S_POD_UID"), "{e:?}");
        let Reply::Ok(_) = handle(&agent, add("good", "0f1e-22")).await else {
            panic!("allocate failed");
        };
        let eps = trellis_cluster::objects::endpoints(&*agent.store)
            .await
            .unwrap();
        assert_eq!(eps.len(), 1, "{eps:?}");
        assert_eq!(
            eps[0]
                .0
                .metadata
                .annotations
                .get(trellis_cluster::ipam::POD_UID_ANNOTATION),
            Some(&"0f1e-22".to_string())
        );
    }

    /// A client that keeps asking (here an empty line, answered with an error, every second —
    /// well inside the per-request deadline) does not keep its place: with every place held
    /// by such clients, a waiting ADD is served once their connections' deadline passes, not
    /// turned away as busy when its own queue deadline passes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_that_keep_asking_do_not_keep_their_places() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Arc::new(agent(dir.path()).await);
        let socket = agent.config.socket.clone();
        let listener = bind(&socket).unwrap();
        tokio::spawn(serve(agent.clone(), listener, crate::raise_fd_limit()));
        let ask = |stream: UnixStream, line: &'static [u8]| async move {
            let (r, mut w) = stream.into_split();
            let mut r = BufReader::new(r);
            w.write_all(line).await.unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).await.unwrap();
            (r, w, reply)
        };
        // Every place taken, each holder proven served (it was answered).
        let mut holders = Vec::new();
        for _ in 0..MAX_CLIENTS {
            let s = UnixStream::connect(&socket).await.unwrap();
            let (r, w, reply) = ask(s, b"\n").await;
            assert!(reply.contains("\"code\":6"), "{reply}");
            holders.push(tokio::spawn(async move {
                let (mut r, mut w) = (r, w);
                // Asks again every second until the agent hangs up (bounded: 2 minutes).
                for _ in 0..120 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    if w.write_all(b"\n").await.is_err() {
                        return;
                    }
                    let mut reply = String::new();
                    match r.read_line(&mut reply).await {
                        Ok(n) if n > 0 => {}
                        _ => return,
                    }
                }
            }));
        }
        let s = UnixStream::connect(&socket).await.unwrap();
        let waited = tokio::time::Instant::now();
        let (_, _, reply) = tokio::time::timeout(
            QUEUE_DEADLINE + Duration::from_secs(30),
            ask(s, b"{\"op\":\"status\"}\n"),
        )
        .await
        .expect("the waiting client got an answer");
        assert!(
            reply.contains("\"ok\""),
            "a waiting client was turned away after {:?} while others kept their places: {reply}",
            waited.elapsed()
        );
        for h in holders {
            h.abort();
        }
    }

    #[test]
    fn the_connection_bound_leaves_descriptors_for_the_rest() {
        assert_eq!(connection_bound(1 << 20), MAX_CONNECTIONS);
        assert_eq!(connection_bound(1024), 1024 - RESERVED_FILES);
        assert_eq!(connection_bound(100), 1);
    }
}
