//! Runs another CNI plugin (an IPAM plugin named by `ipam.type`) from `CNI_PATH`, with the same
//! environment and stdin, as libcni's `DelegateAdd`/`DelegateDel` do. The child's environment
//! carries [`DELEGATED`], so that an `ipam.type` naming the main plugin itself is refused rather
//! than delegating to itself without end.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use trellis_cni_types::{codes, CniEnv, CniError, Command};

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

/// Runs `plugin` with `command` and returns its stdout on success.
pub fn exec(env: &CniEnv, plugin: &str, command: Command, stdin: &[u8]) -> Result<Vec<u8>> {
    let path = find_plugin(env, plugin)?;
    let mut p = Process::new(&path);
    p.env("CNI_COMMAND", command.as_str())
        .env(DELEGATED, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = p.spawn().map_err(|e| {
        CniError::new(
            codes::DELEGATE,
            format!("cannot run {}: {e}", path.display()),
        )
    })?;
    if let Some(mut si) = child.stdin.take() {
        let _ = si.write_all(stdin);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(
            codes::DELEGATE,
            format!("waiting for {}: {e}", path.display()),
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
