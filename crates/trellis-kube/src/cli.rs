//! `trellis kube-controller` flags, validated into a [`ControllerConfig`], and the command
//! (I/O: opens the datastore and the Kubernetes client, runs until killed).

use std::path::PathBuf;
use std::time::Duration;

use crate::controller::{self, ControllerConfig};
use crate::gc::GcHooks;
use crate::gc_plan::GcConfig;
use crate::lease::LeaseConfig;
use crate::{KubeError, Result};

/// `trellis kube-controller` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct KubeControllerArgs {
    /// kubeconfig file; without it, the in-cluster service account (or KUBECONFIG).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the leader-election Lease.
    #[arg(long, default_value = "kube-system")]
    pub lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "trellis-kube-controller")]
    pub lease_name: String,
    /// This candidate's identity (default: hostname and process ID).
    #[arg(long)]
    pub identity: Option<String>,
    /// Seconds a Lease not renewed stays its holder's.
    #[arg(long, default_value_t = 15.0)]
    pub lease_duration: f64,
    /// Seconds a leader goes without renewing before it stops writing (< --lease-duration).
    #[arg(long, default_value_t = 10.0)]
    pub renew_deadline: f64,
    /// Seconds between election attempts (< --renew-deadline).
    #[arg(long, default_value_t = 2.0)]
    pub retry_period: f64,
    /// Seconds between full resyncs of every kind.
    #[arg(long, default_value_t = 300.0)]
    pub resync: f64,
    /// Seconds a pod (or node) must have been seen gone from the API server before IPAM GC
    /// releases its addresses (also needs two observations and a re-check).
    #[arg(long, default_value_t = 300.0)]
    pub ipam_gc_grace: f64,
    /// Seconds between IPAM GC passes.
    #[arg(long, default_value_t = 60.0)]
    pub ipam_gc_interval: f64,
    /// IPAM GC trusts no list of pods or nodes that shrank by more than this fraction (0-1)
    /// since the previous pass (the API server briefly answering an empty or partial list).
    #[arg(long, default_value_t = 0.5)]
    pub ipam_gc_max_shrink: f64,
    /// Turns IPAM garbage collection off.
    #[arg(long)]
    pub no_ipam_gc: bool,
}

fn seconds(flag: &str, v: f64) -> Result<Duration> {
    // At least a millisecond: a smaller value is zero as a timer period (which tokio's
    // interval refuses with a panic).
    if !(0.001..=86_400.0).contains(&v) {
        return Err(KubeError::Config {
            field: flag.into(),
            reason: format!("{v} is not a number of seconds in [0.001, 86400]"),
        });
    }
    Ok(Duration::from_secs_f64(v))
}

fn fraction(flag: &str, v: f64) -> Result<f64> {
    if !(0.0..=1.0).contains(&v) {
        return Err(KubeError::Config {
            field: flag.into(),
            reason: format!("{v} is not a fraction in [0, 1]"),
        });
    }
    Ok(v)
}

impl KubeControllerArgs {
    /// The validated configuration.
    pub fn config(&self) -> Result<ControllerConfig> {
        let lease_duration = seconds("--lease-duration", self.lease_duration)?;
        let renew_deadline = seconds("--renew-deadline", self.renew_deadline)?;
        let retry_period = seconds("--retry-period", self.retry_period)?;
        if lease_duration.as_secs() < 1 {
            return Err(KubeError::Config {
                field: "--lease-duration".into(),
                reason: "must be at least 1 (the Lease holds whole seconds)".into(),
            });
        }
        // The Lease carries whole seconds: the others take over after the truncated duration.
        if renew_deadline >= Duration::from_secs(lease_duration.as_secs()) {
            return Err(KubeError::Config {
                field: "--renew-deadline".into(),
                reason: "must be shorter than --lease-duration (a leader must stop writing before another may take over)".into(),
            });
        }
        if retry_period >= renew_deadline {
            return Err(KubeError::Config {
                field: "--retry-period".into(),
                reason: "must be shorter than --renew-deadline".into(),
            });
        }
        let identity = match &self.identity {
            Some(i) if !i.is_empty() => i.clone(),
            Some(_) => {
                return Err(KubeError::Config {
                    field: "--identity".into(),
                    reason: "must not be empty".into(),
                })
            }
            None => format!("{}-{}", hostname(), std::process::id()),
        };
        Ok(ControllerConfig {
            lease: LeaseConfig {
                namespace: self.lease_namespace.clone(),
                name: self.lease_name.clone(),
                identity,
                lease_duration,
                renew_deadline,
                retry_period,
            },
            resync: seconds("--resync", self.resync)?,
            gc: GcConfig {
                grace: seconds("--ipam-gc-grace", self.ipam_gc_grace)?,
                interval: seconds("--ipam-gc-interval", self.ipam_gc_interval)?,
                max_shrink: fraction("--ipam-gc-max-shrink", self.ipam_gc_max_shrink)?,
                enabled: !self.no_ipam_gc,
            },
            gc_hooks: GcHooks::default(),
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "trellis".into())
}

/// Runs the controller against the datastore `spec`.
pub async fn run(datastore: &str, args: KubeControllerArgs) -> Result<()> {
    let cfg = args.config()?;
    let store = trellis_store::open(datastore).await?;
    let client = controller::client(args.kubeconfig.as_deref()).await?;
    tracing::info!(identity = %cfg.lease.identity, store = %store.describe(), "kube-controller starting");
    let leadership = std::sync::Arc::new(crate::lease::Leadership::default());
    controller::run_with(client, store, cfg, leadership, terminated()).await
}

/// SIGTERM (what Kubernetes sends a pod it stops) or SIGINT.
async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; stopping on SIGINT only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: KubeControllerArgs,
    }

    fn config(argv: &[&str]) -> Result<ControllerConfig> {
        Cli::try_parse_from(std::iter::once("x").chain(argv.iter().copied()))
            .unwrap()
            .args
            .config()
    }

    #[test]
    fn flags_are_validated_naming_the_flag() {
        let c = config(&["--identity", "a"]).unwrap();
        assert_eq!(c.lease.lease_duration, Duration::from_secs(15));
        let e = config(&["--renew-deadline", "20"]).unwrap_err().to_string();
        assert!(e.contains("--renew-deadline"), "{e}");
        // 15.5 s is stored in the Lease as 15: a leader writing until 15.2 s would overlap.
        let e = config(&["--lease-duration", "15.5", "--renew-deadline", "15.2"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--renew-deadline"), "{e}");
        let e = config(&["--retry-period", "NaN"]).unwrap_err().to_string();
        assert!(e.contains("--retry-period"), "{e}");
        let e = config(&["--identity", ""]).unwrap_err().to_string();
        assert!(e.contains("--identity"), "{e}");
        assert_eq!(c.gc.grace, Duration::from_secs(300));
        assert_eq!(c.gc.interval, Duration::from_secs(60));
        for bad in [
            ["--ipam-gc-grace", "100000"],
            ["--ipam-gc-interval", "0"],
            ["--ipam-gc-max-shrink", "1.5"],
            ["--ipam-gc-max-shrink", "NaN"],
            // Positive, but zero once a Duration: the timers refuse (panic on) a zero period.
            ["--ipam-gc-interval", "1e-10"],
            ["--resync", "1e-12"],
        ] {
            let e = config(&bad).unwrap_err().to_string();
            assert!(e.contains(bad[0]), "{e}");
        }
        assert!(!config(&["--no-ipam-gc"]).unwrap().gc.enabled);
    }
}
