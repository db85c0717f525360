//! Client of the node agent's socket (cluster IPAM): one JSON line out, one back. An agent
//! that cannot be reached is "try again later" (code 11), as the spec intends for transient
//! unavailability.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use trellis_agent_api::{Ok as Done, Reply, Request};
use trellis_cni_types::{codes, CniError};

use crate::error::Result;

/// Connects, retrying for up to 5 s while the agent's accept queue is full (EAGAIN) — a burst of
/// pods on one node can briefly outrun it. A missing socket or a refused connection fails at once.
fn connect(socket: &Path) -> std::io::Result<UnixStream> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(socket) {
            Err(e)
                if e.raw_os_error() == Some(libc::EAGAIN)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Sends one request and waits (up to 30 s) for the reply.
pub fn call(socket: &Path, req: &Request) -> Result<Done> {
    let unreachable = |e: std::io::Error| {
        CniError::new(
            codes::TRY_AGAIN,
            format!("the trellis agent is not reachable at {}: {e} (is `trellis agent` running on this node?)", socket.display()),
        )
    };
    let mut stream = connect(socket).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(req).expect("requests serialise");
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    if reply.is_empty() {
        return Err(CniError::new(
            codes::TRY_AGAIN,
            format!(
                "the trellis agent at {} closed the connection without answering",
                socket.display()
            ),
        )
        .into());
    }
    match serde_json::from_str::<Reply>(&reply) {
        Ok(Reply::Ok(ok)) => Ok(ok),
        Ok(Reply::Error(e)) => {
            Err(CniError::new(e.code, format!("trellis agent: {}", e.msg)).into())
        }
        Err(e) => Err(CniError::new(
            codes::DECODE,
            format!("cannot decode the agent's reply: {e}"),
        )
        .into()),
    }
}
