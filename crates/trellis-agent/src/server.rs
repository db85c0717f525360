//! The Unix-socket server: one JSON request line in, one JSON reply line out, per connection.
//! Errors become codes the plugin passes on: 11 when the datastore is unreachable, 100 when no
//! address is available, 7 for requests the configuration cannot satisfy.

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use trellis_agent_api::{Attachment, ErrorReply, Ok as Done, Reply, Request};
use trellis_cluster::ipam::{release_unlisted, Request as IpamRequest};
use trellis_cluster::ClusterError;
use trellis_ipam::cluster::ClusterIpamError;

use crate::{Agent, AgentError};

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

pub(crate) async fn serve(agent: Arc<Agent>, listener: UnixListener) -> Result<(), AgentError> {
    loop {
        let (stream, _) = listener
            .accept()
            .await
            .map_err(|source| AgentError::Socket {
                path: agent.config.socket.clone(),
                source,
            })?;
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(agent, stream).await {
                tracing::debug!(error = %e, "client connection ended");
            }
        });
    }
}

async fn connection(agent: Arc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => handle(&agent, req).await,
            Err(e) => Reply::Error(ErrorReply {
                code: 6,
                msg: format!("cannot decode request: {e}"),
            }),
        };
        let mut out = serde_json::to_vec(&reply).expect("reply serialises");
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

fn code_of(e: &ClusterError) -> u32 {
    match e {
        ClusterError::Store(_)
        | ClusterError::Contention { .. }
        | ClusterError::NodeNotRegistered { .. } => 11,
        ClusterError::Ipam(ClusterIpamError::Exhausted { .. } | ClusterIpamError::InUse { .. }) => {
            100
        }
        ClusterError::Ipam(_) | ClusterError::Invalid(_) => 7,
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
            host_interface,
            ips,
            ipv4_pools,
            ipv6_pools,
        } => {
            let r = IpamRequest {
                namespace,
                pod,
                host_interface,
                requested_ips: ips,
                ipv4_pools,
                ipv6_pools,
                ..ipam_request(&attachment)
            };
            match agent.ipam.allocate(&r).await {
                Ok(got) => Reply::Ok(Done {
                    ips: got
                        .iter()
                        .map(|(ip, block)| format!("{ip}/{}", block.prefix_len()))
                        .collect(),
                    node: Some(agent.config.node.clone()),
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
        Request::Gc { network, keep } => match gc(agent, &network, &keep).await {
            Ok(released) => Reply::Ok(Done {
                released,
                ..Default::default()
            }),
            Err(e) => failed(e),
        },
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
