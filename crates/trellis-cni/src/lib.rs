//! The `trellis-cni` binary's logic: the CNI entry point (environment and stdin in, result or
//! error JSON out), the main plugin (routed and bridge mode) and, when invoked as
//! `trellis-ipam`, the IPAM plugin. Logs go to stderr or `logFile`; stdout carries only the
//! result or the error. No input can make a verb panic, hang or touch the plugin's own
//! namespace: paths from input are opened through [`safe_open`].

pub mod agent;
pub mod bridge;
pub mod child;
pub mod deferred;
pub mod delegate;
pub mod error;
pub mod ipam;
pub mod ipam_plugin;
pub mod lock;
pub mod logging;
pub mod masq;
pub mod plugin;
pub mod routed;
pub mod safe_open;
pub mod store;
pub mod veth;

use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde_json::{json, Value};
use trellis_cni_types::ipam_config::TRELLIS_IPAM;
use trellis_cni_types::{codes, CniEnv, CniError, CniVersion, Command};

/// Which plugin this invocation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Main,
    Ipam,
}

/// The role from argv[0]'s file name.
pub fn role_from_argv0(argv0: &str) -> Role {
    match Path::new(argv0).file_name().and_then(|n| n.to_str()) {
        Some(TRELLIS_IPAM) => Role::Ipam,
        _ => Role::Main,
    }
}

/// The version to answer with: stdin's `cniVersion` when it is one Trellis speaks, else the
/// latest (an unknown string is never echoed back).
fn version_hint(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(CniVersion::parse)
        })
        .and_then(Result::ok)
        .unwrap_or(CniVersion::LATEST)
        .as_str()
        .to_string()
}

/// Handles one invocation. Returns what to print on stdout and the exit code.
pub fn run(role: Role, lookup: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> (String, i32) {
    let hint = version_hint(stdin);
    let outcome = catch_unwind(AssertUnwindSafe(|| dispatch(role, &lookup, stdin, &hint)));
    match outcome {
        Ok(Ok(Some(v))) => (v.to_string(), 0),
        Ok(Ok(None)) => (String::new(), 0),
        Ok(Err(e)) => {
            let cni = e.to_cni();
            logging::init_fallback();
            tracing::error!(code = cni.code, "{}", cni.msg);
            (cni.to_json(&hint), 1)
        }
        Err(_) => (
            CniError::new(
                codes::KERNEL,
                "internal error (a bug in trellis-cni); see the log",
            )
            .to_json(&hint),
            1,
        ),
    }
}

fn dispatch(
    role: Role,
    lookup: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    hint: &str,
) -> error::Result<Option<Value>> {
    tracing::debug!("start");
    let env = CniEnv::from_lookup(lookup)?;
    if env.command == Command::Version {
        return Ok(Some(
            json!({"cniVersion": hint, "supportedVersions": CniVersion::supported()}),
        ));
    }
    match role {
        Role::Main if lookup(delegate::DELEGATED).is_some() => Err(CniError::invalid_config(
            "ipam.type",
            "names the trellis-cni main plugin, which cannot be its own IPAM plugin (use trellis-ipam)",
        )
        .into()),
        Role::Main => plugin::run(&env, stdin),
        Role::Ipam => ipam_plugin::run(&env, stdin),
    }
}

/// The variables of the CNI environment contract.
const CNI_VARS: [&str; 6] = [
    "CNI_COMMAND",
    "CNI_CONTAINERID",
    "CNI_NETNS",
    "CNI_IFNAME",
    "CNI_ARGS",
    "CNI_PATH",
];

/// A CNI variable that is set but not UTF-8 (it would otherwise look unset).
fn non_utf8_var() -> Option<&'static str> {
    CNI_VARS
        .into_iter()
        .find(|k| matches!(std::env::var(k), Err(std::env::VarError::NotUnicode(_))))
}

/// The most stdin read: a network configuration (with its `prevResult`) is a few kilobytes;
/// a larger one is refused before it is parsed, so that no input can exhaust memory.
pub const MAX_STDIN: usize = 4 * 1024 * 1024;

/// Reads stdin, at most [`MAX_STDIN`] bytes; `Err` with what was read when there is more.
fn read_stdin(input: impl Read) -> Result<Vec<u8>, Vec<u8>> {
    let mut bytes = Vec::new();
    let _ = input.take(MAX_STDIN as u64 + 1).read_to_end(&mut bytes);
    if bytes.len() > MAX_STDIN {
        Err(bytes)
    } else {
        Ok(bytes)
    }
}

/// The process entry point: reads the real environment and stdin, prints, returns the exit code.
pub fn main_entry() -> i32 {
    // argv[0] as bytes: `std::env::args` panics on a name that is not UTF-8.
    let argv0 = std::env::args_os()
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let role = role_from_argv0(&argv0);
    let stdin = if std::env::var_os("CNI_COMMAND").is_some() {
        read_stdin(std::io::stdin().lock())
    } else {
        Ok(Vec::new())
    };
    let (out, code) = match (non_utf8_var(), stdin) {
        // The version is not looked for in a document that is refused for its size.
        (_, Err(_)) => (
            CniError::new(
                codes::DECODE,
                format!(
                    "the network configuration on stdin is larger than {MAX_STDIN} bytes (4 MiB)"
                ),
            )
            .to_json(CniVersion::LATEST.as_str()),
            1,
        ),
        (Some(var), Ok(stdin)) => (
            CniError::invalid_env(var, "is not valid UTF-8").to_json(&version_hint(&stdin)),
            1,
        ),
        (None, Ok(stdin)) => run(role, |k| std::env::var(k).ok(), &stdin),
    };
    if !out.is_empty() {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    deferred::run_detached();
    code
}
