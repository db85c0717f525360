//! One request to a node's agent over its Unix socket (the socket the CNI plugin uses), for
//! the node-local commands (`node status`, `flows`). Does I/O: one socket round trip.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use trellis_agent_api::{Ok as Done, Reply, Request};

/// How long the agent has to answer (it answers from memory; a busy agent queues the request).
const TIMEOUT: Duration = Duration::from_secs(40);
/// The longest answer read.
const MAX_REPLY: u64 = 64 << 20;

/// Sends `req` and returns the agent's successful answer; `what` names the request in errors
/// (an agent older than it cannot decode it: code 6, unknown variant).
pub fn ask(socket: &Path, req: &Request, what: &str) -> Result<Done> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent at {} (is `trellis agent` running on this node? --socket names another socket)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)
        .with_context(|| format!("asking the agent at {}", socket.display()))?;
    let mut answer = String::new();
    BufReader::new(s.take(MAX_REPLY))
        .read_line(&mut answer)
        .with_context(|| format!("reading the agent's answer on {}", socket.display()))?;
    match serde_json::from_str::<Reply>(&answer) {
        Ok(Reply::Ok(done)) => Ok(done),
        Ok(Reply::Error(e)) if e.code == 6 && e.msg.contains("unknown variant") => bail!(
            "the agent at {} does not know the {what} request (it is older than this command): {}",
            socket.display(),
            e.msg
        ),
        Ok(Reply::Error(e)) => bail!("the agent answered error {}: {}", e.code, e.msg),
        Err(e) => bail!(
            "the agent at {} gave no {what} answer ({e}); is it older than this command?",
            socket.display()
        ),
    }
}
