//! nftables through its JSON API: `nft -j -f -` applies a whole batch atomically (all or
//! nothing), and `nft -j list` reads state back. Runs `nft` in the caller's namespace, and
//! never waits on it for ever: a run that outlives its deadline ([`DEADLINE`]) is killed with
//! everything it started, and reported.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::{DataplaneError, Result};

/// How long one `nft` run may take. Large rulesets load in well under a second; a run this long
/// is stuck (a wedged netlink socket, a hung binary), and waiting longer would stall the caller
/// (the agent's dataplane loop, a CNI ADD).
pub const DEADLINE: Duration = Duration::from_secs(30);

fn nft_binary() -> String {
    std::env::var("TRELLIS_NFT").unwrap_or_else(|_| "nft".to_string())
}

fn nft_err(message: String) -> DataplaneError {
    DataplaneError::Nft { message }
}

/// Runs `program args`, feeding it `input`, and collects its output; kills it (and its process
/// group) when `deadline` passes first.
pub fn run(program: &str, args: &[&str], input: &[u8], deadline: Duration) -> Result<Output> {
    let child = spawn(program, args)?;
    finish(child, program, args, input, deadline)
}

/// Starts `program args` with piped stdio, in a process group of its own (so a kill reaches
/// anything it started, which could otherwise hold the output pipes open).
fn spawn(program: &str, args: &[&str]) -> Result<Child> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| {
            nft_err(format!(
                "cannot run {program} (is the nftables package installed?): {e}"
            ))
        })
}

/// Feeds a started child its input and collects its output, killing it at `deadline`.
fn finish(
    mut child: Child,
    program: &str,
    args: &[&str],
    input: &[u8],
    deadline: Duration,
) -> Result<Output> {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdin = child.stdin.take();
    let input = input.to_vec();
    let (tx, rx) = mpsc::channel();
    // Writing and waiting happen on a helper thread: both can block on a stuck child.
    let waiter = std::thread::spawn(move || {
        let written = stdin.map(|mut s| s.write_all(&input)); // dropped here: EOF for the child
        let _ = tx.send((written, child.wait_with_output()));
    });
    let (written, output) = match rx.recv_timeout(deadline) {
        Ok(r) => r,
        Err(_) => {
            // The child is reaped only when the waiter's wait returns, so until then its pid
            // (the group id) cannot have been reused.
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = waiter.join();
            return Err(nft_err(format!(
                "{program} {} did not finish within {}s and was killed",
                args.join(" "),
                deadline.as_secs_f32()
            )));
        }
    };
    let _ = waiter.join();
    let output = output.map_err(|e| nft_err(format!("waiting for {program}: {e}")))?;
    if let Some(Err(e)) = written {
        if output.status.success() {
            return Err(nft_err(format!("writing to {program}: {e}")));
        }
    }
    Ok(output)
}

/// Applies nft JSON documents like [`apply_document`], with the next `nft -j -f -` started
/// ahead of need and waiting on its input: starting nft (exec, its libraries, its context) is
/// most of what a small batch costs — 2.7–5.6 ms against 1.3–1.5 ms for a started one on a small
/// table here — and a new pod's ADD waits for its batch. The started process runs in the
/// namespace of the thread that called the previous [`WarmApply::apply`]; one that has died
/// is replaced by a fresh start. Dropping the runner kills the waiting process (were the
/// caller to die instead, the process reads an empty input, fails to parse it and exits).
pub struct WarmApply {
    program: String,
    next: std::sync::Mutex<Option<Child>>,
}

impl Default for WarmApply {
    fn default() -> Self {
        WarmApply {
            program: nft_binary(),
            next: std::sync::Mutex::new(None),
        }
    }
}

const APPLY_ARGS: [&str; 3] = ["-j", "-f", "-"];

impl WarmApply {
    /// A runner of `program` (an `nft` binary) instead of `TRELLIS_NFT` or `nft`.
    pub fn with_program(program: &str) -> WarmApply {
        WarmApply {
            program: program.to_string(),
            next: std::sync::Mutex::new(None),
        }
    }

    pub fn apply(&self, doc: &Value) -> Result<()> {
        let input = doc.to_string();
        let ready = self.take_ready();
        let warm = ready.is_some();
        let child = match ready {
            Some(c) => c,
            None => spawn(&self.program, &APPLY_ARGS)?,
        };
        // The next one starts while this one works.
        *self.lock() = spawn(&self.program, &APPLY_ARGS).ok();
        let mut out = finish(
            child,
            &self.program,
            &APPLY_ARGS,
            input.as_bytes(),
            DEADLINE,
        )?;
        if warm && out.status.code().is_none() {
            // Killed by a signal while it waited (before reading a byte it can have done
            // nothing): run the batch on a fresh start.
            let child = spawn(&self.program, &APPLY_ARGS)?;
            out = finish(
                child,
                &self.program,
                &APPLY_ARGS,
                input.as_bytes(),
                DEADLINE,
            )?;
        }
        if !out.status.success() {
            return Err(nft_err(format!(
                "nft rejected the batch: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The pid of the process started ahead of need, if one waits.
    pub fn waiting_pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// The waiting process, if it is still alive.
    fn take_ready(&self) -> Option<Child> {
        let mut c = self.lock().take()?;
        match c.try_wait() {
            Ok(None) => Some(c),
            _ => {
                let _ = c.wait();
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for WarmApply {
    fn drop(&mut self) {
        if let Some(mut c) = self.lock().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Applies `{"nftables": [...commands]}` as one transaction.
pub fn apply(commands: Vec<Value>) -> Result<()> {
    apply_with(&nft_binary(), commands, DEADLINE)
}

/// [`apply`] with a given `nft` binary and deadline.
pub fn apply_with(program: &str, commands: Vec<Value>, deadline: Duration) -> Result<()> {
    apply_document_with(
        program,
        &serde_json::json!({ "nftables": commands }),
        deadline,
    )
}

/// Applies a whole nft JSON document (`{"nftables": [...]}`, e.g. a policy batch) as one
/// transaction: all of it or, when nft refuses any command, none of it.
pub fn apply_document(doc: &Value) -> Result<()> {
    apply_document_with(&nft_binary(), doc, DEADLINE)
}

fn apply_document_with(program: &str, doc: &Value, deadline: Duration) -> Result<()> {
    let out = run(
        program,
        &["-j", "-f", "-"],
        doc.to_string().as_bytes(),
        deadline,
    )?;
    if !out.status.success() {
        return Err(nft_err(format!(
            "nft rejected the batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Lists one table; `None` when it does not exist.
pub fn list_table(family: &str, table: &str) -> Result<Option<Value>> {
    list_table_with(family, table, &["-j"])
}

/// Lists one table with numbers instead of names (`nft -j -n`): protocols, ports, ICMP types
/// and conntrack states print as numbers, independent of the host's /etc files — the form the
/// policy compiler emits and compares with (drift detection).
pub fn list_table_numeric(family: &str, table: &str) -> Result<Option<Value>> {
    list_table_with(family, table, &["-j", "-n"])
}

fn list_table_with(family: &str, table: &str, flags: &[&str]) -> Result<Option<Value>> {
    let mut args = flags.to_vec();
    args.extend(["list", "table", family, table]);
    let out = run(&nft_binary(), &args, b"", DEADLINE)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(nft_err(format!(
            "nft list table {family} {table}: {}",
            err.trim()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|e| nft_err(format!("cannot parse nft JSON output: {e}")))
}

/// The rules of a listed table as `(chain, handle, comment)`.
pub fn rules(listing: &Value) -> Vec<(String, u64, Option<String>)> {
    let Some(items) = listing.get("nftables").and_then(Value::as_array) else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter_map(|r| {
            Some((
                r.get("chain")?.as_str()?.to_string(),
                r.get("handle")?.as_u64()?,
                r.get("comment").and_then(Value::as_str).map(str::to_string),
            ))
        })
        .collect()
}
