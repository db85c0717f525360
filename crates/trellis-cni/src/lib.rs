//! The `trellis-cni` binary's logic: the CNI entry point (environment and stdin in, result or
//! error JSON out), the main plugin (routed and bridge mode) and, when invoked as
//! `trellis-ipam`, the IPAM plugin. Logs go to stderr or `logFile`; stdout carries only the
//! result or the error.

pub mod agent;
pub mod bridge;
pub mod deferred;
pub mod delegate;
pub mod error;
pub mod ipam;
pub mod ipam_plugin;
pub mod lock;
pub mod masq;
pub mod plugin;
pub mod routed;
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

/// The version to answer with: stdin's `cniVersion` when it is a string, else the latest.
fn version_hint(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| CniVersion::LATEST.as_str().to_string())
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
        Role::Main => plugin::run(&env, stdin),
        Role::Ipam => ipam_plugin::run(&env, stdin),
    }
}

/// Sets up logging: `TRELLIS_LOG` (an env-filter) or the config's `logLevel`, to the config's
/// `logFile` or stderr. Never writes to stdout.
fn init_logging(stdin: &[u8]) {
    let v: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
    let level = std::env::var("TRELLIS_LOG")
        .ok()
        .or_else(|| {
            v.get("logLevel")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| "warn".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    let file = v.get("logFile").and_then(Value::as_str).and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// The process entry point: reads the real environment and stdin, prints, returns the exit code.
pub fn main_entry() -> i32 {
    let argv0 = std::env::args().next().unwrap_or_default();
    let role = role_from_argv0(&argv0);
    let mut stdin = Vec::new();
    if std::env::var("CNI_COMMAND").is_ok() {
        let _ = std::io::stdin().read_to_end(&mut stdin);
    }
    init_logging(&stdin);
    let (out, code) = run(role, |k| std::env::var(k).ok(), &stdin);
    if !out.is_empty() {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{out}");
        let _ = stdout.flush();
    }
    deferred::run_detached();
    code
}
