//! `trellis apply`/`create` against hostile files, on SQLite and etcd: every refused file
//! leaves the store byte for byte as it was (every key, value and revision, and the store's
//! revision), names the document and field once, and prints no "created"; bombs (YAML aliases,
//! deep nesting, oversized files, hostile selectors) are refused quickly by a CLI limited to
//! 1 GiB of address space. A good file commits in one transaction and only then reports.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::bin;
use trellis_store::KeyValue;
use trellis_testutil::{temp_dir, EtcdServer};

/// Address space the CLI may use (RLIMIT_AS): the bombs needed about 2 GB before the limits.
const CLI_ADDRESS_SPACE: u64 = 1 << 30;
/// Hang guard for one CLI run (the deep-nesting input took tens of seconds before the limits).
const CLI_DEADLINE: Duration = Duration::from_secs(60);

struct Store {
    spec: String,
    dir: tempfile::TempDir,
    _etcd: Option<EtcdServer>,
}

impl Store {
    fn new(etcd: bool) -> Store {
        let dir = temp_dir("apply");
        let server = etcd.then(EtcdServer::start);
        let spec = match &server {
            Some(e) => format!("etcd:{}", e.endpoint),
            None => format!("sqlite:{}", dir.path().join("t.db").display()),
        };
        Store {
            spec,
            dir,
            _etcd: server,
        }
    }

    /// Every key with its value and revisions, and the store's revision.
    fn snapshot(&self) -> (Vec<KeyValue>, i64) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = trellis_store::open(&self.spec).await.unwrap();
            let l = s.list("").await.unwrap();
            (l.items, s.revision().await.unwrap())
        })
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Runs the CLI on `file` with limited address space and a deadline.
    fn run(&self, verb: &str, file: &Path) -> (ExitStatus, String, String) {
        self.run_words(&[verb], file)
    }

    /// [`Store::run`] for a verb of several words (`lab up`).
    fn run_words(&self, verb: &[&str], file: &Path) -> (ExitStatus, String, String) {
        let (out, err) = (self.dir.path().join("out"), self.dir.path().join("err"));
        let mut cmd = Command::new(bin("trellis"));
        cmd.args(["--datastore", &self.spec])
            .args(verb)
            .arg("-f")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: CLI_ADDRESS_SPACE,
                    rlim_max: CLI_ADDRESS_SPACE,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let deadline = Instant::now() + CLI_DEADLINE;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!(
                    "trellis {} -f {} did not finish in {CLI_DEADLINE:?}",
                    verb.join(" "),
                    file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (
            status,
            std::fs::read_to_string(out).unwrap(),
            std::fs::read_to_string(err).unwrap(),
        )
    }

    fn apply_ok(&self, text: &str) -> String {
        let f = self.file("ok.yaml", text);
        let (st, out, err) = self.run("apply", &f);
        assert!(st.success(), "{err}");
        out
    }
}

fn pool(name: &str, cidr: &str, extra: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n{extra}---\n")
}

fn calico_np(name: &str, spec: &str) -> String {
    format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{spec}")
}

fn node(name: &str) -> String {
    format!("apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: {name}\nspec: {{}}\n---\n")
}

/// Bad files: (verb, file, what the error must say).
fn hostile_files() -> Vec<(&'static str, String, Vec<&'static str>)> {
    let three = |third: String| {
        format!(
            "{}{}{third}",
            pool("a", "10.81.0.0/16", ""),
            pool("b", "10.82.0.0/16", "")
        )
    };
    let selector = |sel: &str| pool("s", "10.85.0.0/16", &format!("  nodeSelector: \"{sel}\"\n"));
    let mut alias_bomb = String::from(
        "apiVersion: trellis.dev/v1\nkind: Node\nmetadata:\n  name: x\n  labels: &big {",
    );
    for i in 0..40_000 {
        alias_bomb.push_str(&format!("k{i}: vvvvvvvvvv, "));
    }
    alias_bomb.push_str("}\nspec:\n  addresses: [");
    alias_bomb.push_str(&"{address: *big}, ".repeat(2000));
    alias_bomb.push_str("]\n");
    vec![
        // Issue 15.6: a, b, then a again with another CIDR.
        ("apply", three(pool("a", "10.83.0.0/16", "")), vec!["document 3 (IPPool/a)", "metadata.name", "also document 1"]),
        // The third document changes a stored pool's CIDR, or its block size.
        ("apply", three(pool("p", "10.80.0.0/15", "")), vec!["document 3 (IPPool/p)", "spec.cidr", "cannot change"]),
        ("apply", three(pool("p", "10.80.0.0/16", "  blockSize: 24\n")), vec!["document 3 (IPPool/p)", "spec.blockSize", "cannot change"]),
        ("apply", three(pool("c", "10.80.64.0/18", "")), vec!["document 3 (IPPool/c)", "spec.cidr", "overlaps pool p"]),
        ("apply", three(pool("c", "10.82.128.0/17", "")), vec!["document 3 (IPPool/c)", "spec.cidr", "overlaps pool b"]),
        ("create", format!("{}{}", node("n2"), node("n1")), vec!["document 2 (Node/n1)", "already exists"]),
        // Issue 15.9: accepted silently before.
        ("apply", three(pool("c", "10.84.0.0/16", "  blockSize: 26\n  blockSize: 24\n")), vec!["document 3", "spec.blockSize", "duplicate key"]),
        ("apply", r#"{"apiVersion": "trellis.dev/v1", "kind": "Node", "metadata": {"name": "n3", "name": "n4"}, "spec": {}}"#.into(), vec!["document 1", "metadata.name", "duplicate key"]),
        ("apply", three(pool("c", "10.84.0.0/16", "  blockSize: .inf\n")), vec!["document 3", "spec.blockSize", "finite"]),
        ("apply", three(pool("c", "10.84.0.0/16", "  blockSize: .nan\n")), vec!["document 3", "spec.blockSize", "finite"]),
        ("apply", "apiVersion: trellis.dev/v1\nkind: IPAMBlock\nmetadata: {name: b}\nspec: {cidr: '::/0', allocations: [null], attributes: []}\n".into(), vec!["IPAMBlock/b", "spec.cidr"]),
        ("apply", r#"{"kind": "List", "items": {"apiVersion": "trellis.dev/v1", "kind": "Node", "metadata": {"name": "n3"}, "spec": {}}}"#.into(), vec!["items", "must be a list"]),
        // Issue 15.5: pools no pod may take addresses from.
        ("apply", three(pool("c", "127.0.0.0/16", "")), vec!["document 3", "spec.cidr", "loopback"]),
        ("apply", three(pool("c", "169.254.0.0/16", "")), vec!["document 3", "spec.cidr", "link-local"]),
        ("apply", three(pool("c", "224.0.0.0/8", "")), vec!["document 3", "spec.cidr", "multicast"]),
        // Issue 15.7: selectors that crashed every agent, or apply itself.
        ("apply", selector(&format!("{}all(){}", "(".repeat(4000), ")".repeat(4000))), vec!["document 1", "spec.nodeSelector", "at most 1024"]),
        ("apply", selector(&format!("{}all()", "!".repeat(40_000))), vec!["document 1", "spec.nodeSelector", "at most 1024"]),
        ("apply", selector(&format!("{}all(){}", "(".repeat(100), ")".repeat(100))), vec!["spec.nodeSelector", "deeper than 64 at offset 64"]),
        // Issue 10: policy documents refused with the field (and a selector's position).
        ("apply", three(calico_np("p", "  selector: app == 'a' &&\n")), vec!["document 3 (NetworkPolicy/p)", "spec.selector", "offset 13"]),
        ("apply", three("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec:\n  ingres: []\n".into()), vec!["document 3 (GlobalNetworkPolicy/g)", "unknown field `ingres`"]),
        ("apply", three(calico_np("p", "  ingress:\n  - action: Allow\n    protocol: ICMP\n    icmp: {type: 8}\n    destination: {ports: [80]}\n")), vec!["document 3 (NetworkPolicy/p)", "spec.ingress[0].icmp", "both ports and ICMP"]),
        ("apply", three(calico_np("p", "  tier: security\n")), vec!["document 3 (NetworkPolicy/p)", "spec.tier", "\"security\" does not exist"]),
        ("apply", three("apiVersion: projectcalico.org/v3\nkind: NetworkSet\nmetadata: {name: s, namespace: x}\nspec: {nets: [10.0.0.0/8, 10.300.0.0/16]}\n".into()), vec!["document 3 (NetworkSet/s)", "spec.nets[1]", "not a CIDR"]),
        ("apply", three("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: k, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]\n".into()), vec!["document 3 (NetworkPolicy.networking.k8s.io/k)", "spec.ingress[0].from[0].ipBlock.except[0]", "strict subset"]),
        // Issue 15.8: YAML bombs.
        ("apply", alias_bomb, vec!["document 1", "aliases expanded"]),
        ("apply", format!("{}{}", node("n3"), "[".repeat(100_000)), vec!["document 2", "nested deeper than 64"]),
        ("apply", format!("a: {}", "{a: ".repeat(1_000_000)), vec!["document 1", "nested deeper than 64"]),
        ("apply", format!("{}# {}\n", node("n3"), "x".repeat(5 << 20)), vec!["larger than 4194304 bytes"]),
    ]
}

fn refused_files_change_nothing(etcd: bool) {
    let s = Store::new(etcd);
    let out = s.apply_ok(&format!("{}{}", pool("p", "10.80.0.0/16", ""), node("n1")));
    assert_eq!(out, "IPPool/p created\nNode/n1 created\n");
    // Policy objects too, so a refused policy file is seen not to touch them.
    s.apply_ok(&format!(
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: other}}\n---\n{}",
        calico_np("q", "  tier: other\n  ingress: [{action: Deny}]\n")
    ));
    let before = s.snapshot();
    for (i, (verb, text, wants)) in hostile_files().into_iter().enumerate() {
        let f = s.file(&format!("bad{i}.yaml"), &text);
        let (st, out, err) = s.run(verb, &f);
        assert_eq!(st.code(), Some(1), "file {i}: {err}");
        assert_eq!(out, "", "file {i}: nothing is reported before a commit");
        for want in &wants {
            assert!(err.contains(want), "file {i}: want {want:?} in {err}");
        }
        // Named once (not again as the error's own cause).
        let first = wants[0];
        assert_eq!(err.matches(first).count(), 1, "file {i}: {err}");
        assert_eq!(s.snapshot(), before, "file {i} changed the store: {err}");
    }
}

#[test]
fn refused_files_change_nothing_sqlite() {
    refused_files_change_nothing(false);
}

#[test]
fn refused_files_change_nothing_etcd() {
    refused_files_change_nothing(true);
}

/// A good multi-document file (and a Calico sample) commits as one transaction, then reports;
/// an empty List is fine and says so.
fn good_files_commit_once(etcd: bool) {
    let s = Store::new(etcd);
    let before = s.snapshot().1;
    let yaml = format!(
        "{}{}{}",
        pool(
            "a",
            "10.81.0.0/16",
            "  nodeSelector: rack starts with 'r1' && !has(gpu)\n"
        ),
        node("n1"),
        pool(
            "b",
            "10.82.0.0/16",
            "  ipipMode: Never\n  vxlanMode: CrossSubnet\n  natOutgoing: true\n"
        )
    );
    let out = s.apply_ok(&yaml);
    assert_eq!(out, "IPPool/a created\nNode/n1 created\nIPPool/b created\n");
    let (items, after) = s.snapshot();
    assert_eq!(after, before + 1, "one transaction");
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|kv| kv.mod_revision == after));
    let out = s.apply_ok(&yaml);
    assert_eq!(
        out,
        "IPPool/a unchanged\nNode/n1 unchanged\nIPPool/b unchanged\n"
    );
    assert_eq!(s.snapshot().1, after);
    let out = s.apply_ok("{\"kind\": \"List\", \"apiVersion\": \"v1\", \"items\": []}");
    assert!(out.contains("no resources"), "{out}");
    assert_eq!(s.snapshot().1, after);
}

#[test]
fn good_files_commit_once_sqlite() {
    good_files_commit_once(false);
}

#[test]
fn good_files_commit_once_etcd() {
    good_files_commit_once(true);
}

/// An endless or huge input file is refused after 4 MiB, by `apply` and by `lab up` alike (the
/// lab read its topology whole first: `-f /dev/zero` ran the CLI out of memory).
#[test]
fn endless_input_files_are_refused_after_the_limit() {
    let store = Store::new(false);
    let zero = Path::new("/dev/zero");
    for verb in [&["apply"][..], &["create"], &["lab", "up"]] {
        let (st, out, err) = store.run_words(verb, zero);
        assert_eq!(st.code(), Some(1), "{verb:?}: {st} {out} {err}");
        assert!(
            err.contains("/dev/zero: larger than") && err.contains("4 MiB"),
            "{verb:?}: {err}"
        );
    }
}
