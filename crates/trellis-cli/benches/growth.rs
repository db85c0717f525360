//! Growth: a 24-hour-equivalent run at 100× speed (HOURS and SPEED change it) of what an agent
//! writes — its Node heartbeat every 10 s and its BGPStatus at the speaker's fastest, every
//! 2 s — measuring the datastore's size at intervals:
//!
//! - SQLite, "before": the store without automatic compaction (every version before it);
//! - SQLite, "after": the default retention; a real agent (this tree's binary, heartbeat every
//!   0.1 s) runs against this file too, and its RSS is sampled;
//! - etcd without and with `--auto-compaction-mode=periodic --auto-compaction-retention=1m`
//!   (1 minute rather than the 5 a cluster would use, so that a run sees many compactions).
//!
//! Prints each sample, then start, end and the slope over the last third (per simulated hour).
//! Retention windows are real time (SQLite's default 5 minutes), so at 100× they hold 100× the
//! revisions a real agent would leave there; what matters is that the size stops growing once
//! the window is full.
//! Figures only. Run as root: `cargo bench -p trellis --bench growth`.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_resources::{BgpStatusSpec, Metadata, NodeAddress, NodeStatus, Object, Resource};
use trellis_store::Datastore;
use trellis_testutil::{proc_status_kb, temp_dir, veth_between, EtcdServer, TestNetns};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What one agent writes, at `speed`× its normal rate, with timestamps in simulated time.
async fn write_forever(store: Arc<dyn Datastore>, node: &'static str, speed: u64) {
    let start = Instant::now();
    let epoch = trellis_cluster::now_secs();
    let sim_now = || epoch + (start.elapsed().as_secs_f64() * speed as f64) as u64;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(10) / speed as u32);
    let mut status = tokio::time::interval(Duration::from_secs(2) / speed as u32);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let now = sim_now();
                let r = trellis_agent::update_node(&*store, node, |o| {
                    o.spec.addresses = vec![NodeAddress {
                        address: "192.0.2.20/24".into(),
                        kind: Some("InternalIP".into()),
                    }];
                    o.status = Some(NodeStatus { last_heartbeat: Some(now) });
                })
                .await;
                if let Err(e) = r {
                    eprintln!("{node}: heartbeat failed: {e}");
                }
            }
            _ = status.tick() => {
                n += 1;
                let r = Resource::BgpStatus(Object {
                    metadata: Metadata { name: node.into(), ..Default::default() },
                    spec: BgpStatusSpec {
                        node: node.into(),
                        router_id: "192.0.2.20".into(),
                        as_number: 64512,
                        route_reflector_cluster_id: None,
                        peers: Vec::new(),
                        updated: sim_now() + n,
                    },
                    status: None,
                });
                if let Err(e) = trellis_cluster::objects::apply(&*store, &r, false).await {
                    eprintln!("{node}: status write failed: {e}");
                }
            }
        }
    }
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// SQLite database plus its WAL, in bytes.
fn sqlite_size(db: &Path) -> u64 {
    file_size(db) + file_size(&db.with_extension("db-wal"))
}

/// etcd's database size and the part of it in use (bytes), from its metrics.
fn etcd_size(e: &EtcdServer) -> (f64, f64) {
    use std::io::{Read, Write};
    let addr = e.endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    let get = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        get("etcd_mvcc_db_total_size_in_bytes"),
        get("etcd_mvcc_db_total_size_in_use_in_bytes"),
    )
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn open_etcd(e: &EtcdServer) -> Arc<dyn Datastore> {
    let spec = format!("etcd:{}", e.endpoint);
    for _ in 0..100 {
        if let Ok(s) = trellis_store::open(&spec).await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd at {} never answered", e.endpoint);
}

/// One measured series: (simulated hours, value).
type Series = Vec<(f64, f64)>;

fn summary(name: &str, unit: &str, scale: f64, s: &Series) {
    let (first, last) = (s[0], s[s.len() - 1]);
    let from = s[s.len() * 2 / 3];
    let slope = (last.1 - from.1) / (last.0 - from.0).max(1e-9);
    println!(
        "{name:<34} start {:>9.1} {unit}  end {:>9.1} {unit}  last-third slope {:>+9.2} {unit}/h",
        first.1 / scale,
        last.1 / scale,
        slope / scale
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let hours = env_u64("HOURS", 24);
    let speed = env_u64("SPEED", 100);
    let total = Duration::from_secs(hours * 3600 / speed);
    let samples = 12u32;
    let dir = temp_dir("growth");
    let (before_db, after_db) = (dir.path().join("before.db"), dir.path().join("after.db"));
    let node = TestNetns::new("grownode");
    let peer = TestNetns::new("growpeer");
    veth_between(
        &node,
        "upl0",
        "192.0.2.10/24",
        &peer,
        "upl1",
        "192.0.2.1/24",
    );
    let etcd_plain = EtcdServer::start();
    let etcd_compacting = EtcdServer::start_with(&[
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "1m",
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stores: Vec<Arc<dyn Datastore>> = rt.block_on(async {
        let before =
            trellis_store::sqlite::SqliteStore::open_with(before_db.to_str().unwrap(), None)
                .await
                .unwrap();
        let after = trellis_store::sqlite::SqliteStore::open(after_db.to_str().unwrap())
            .await
            .unwrap();
        let before: Arc<dyn Datastore> = Arc::new(before);
        let after: Arc<dyn Datastore> = Arc::new(after);
        vec![
            before,
            after,
            open_etcd(&etcd_plain).await,
            open_etcd(&etcd_compacting).await,
        ]
    });
    for s in &stores {
        rt.spawn(write_forever(s.clone(), "n1", speed));
    }
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("trellis");
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let agent = Agent(
        node.command(bin.to_str().unwrap())
            .args(["--datastore", &format!("sqlite:{}", after_db.display())])
            .args(["agent", "--node", "agent", "--ip", "interface=upl0"])
            .args(["--heartbeat", &format!("{}", 10.0 / speed as f64)])
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start agent"),
    );
    println!(
        "growth: {hours} h at {speed}x ({total:?}): heartbeat every 10 s, BGP status every 2 s (simulated); sizes in KB, agent RSS in MB"
    );
    println!(
        "{:>6} {:>14} {:>14} {:>16} {:>22} {:>9}",
        "sim h",
        "sqlite before",
        "sqlite after",
        "etcd plain db",
        "etcd compacting db/use",
        "agent RSS"
    );
    let mut series: Vec<Series> = vec![Vec::new(); 6];
    let start = Instant::now();
    for k in 0..=samples {
        let at = start + total * k / samples;
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let sim_h = start.elapsed().as_secs_f64() * speed as f64 / 3600.0;
        let (plain, _) = etcd_size(&etcd_plain);
        let (comp, comp_use) = etcd_size(&etcd_compacting);
        let values = [
            sqlite_size(&before_db) as f64,
            sqlite_size(&after_db) as f64,
            plain,
            comp,
            comp_use,
            proc_status_kb(agent.0.id(), "VmRSS") as f64 * 1024.0,
        ];
        for (s, v) in series.iter_mut().zip(values) {
            s.push((sim_h, v));
        }
        println!(
            "{sim_h:>6.1} {:>14.0} {:>14.0} {:>16.0} {:>14.0}/{:<7.0} {:>9.1}",
            values[0] / 1024.0,
            values[1] / 1024.0,
            values[2] / 1024.0,
            values[3] / 1024.0,
            values[4] / 1024.0,
            values[5] / 1048576.0,
        );
    }
    let names = [
        ("sqlite before (no compaction)", "KB", 1024.0),
        ("sqlite after (default retention)", "KB", 1024.0),
        ("etcd without auto-compaction", "KB", 1024.0),
        ("etcd auto-compaction 1m (db)", "KB", 1024.0),
        ("etcd auto-compaction 1m (in use)", "KB", 1024.0),
        ("agent RSS", "MB", 1048576.0),
    ];
    for ((name, unit, scale), s) in names.iter().zip(&series) {
        summary(name, unit, *scale, s);
    }
    let end = |i: usize| series[i].last().unwrap().1;
    println!(
        "after/before at the end: sqlite {:.3}, etcd {:.3}",
        end(1) / end(0),
        end(4) / end(2)
    );
    drop(agent);
    rt.shutdown_timeout(Duration::from_secs(1));
}
