//! The plugin's logs: `TRELLIS_LOG` (an env-filter) or the config's `logLevel`, written to the
//! config's `logFile` or stderr — never stdout, which carries only the result. Installed only
//! after the config is validated, so that no verb opens a path from input before checking it
//! (see [`crate::safe_open::open_log`]). Does I/O.

use std::path::Path;

use tracing_subscriber::EnvFilter;
use trellis_cni_types::CniError;

use crate::safe_open::{open_log, LogProblem, LogTarget};

fn filter(level: Option<&str>) -> EnvFilter {
    let level = std::env::var("TRELLIS_LOG")
        .ok()
        .or_else(|| level.map(str::to_string))
        .unwrap_or_else(|| "warn".into());
    EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("warn"))
}

fn install(level: Option<&str>, target: LogTarget) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_ansi(false);
    // try_init fails only when a subscriber is installed already (a second call in one
    // process, e.g. in tests): the first one stays.
    let _ = match target {
        LogTarget::File(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        LogTarget::Stderr => builder.with_writer(std::io::stderr).try_init(),
        LogTarget::Discard => builder.with_writer(std::io::sink).try_init(),
    };
}

/// Logs to `file` (or stderr) at `level`. A `logFile` that must never receive logs (stdout, a
/// FIFO, a device) is a config error naming `logFile`; one that cannot be opened (a missing
/// directory) falls back to stderr with a warning, as a log problem should not fail the verb.
pub fn init(level: Option<&str>, file: Option<&Path>) -> Result<(), CniError> {
    let Some(path) = file else {
        install(level, LogTarget::Stderr);
        return Ok(());
    };
    match open_log(path) {
        Ok(target) => {
            install(level, target);
            Ok(())
        }
        Err(LogProblem::Refused(why)) => {
            install(level, LogTarget::Stderr);
            Err(CniError::invalid_config("logFile", why))
        }
        Err(e @ LogProblem::Io { .. }) => {
            install(level, LogTarget::Stderr);
            tracing::warn!(error = %e, "logFile unusable; logging to stderr");
            Ok(())
        }
    }
}

/// Logs to stderr unless logging is set up already (for errors found before the config is).
pub fn init_fallback() {
    install(None, LogTarget::Stderr);
}
