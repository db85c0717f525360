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
    child: Child,
    program: &str,
    args: &[&str],
    input: &[u8],
    deadline: Duration,
) -> Result<Output> {
    let (written, output) = feed(child, program, args, input, deadline)?;
    if let Err(e) = written {
        if output.status.success() {
            return Err(nft_err(format!("writing to {program}: {e}")));
        }
    }
    Ok(output)
}

/// [`finish`], also returning how writing the input went (a child that exited before taking
/// its input fails the write with `BrokenPipe`).
fn feed(
    mut child: Child,
    program: &str,
    args: &[&str],
    input: &[u8],
    deadline: Duration,
) -> Result<(std::io::Result<()>, Output)> {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let stdin = child.stdin.take();
    let input = input.to_vec();
    let (tx, rx) = mpsc::channel();
    // Writing and waiting happen on a helper thread: both can block on a stuck child.
    let waiter = std::thread::spawn(move || {
        // Dropped here: EOF for the child.
        let written = stdin.map_or(Ok(()), |mut s| s.write_all(&input));
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
    Ok((written, output))
}

/// Applies nft JSON documents like [`apply_document`], with the next `nft -j -f -` started
/// ahead of need and waiting on its input: starting nft (exec, its libraries, its context) is
/// most of what a small batch costs — 2.7–5.6 ms against 1.3–1.5 ms for a started one on a small
/// table here — and a new pod's ADD waits for its batch. A started process is used only by a
/// caller in the network namespace it was started in (another caller's gets a fresh start);
/// one that has died is replaced by a fresh start. Dropping the runner kills the waiting
/// process (were the caller to die instead, the process reads an empty input, fails to parse
/// it and exits).
pub struct WarmApply {
    program: String,
    next: std::sync::Mutex<Option<Warm>>,
}

/// A started `nft` and the network namespace it runs in.
struct Warm {
    child: Child,
    netns: NsId,
}

/// A network namespace's identity (device and inode of its nsfs file).
type NsId = (u64, u64);

/// The calling thread's network namespace; `None` when it cannot be read (then nothing is
/// started ahead of need).
fn thread_netns() -> Option<NsId> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/thread-self/ns/net").ok()?;
    Some((m.dev(), m.ino()))
}

/// Kills and reaps a started process that will not be used.
fn discard(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

impl Default for WarmApply {
    fn default() -> Self {
        WarmApply::with_program(&nft_binary())
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
        let here = thread_netns();
        let ready = here.and_then(|ns| self.take_ready(ns));
        let warm = ready.is_some();
        let child = match ready {
            Some(c) => c,
            None => spawn(&self.program, &APPLY_ARGS)?,
        };
        // The next one starts while this one works (a process it replaces is reaped).
        let next = here.and_then(|netns| {
            let child = spawn(&self.program, &APPLY_ARGS).ok()?;
            Some(Warm { child, netns })
        });
        let replaced = std::mem::replace(&mut *self.lock(), next);
        if let Some(old) = replaced {
            discard(old.child);
        }
        let (written, mut out) = feed(
            child,
            &self.program,
            &APPLY_ARGS,
            input.as_bytes(),
            DEADLINE,
        )?;
        let unread = matches!(&written, Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe);
        if warm && unread && out.status.code().is_none() {
            // Killed by a signal before it took its input (it reads all of it before acting),
            // so it did nothing: run the batch on a fresh start. One killed after taking it may
            // have committed it, and a replay is not idempotent (`add rule` appends another
            // copy): that is an error, and the caller replaces what it holds.
            let child = spawn(&self.program, &APPLY_ARGS)?;
            out = finish(
                child,
                &self.program,
                &APPLY_ARGS,
                input.as_bytes(),
                DEADLINE,
            )?;
        } else if let Err(e) = written {
            if out.status.success() {
                return Err(nft_err(format!("writing to {}: {e}", self.program)));
            }
        }
        if !out.status.success() {
            return Err(nft_err(format!(
                "nft rejected the batch ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// The pid of the process started ahead of need, if one waits.
    pub fn waiting_pid(&self) -> Option<u32> {
        self.lock().as_ref().map(|w| w.child.id())
    }

    /// The waiting process, if it is still alive and runs in namespace `here`.
    fn take_ready(&self, here: NsId) -> Option<Child> {
        let mut w = self.lock().take()?;
        match w.child.try_wait() {
            Ok(None) if w.netns == here => Some(w.child),
            _ => {
                discard(w.child);
                None
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Warm>> {
        self.next.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for WarmApply {
    fn drop(&mut self) {
        if let Some(w) = self.lock().take() {
            discard(w.child);
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
