//! A hostile-input corpus run through the real plugin binary, bounded in time (5 s per call) and
//! memory (RLIMIT_AS): every defect of issue 15 items 1–5 as a hand-written case, plus a few
//! hundred seeded mutations of valid configurations and environments (wrong types, huge strings,
//! NUL bytes, odd Unicode, deep nesting, huge numbers, names the kernel rewrites, paths that are
//! not what they seem). For every case: the plugin finishes, never panics, prints exactly one
//! JSON document (a result, or an error with a code that names the field), and the namespace it
//! runs in — a test namespace with a default route of its own — and the pod's keep their links,
//! addresses and routes; a successful ADD is undone by DEL, leaving no address recorded.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{give_default_route, pod, Bounded, NetView, Node};
use serde_json::{json, Value};
use trellis_testutil::TestNetns;

const DEADLINE: Duration = Duration::from_secs(5);
const ADDRESS_SPACE: u64 = 1 << 30;
const GENERATED: usize = 400;
const DEEP: &str = "@@deep@@";

/// One invocation: which name the binary runs under, its environment and its stdin.
struct Case {
    label: String,
    role: &'static str,
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
}

/// A small deterministic generator (xorshift64*), so that a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Everything the cases refer to on disk.
struct Fixture {
    node: Node,
    pod: TestNetns,
    fifo: PathBuf,
    plain: PathBuf,
    cni_path: String,
}

fn nested(depth: usize) -> Value {
    let mut v = json!("x");
    for _ in 0..depth {
        v = json!([v]);
    }
    v
}

/// Values that replace a field in a mutation. Paths among them are harmless on this machine:
/// relative, in /proc or /dev, or inside the test's own directory.
fn hostile_values(f: &Fixture) -> Vec<Value> {
    let fifo = f.fifo.display().to_string();
    vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(1e308),
        json!(18_446_744_073_709_551_615u64),
        json!(-9_223_372_036_854_775_808i64),
        json!([]),
        json!({}),
        json!(""),
        json!("A".repeat(100_000)),
        json!("a\u{0}b"),
        json!("\u{202e}0hte"),
        json!("e\u{301}\u{feff}😀"),
        json!("\u{a0}"),
        json!("../../x"),
        json!("eth%d"),
        json!("all"),
        json!("default"),
        json!("/proc/self/ns/net"),
        json!("/dev/stdout"),
        json!("/proc/self/fd/1"),
        // A kernel control file (this one names only the plugin's own thread).
        json!("/proc/self/comm"),
        json!(fifo),
        json!("relative/path"),
        json!("127.0.0.1"),
        json!("0.0.0.0/0"),
        json!("::/0"),
        json!("224.0.0.0/4"),
        json!("255.255.255.255/32"),
        json!("10.84.0.0/33"),
        json!("10.84.0.1/24"),
        json!("fe80::1/64"),
        json!("10.84.0.1"),
        json!("ff:ff:ff:ff:ff:ff"),
        nested(60),
        // Spliced into the text as 5000 nested arrays (a Value that deep would overflow the
        // test's own stack when cloned or dropped).
        json!(DEEP),
    ]
}

/// Plausible values, so that more mutated configs get as far as the kernel.
fn plausible_values() -> Vec<Value> {
    vec![
        json!(68),
        json!(1280),
        json!(9000),
        json!(65535),
        json!(65536),
        json!("02:00:00:00:00:01"),
        json!("e"),
        json!("x.y-z_"),
        json!("\u{202e}x"),
        json!("10.84.0.0/30"),
        json!("10.84.0.0/31"),
        json!("10.84.0.7/32"),
        json!("fd00::/127"),
        json!("fd00::7/128"),
        json!([{"dst": "10.210.0.0/16"}]),
        json!(["10.84.0.5", "10.84.0.6"]),
        json!([{"subnet": "127.0.0.0/8"}]),
        json!([[{"subnet": "10.84.0.0/31"}]]),
        json!([[]]),
        json!({"dst": "10.0.0.1/8", "gw": "fd00::1"}),
        json!(true),
        json!(false),
        json!("1.1.0"),
        json!("0.3.0"),
        json!("br-x"),
        json!("fd00:99::/64"),
    ]
}

fn base_configs(f: &Fixture) -> Vec<Value> {
    let data = f.node.data_dir();
    vec![
        json!({"cniVersion": "1.0.0", "name": "corpus", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.84.0.0/24"}]], "dataDir": data}}),
        json!({"cniVersion": "1.1.0", "name": "corpus", "type": "trellis-cni", "mode": "bridge",
            "bridge": "trlcorp0", "isGateway": true, "isDefaultGateway": true, "hairpinMode": true,
            "ipMasq": true, "mtu": 1400,
            "ipam": {"type": "trellis-ipam", "ranges": [[{"subnet": "10.85.0.0/24"}]], "dataDir": data}}),
        json!({"cniVersion": "0.4.0", "name": "corpus", "type": "trellis-cni", "logLevel": "debug",
            "runtimeConfig": {"ips": ["10.86.0.9/24"], "mac": "02:00:00:00:00:09"},
            "args": {"cni": {"ips": ["10.86.0.8"]}},
            "dns": {"nameservers": ["10.0.0.10"], "search": ["svc"]},
            "ipam": {"type": "trellis-ipam", "dataDir": data,
                "ranges": [[{"subnet": "10.86.0.0/24", "rangeStart": "10.86.0.5", "rangeEnd": "10.86.0.50"}],
                           [{"subnet": "fd00:86::/120"}]],
                "routes": [{"dst": "10.200.0.0/16"}, {"dst": "fd00:200::/64"}]}}),
        json!({"cniVersion": "0.3.1", "name": "corpus", "type": "trellis-cni",
            "ipam": {"type": "trellis-ipam", "subnet": "10.87.0.0/24", "rangeStart": "10.87.0.10",
                "gateway": "10.87.0.1", "dataDir": data}}),
    ]
}

/// Every path (object key or array index) in `v`, as steps from the root.
fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(json!(k));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                prefix.push(json!(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, step| match step {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().unwrap() as usize],
        _ => unreachable!(),
    })
}

fn mutate(rng: &mut Rng, v: &mut Value, hostile: &[Value], plausible: &[Value]) -> String {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let path = rng.pick(&all).clone();
    let shown: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    let shown = shown.join(".");
    match rng.below(20) {
        0 | 1 => {
            let (last, parent) = path.split_last().unwrap();
            match (at(v, parent), last) {
                (Value::Object(m), Value::String(k)) => {
                    m.remove(k);
                }
                (Value::Array(a), Value::Number(i)) => {
                    a.remove(i.as_u64().unwrap() as usize);
                }
                _ => {}
            }
            format!("delete {shown}")
        }
        2 => {
            let (_, parent) = path.split_last().unwrap();
            if let Value::Object(m) = at(v, parent) {
                m.insert("bogus\u{0}key".into(), json!(1));
            }
            format!("unknown key beside {shown}")
        }
        n if n < 10 => {
            let i = rng.below(plausible.len());
            *at(v, &path) = plausible[i].clone();
            format!("{shown} := plausible #{i}")
        }
        _ => {
            let i = rng.below(hostile.len());
            *at(v, &path) = hostile[i].clone();
            format!("{shown} := hostile #{i}")
        }
    }
}

/// Hostile replacements for the CNI variables.
fn hostile_env(f: &Fixture, rng: &mut Rng, env: &mut Vec<(String, String)>) -> String {
    let fifo = f.fifo.display().to_string();
    let plain = f.plain.display().to_string();
    let choices: Vec<(&str, Vec<String>)> = vec![
        (
            "CNI_COMMAND",
            vec!["FROB".into(), "add".into(), "VERSION".into(), "".into()],
        ),
        (
            "CNI_CONTAINERID",
            vec![
                "c".repeat(300),
                "a/b".into(),
                "..".into(),
                "é".into(),
                "-x".into(),
                "".into(),
            ],
        ),
        (
            "CNI_NETNS",
            vec![
                "/proc/self/ns/net".into(),
                "/proc/thread-self/ns/net".into(),
                f.node.ns.path().display().to_string(),
                "/dev/null".into(),
                "/proc/self/ns/mnt".into(),
                fifo,
                plain,
                "relative".into(),
                format!("/{}", "n".repeat(5000)),
                "/var/run/netns/trlt-none-such".into(),
            ],
        ),
        (
            "CNI_IFNAME",
            vec![
                "eth%d".into(),
                "e%s".into(),
                "all".into(),
                "default".into(),
                "a b".into(),
                "é".repeat(8),
                "x".repeat(16),
                ".".into(),
                "\u{7f}".into(),
            ],
        ),
        (
            "CNI_ARGS",
            vec![
                "IP=127.0.0.1".into(),
                "IP=10.84.0.1".into(),
                "IP=10.84.0.5,10.84.0.6".into(),
                "IP=10.84.0.5/99".into(),
                "IgnoreUnknown=maybe".into(),
                ";;=;".into(),
                format!("K8S_POD_NAME={}", "p".repeat(100_000)),
            ],
        ),
        (
            "CNI_PATH",
            vec!["".into(), "relative".into(), "/nonexistent".into()],
        ),
    ];
    let (var, values) = rng.pick(&choices);
    let value = rng.pick(values).clone();
    env.retain(|(k, _)| k != var);
    env.push((var.to_string(), value.clone()));
    let shown: String = value.chars().take(40).collect();
    format!("{var}={shown:?}")
}

fn env_for(f: &Fixture, command: &str, cid: &str) -> Vec<(String, String)> {
    vec![
        ("CNI_COMMAND".into(), command.into()),
        ("CNI_CONTAINERID".into(), cid.into()),
        ("CNI_NETNS".into(), f.pod.path().display().to_string()),
        ("CNI_IFNAME".into(), "eth0".into()),
        ("CNI_PATH".into(), f.cni_path.clone()),
    ]
}

/// The defects of issue 15 items 1–5, one case each (with the valid routed config otherwise).
fn handwritten(f: &Fixture) -> Vec<Case> {
    let base = base_configs(f).remove(0);
    let with = |extra: Value| {
        let mut c = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c.to_string().into_bytes()
    };
    let fifo = f.fifo.display().to_string();
    let mut cases = Vec::new();
    let mut add = |label: &str, role: &'static str, env_over: &[(&str, &str)], stdin: Vec<u8>| {
        let mut env = env_for(f, "ADD", "hand-1");
        for (k, v) in env_over {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        }
        cases.push(Case {
            label: label.into(),
            role,
            env,
            stdin,
        });
    };
    let plain = base.to_string().into_bytes();
    let checked =
        with(json!({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.84.0.2/32"}]}}));
    let node_path = f.node.ns.path().display().to_string();
    for netns in [
        "/proc/self/ns/net",
        node_path.as_str(),
        "/dev/null",
        "/proc/self/ns/mnt",
        fifo.as_str(),
    ] {
        for cmd in ["ADD", "DEL", "CHECK"] {
            add(
                &format!("{cmd} CNI_NETNS={netns}"),
                "trellis-cni",
                &[("CNI_COMMAND", cmd), ("CNI_NETNS", netns)],
                if cmd == "CHECK" {
                    checked.clone()
                } else {
                    plain.clone()
                },
            );
        }
    }
    for cmd in ["VERSION", "ADD", "DEL", "GC", "STATUS"] {
        for role in ["trellis-cni", "trellis-ipam"] {
            add(
                &format!("{role} {cmd} logFile=FIFO"),
                role,
                &[("CNI_COMMAND", cmd)],
                with(json!({"cniVersion": "1.1.0", "logFile": fifo, "logLevel": "debug"})),
            );
        }
    }
    for target in ["/dev/stdout", "/proc/self/fd/1"] {
        add(
            &format!("logFile={target}"),
            "trellis-cni",
            &[],
            with(json!({"logFile": target, "logLevel": "debug"})),
        );
    }
    for ifname in ["eth%d", "e%s", "all", "default"] {
        add(
            &format!("CNI_IFNAME={ifname}"),
            "trellis-cni",
            &[("CNI_IFNAME", ifname)],
            plain.clone(),
        );
    }
    for bridge in ["fzbr%d", "br\u{0}x", "all"] {
        add(
            &format!("bridge={bridge:?}"),
            "trellis-cni",
            &[],
            with(json!({"mode": "bridge", "bridge": bridge})),
        );
    }
    let long_id = "c".repeat(251);
    add(
        "CNI_CONTAINERID of 251 bytes",
        "trellis-cni",
        &[("CNI_CONTAINERID", long_id.as_str())],
        plain.clone(),
    );
    add(
        "name of 251 bytes",
        "trellis-cni",
        &[],
        with(json!({"name": "n".repeat(251)})),
    );
    add(
        "dataDir with NUL",
        "trellis-cni",
        &[],
        with(json!({"ipam": {"type": "trellis-ipam",
        "ranges": [[{"subnet": "10.84.0.0/24"}]], "dataDir": "/tmp/a\u{0}b"}})),
    );
    for ips in [
        json!(["10.99.0.5"]),
        json!(["10.84.0.1"]),
        json!(["10.84.0.5", "10.84.0.6"]),
    ] {
        add(
            &format!("runtimeConfig.ips={ips}"),
            "trellis-cni",
            &[],
            with(json!({"runtimeConfig": {"ips": ips}})),
        );
    }
    add(
        "CNI_ARGS IP twice in one set",
        "trellis-cni",
        &[("CNI_ARGS", "IP=10.84.0.5,10.84.0.6")],
        plain.clone(),
    );
    for subnet in [
        "0.0.0.0/8",
        "127.0.0.0/8",
        "224.0.0.0/4",
        "255.255.255.255/32",
        "::/128",
        "::1/128",
        "ff00::/8",
    ] {
        for role in ["trellis-cni", "trellis-ipam"] {
            add(
                &format!("{role} range {subnet}"),
                role,
                &[],
                with(json!({"ipam": {"type": "trellis-ipam",
                "ranges": [[{"subnet": subnet}]], "dataDir": f.node.data_dir()}})),
            );
        }
    }
    add(
        "ipam.type names the main plugin",
        "trellis-cni",
        &[],
        with(json!({"ipam": {"type": "trellis-cni"}})),
    );
    add(
        "stdin not UTF-8",
        "trellis-cni",
        &[],
        b"{\"cniVersion\": \"1.0.0\xff\"}".to_vec(),
    );
    add(
        "stdin nested 100000 deep",
        "trellis-cni",
        &[],
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
    );
    add("stdin empty", "trellis-cni", &[], Vec::new());
    cases
}

fn generated(f: &Fixture, n: usize) -> Vec<Case> {
    let mut rng = Rng(0x7e11_15c0_ffee_0015);
    let bases = base_configs(f);
    let hostile = hostile_values(f);
    let plausible = plausible_values();
    let commands = [
        "ADD", "ADD", "ADD", "ADD", "ADD", "DEL", "DEL", "CHECK", "GC", "STATUS", "VERSION",
    ];
    (0..n)
        .map(|i| {
            let mut conf = rng.pick(&bases).clone();
            let mut what = Vec::new();
            let count = [1, 1, 1, 1, 1, 1, 2, 2, 2, 3][rng.below(10)];
            for _ in 0..count {
                what.push(mutate(&mut rng, &mut conf, &hostile, &plausible));
            }
            // Cluster IPAM with the default socket would talk to a real agent, if one ran here.
            let ipam = &mut conf["ipam"];
            if ipam.is_object() && ipam.get("ranges").is_none() && ipam.get("subnet").is_none() {
                ipam["agentSocket"] = json!(f.node.dir.path().join("no-agent.sock"));
            }
            let command = *rng.pick(&commands);
            let mut env = env_for(f, command, &format!("gen-{i}"));
            if rng.chance(30) {
                what.push(hostile_env(f, &mut rng, &mut env));
            }
            let role = if rng.chance(20) {
                "trellis-ipam"
            } else {
                "trellis-cni"
            };
            Case {
                label: format!("#{i} {role} {command}: {}", what.join("; ")),
                role,
                env,
                stdin: conf
                    .to_string()
                    .replace(
                        &format!("{DEEP:?}"),
                        &format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
                    )
                    .into_bytes(),
            }
        })
        .collect()
}

/// What a finished call printed, checked against the contract; `Ok(Some(result))` for a
/// successful ADD.
fn check_output(case: &Case, out: &common::Outcome) -> Result<Option<Value>, String> {
    if out.stderr.contains("panicked") {
        return Err(format!("panicked: {}", out.stderr));
    }
    if out.code != 0 && out.code != 1 {
        return Err(format!(
            "exit status {} (signal?): {}",
            out.code, out.stderr
        ));
    }
    let docs: Vec<Value> = serde_json::Deserializer::from_str(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("stdout is not JSON ({e}): {:?}", out.stdout))?;
    let command = case
        .env
        .iter()
        .find(|(k, _)| k == "CNI_COMMAND")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    if out.code == 0 {
        return match docs.as_slice() {
            [] if matches!(command, "DEL" | "GC" | "STATUS" | "CHECK") => Ok(None),
            [d] if d.is_object() && d["cniVersion"].is_string() => {
                Ok((command == "ADD").then(|| d.clone()))
            }
            _ => Err(format!(
                "success with {} documents: {:?}",
                docs.len(),
                out.stdout
            )),
        };
    }
    if out.stdout.len() > 8192 {
        return Err(format!("error of {} bytes on stdout", out.stdout.len()));
    }
    let [err] = docs.as_slice() else {
        return Err(format!(
            "error with {} documents on stdout: {:?}",
            docs.len(),
            out.stdout
        ));
    };
    let code = err["code"]
        .as_u64()
        .ok_or_else(|| format!("error without a code: {err}"))?;
    let msg = err["msg"]
        .as_str()
        .ok_or_else(|| format!("error without a msg: {err}"))?;
    const ALLOWED: [u64; 12] = [1, 2, 4, 5, 6, 7, 11, 50, 51, 100, 102, 103];
    if !ALLOWED.contains(&code) {
        return Err(format!(
            "code {code} from input that validation should have refused: {msg}"
        ));
    }
    let names_field = msg.contains('`')
        || msg.contains("CNI_")
        || msg.contains("stdin")
        || msg.contains("prevResult");
    if [1, 2, 4, 5, 6, 7].contains(&code) && !names_field {
        return Err(format!("code {code} names no field: {msg}"));
    }
    Ok(None)
}

/// Undoes a successful ADD with DEL (same environment and config).
fn undo(f: &Fixture, case: &Case) -> Result<(), String> {
    let mut env = case.env.clone();
    env.retain(|(k, _)| k != "CNI_COMMAND");
    env.push(("CNI_COMMAND".into(), "DEL".into()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    match f
        .node
        .run_bounded(case.role, &env, &case.stdin, DEADLINE, Some(ADDRESS_SPACE))
    {
        Bounded::Hung => Err("the DEL after a successful ADD hung".into()),
        Bounded::Done(o) if o.code == 0 => Ok(()),
        Bounded::Done(o) => Err(format!(
            "the DEL after a successful ADD failed: {}",
            o.stdout
        )),
    }
}

/// Addresses recorded anywhere under the test's data directories.
fn recorded(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if e
                .file_name()
                .to_string_lossy()
                .parse::<std::net::IpAddr>()
                .is_ok()
            {
                out.push(p);
            }
        }
    }
    out
}

/// `state` without the lines of bridges in `keep` (a bridge outlives its last pod by design).
fn without(state: &str, keep: &[String]) -> String {
    state
        .lines()
        .filter(|l| {
            !l.split(|c: char| c.is_whitespace() || c == ':')
                .any(|tok| keep.iter().any(|b| b == tok))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Waits (bounded) until `ns` is back to `want` (ignoring bridges in `keep`): DEL deletes host
/// links from a detached child.
fn settles(view: &mut NetView, want: &str, keep: &[String]) -> Result<(), String> {
    let want = without(want, keep);
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let now = without(&view.state(), keep);
        if now == want {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!(
                "namespace changed:\n--- before\n{want}\n--- after\n{now}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Counts, and the bridges made by successful bridge-mode ADDs (they outlive DEL by design).
#[derive(Default)]
struct Tally {
    adds: usize,
    errors: usize,
    bridges: Vec<String>,
}

/// Runs one case and checks its output; undoes a successful ADD.
fn run_case(f: &Fixture, case: &Case, tally: &mut Tally) -> Result<(), String> {
    let env: Vec<(&str, &str)> = case
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let out = match f
        .node
        .run_bounded(case.role, &env, &case.stdin, DEADLINE, Some(ADDRESS_SPACE))
    {
        Bounded::Hung => return Err(format!("hung for {DEADLINE:?}")),
        Bounded::Done(out) => out,
    };
    if out.code != 0 {
        tally.errors += 1;
    }
    if std::env::var("CORPUS_VERBOSE").is_ok() {
        let shown: String = out.stdout.chars().take(300).collect();
        eprintln!("{} => {} {shown}", case.label, out.code);
    }
    if let Some(result) = check_output(case, &out)? {
        tally.adds += 1;
        let ifs = result["interfaces"].as_array().cloned().unwrap_or_default();
        if ifs.len() == 3 && ifs[0]["sandbox"].is_null() {
            tally
                .bridges
                .extend(ifs[0]["name"].as_str().map(str::to_string));
        }
        undo(f, case)?;
    }
    Ok(())
}

/// Removes the lock files the cases' container IDs may leave (CHECK keeps a container's lock
/// file, as DEL is what removes it), on success and failure alike.
struct LockFiles(Vec<PathBuf>);

impl Drop for LockFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn hostile_input_corpus() {
    let node = Node::new("corpus");
    give_default_route(&node.ns);
    let pod = pod("corpus");
    let dir = node.dir.path().to_path_buf();
    let fifo = dir.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let plain = dir.join("plain");
    std::fs::write(&plain, "x").unwrap();
    let cni_path = dir.join("bin").display().to_string();
    let f = Fixture {
        node,
        pod,
        fifo,
        plain,
        cni_path,
    };
    let mut node_view = NetView::of(&f.node.ns);
    let mut pod_view = NetView::of(&f.pod);
    let node_before = node_view.state();
    let pod_before = pod_view.state();
    let mut cases = handwritten(&f);
    cases.extend(generated(&f, GENERATED));
    let _locks = LockFiles(
        cases
            .iter()
            .flat_map(|c| c.env.iter())
            .filter(|(k, v)| k == "CNI_CONTAINERID" && !v.is_empty() && !v.contains('/'))
            .map(|(_, v)| trellis_cni::lock::container_lock_path(v))
            .collect(),
    );
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut tally = Tally::default();
    for case in &cases {
        let verdict = run_case(&f, case, &mut tally)
            .and_then(|()| settles(&mut node_view, &node_before, &tally.bridges))
            .and_then(|()| settles(&mut pod_view, &pod_before, &[]))
            .and_then(|()| match recorded(f.node.dir.path()).as_slice() {
                [] => Ok(()),
                left => Err(format!("addresses left recorded: {left:?}")),
            });
        if let Err(e) = verdict {
            failures.push(format!("{}: {e}", case.label));
            if failures.len() >= 10 {
                break;
            }
        }
    }
    eprintln!(
        "{} cases in {:?}: {} successful ADDs (undone), {} errors",
        cases.len(),
        started.elapsed(),
        tally.adds,
        tally.errors
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}
