//! Runs another CNI plugin (an IPAM plugin named by `ipam.type`) from `CNI_PATH`, with the same
//! environment and stdin, as libcni's `DelegateAdd`/`DelegateDel` do. The child's environment
//! carries [`DELEGATED`], so that an `ipam.type` naming the main plugin itself is refused rather
//! than delegating to itself without end.

use std::path::PathBuf;
use std::process::Command as Process;
use std::time::Duration;

use trellis_cni_types::{codes, CniEnv, CniError, Command};

use crate::child;
use crate::error::Result;

/// Set in a delegated plugin's environment; the main role refuses to run under it.
pub const DELEGATED: &str = "TRELLIS_CNI_DELEGATED";

/// Finds `plugin` in the `CNI_PATH` directories.
pub fn find_plugin(env: &CniEnv, plugin: &str) -> std::result::Result<PathBuf, CniError> {
    env.path
        .iter()
        .map(|d| d.join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                codes::INVALID_CONFIG,
                format!(
                    "IPAM plugin {plugin:?} (field `ipam.type`) not found in CNI_PATH {}",
                    env.path
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(":")
                ),
            )
        })
}

/// How long a delegated plugin may take (the agent gets 30 s; a plugin that needs longer, e.g.
/// a DHCP exchange, has this much). It is killed, with whatever it started, after that.
pub const DELEGATE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most a delegated plugin may print: a result is a few kilobytes.
pub const MAX_DELEGATE_OUTPUT: usize = 1 << 20;
/// The most of its stderr quoted in an error.
const MAX_DELEGATE_STDERR: usize = 4096;

/// Runs `plugin` with `command` and returns its stdout on success. The run is bounded (see
/// [`crate::child`]): a plugin that hangs, floods its output or leaves a process holding its
/// stdout fails the verb with an error naming `ipam.type` instead of holding it.
pub fn exec(env: &CniEnv, plugin: &str, command: Command, stdin: &[u8]) -> Result<Vec<u8>> {
    let path = find_plugin(env, plugin)?;
    let mut p = Process::new(&path);
    p.env("CNI_COMMAND", command.as_str()).env(DELEGATED, "1");
    let limits = child::Limits {
        timeout: DELEGATE_TIMEOUT,
        max_stdout: MAX_DELEGATE_OUTPUT,
        max_stderr: MAX_DELEGATE_STDERR,
    };
    let out = child::run(p, stdin, limits).map_err(|e| {
        CniError::new(
            codes::DELEGATE,
            format!(
                "IPAM plugin {plugin} (field `ipam.type`, {}) {}: {e}",
                path.display(),
                command.as_str()
            ),
        )
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(match CniError::from_json(&out.stdout) {
        Some(mut e) => {
            e.msg = format!("{plugin}: {}", e.msg);
            e.into()
        }
        None => CniError::new(
            codes::DELEGATE,
            format!(
                "{plugin} {} failed ({}): {}",
                command.as_str(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )
        .into(),
    })
}
