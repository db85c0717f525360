//! The manifest test's checks (pure, except that the CLI check runs the `trellis` binary
//! with `--help`): each returns the problems it found, naming the object and field.

use std::collections::BTreeSet;

use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;

// ---------------------------------------------------------------------------------------------
// The DaemonSet.

pub(super) fn check_daemonset(m: &Manifest) -> Vec<String> {
    let mut p = Vec::new();
    let d = m.daemonset();
    let spec = pod_spec_ds(d);
    if spec.host_network != Some(true) {
        p.push("hostNetwork is not true".into());
    }
    if spec.host_pid == Some(true) {
        p.push("hostPID is set (the agent enters no other process's namespaces)".into());
    }
    if spec.priority_class_name.as_deref() != Some("system-node-critical") {
        p.push("priorityClassName is not system-node-critical".into());
    }
    let tolerates_all =
        spec.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    if !tolerates_all {
        p.push("no toleration {operator: Exists} (every taint)".into());
    }
    let strategy = d.spec.update_strategy.as_ref();
    if strategy.and_then(|s| s.type_.as_deref()) != Some("RollingUpdate") {
        p.push("updateStrategy is not RollingUpdate".into());
    }
    if spec.service_account_name.as_deref() != Some(AGENT_SA) {
        p.push(format!("serviceAccountName is not {AGENT_SA}"));
    }
    if spec.automount_service_account_token != Some(false) {
        p.push("the node pods mount a service account token (the agent needs none)".into());
    }
    p.extend(check_volumes(spec));
    let [agent] = spec.containers.as_slice() else {
        p.push("the DaemonSet must run exactly one container, the agent".into());
        return p;
    };
    p.extend(check_agent(agent));
    match spec.init_containers.as_deref() {
        Some([init]) => p.extend(check_install_cni(init)),
        _ => p.push("the DaemonSet must have exactly one init container, install-cni".into()),
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The kube-controller's Deployment.

/// The controller must not wait for the pod network it sets up: on the pod network its pod
/// needs an address from Trellis first, but its init container applies the IPPool that every
/// first ADD needs, and in Kubernetes mode the agent gives a pod its address only once the
/// pod's record is stored — which this controller writes. So it runs on the host network, as
/// the agent does.
pub(super) fn check_controller_deployment(m: &Manifest) -> Vec<String> {
    let mut p = Vec::new();
    let spec = pod_spec_deploy(m.deployment());
    if spec.host_network != Some(true) {
        p.push("the kube-controller's hostNetwork is not true: its pod would need an address from the network it sets up (a pool its init container creates, an agent waiting for the pod record it writes)".into());
    }
    if spec.host_pid == Some(true) {
        p.push("the kube-controller's hostPID is set".into());
    }
    let no_ports = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .all(|c| c.ports.as_ref().is_none_or(|ps| ps.is_empty()));
    if !no_ports {
        p.push(
            "the kube-controller declares ports (on the host network they would be the node's)"
                .into(),
        );
    }
    p
}

/// Each mount names a volume, each volume is mounted, and the host paths are exactly these:
/// (volume, host path, container, mount path).
pub(super) const HOST_PATHS: [(&str, &str, &str, &str); 3] = [
    (
        "trellis-run",
        "/run/trellis",
        "trellis-agent",
        "/run/trellis",
    ),
    (
        "cni-bin-dir",
        "/opt/cni/bin",
        "install-cni",
        "/host/opt/cni/bin",
    ),
    (
        "cni-net-dir",
        "/etc/cni/net.d",
        "install-cni",
        "/host/etc/cni/net.d",
    ),
];

pub(super) fn check_volumes(spec: &PodSpec) -> Vec<String> {
    let mut p = Vec::new();
    let volumes: BTreeMap<&str, Option<&str>> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| {
            (
                v.name.as_str(),
                v.host_path.as_ref().map(|h| h.path.as_str()),
            )
        })
        .collect();
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let mut mounts = BTreeSet::new();
    for c in containers {
        for vm in c.volume_mounts.iter().flatten() {
            if !volumes.contains_key(vm.name.as_str()) {
                p.push(format!(
                    "{}: mounts {}, which is no volume",
                    c.name, vm.name
                ));
            }
            mounts.insert((vm.name.clone(), c.name.clone(), vm.mount_path.clone()));
        }
    }
    let want: BTreeSet<(String, String, String)> = HOST_PATHS
        .iter()
        .map(|(v, _, c, at)| (v.to_string(), c.to_string(), at.to_string()))
        .collect();
    if mounts != want {
        p.push(format!("mounts {mounts:?}, want {want:?}"));
    }
    let host: BTreeMap<&str, Option<&str>> = HOST_PATHS
        .iter()
        .map(|(v, h, _, _)| (*v, Some(*h)))
        .collect();
    if volumes != host {
        p.push(format!(
            "volumes (name → hostPath) {volumes:?}, want {host:?}"
        ));
    }
    p
}

pub(super) fn capabilities(c: &Container) -> (Vec<String>, Vec<String>) {
    let caps = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .unwrap_or_default();
    (caps.add.unwrap_or_default(), caps.drop.unwrap_or_default())
}

pub(super) fn check_security(c: &Container, add: &[&str]) -> Vec<String> {
    let mut p = Vec::new();
    let sc = c.security_context.clone().unwrap_or_default();
    if sc.privileged == Some(true) {
        p.push(format!("{} is privileged", c.name));
    }
    if sc.allow_privilege_escalation != Some(false) {
        p.push(format!("{}: allowPrivilegeEscalation is not false", c.name));
    }
    let (added, dropped) = capabilities(c);
    if dropped != ["ALL"] {
        p.push(format!(
            "{}: capabilities.drop is {dropped:?}, want [ALL]",
            c.name
        ));
    }
    let added: BTreeSet<&str> = added.iter().map(String::as_str).collect();
    if added != add.iter().copied().collect() {
        p.push(format!(
            "{}: capabilities.add is {added:?}, want {add:?}",
            c.name
        ));
    }
    p
}

pub(super) fn check_agent(c: &Container) -> Vec<String> {
    let mut p = check_security(c, &AGENT_CAPS);
    let a = args(c);
    if a.first().map(String::as_str) != Some("agent") {
        p.push(format!(
            "the agent container runs {a:?}, not `trellis agent`"
        ));
    }
    if flag(&a, "--socket").unwrap_or(PLUGIN_SOCKET) != PLUGIN_SOCKET {
        p.push(format!(
            "--socket is not {PLUGIN_SOCKET}, where the installed conflist's plugin looks"
        ));
    }
    if !a.iter().any(|x| x == "--kubernetes") {
        p.push("no --kubernetes (an ADD would create an endpoint without the pod's labels)".into());
    }
    if flag(&a, "--node") != Some("$(NODE_NAME)")
        || field_ref(c, "NODE_NAME") != Some("spec.nodeName")
    {
        p.push("--node is not $(NODE_NAME) from spec.nodeName".into());
    }
    let Some(listen) =
        flag(&a, "--metrics-listen").and_then(|l| l.parse::<std::net::SocketAddr>().ok())
    else {
        p.push("no --metrics-listen ADDR:PORT (the probes need /healthz and /readyz)".into());
        return p;
    };
    for (what, probe, path) in [
        ("livenessProbe", &c.liveness_probe, "/healthz"),
        ("readinessProbe", &c.readiness_probe, "/readyz"),
    ] {
        let Some(get) = probe.as_ref().and_then(|p| p.http_get.as_ref()) else {
            p.push(format!("no {what}.httpGet"));
            continue;
        };
        if get.path.as_deref() != Some(path) {
            p.push(format!("{what} path {:?}, want {path}", get.path));
        }
        let port = match &get.port {
            IntOrString::Int(n) => Some(*n),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
        };
        if port != Some(i32::from(listen.port())) {
            p.push(format!(
                "{what} port {port:?}, the agent listens on {listen}"
            ));
        }
        // A loopback listener is reached only through the probe's host (the kubelet is on
        // the same host: hostNetwork); an unspecified one on the pod (= node) address.
        let host_ok = match get.host.as_deref() {
            Some(h) => h.parse::<std::net::IpAddr>().ok() == Some(listen.ip()),
            None => listen.ip().is_unspecified(),
        };
        if !host_ok {
            p.push(format!(
                "{what} host {:?} does not reach {listen}",
                get.host
            ));
        }
    }
    if !c
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| Path::new(PLUGIN_SOCKET).parent() == Some(Path::new(&m.mount_path)))
    {
        p.push(format!(
            "the agent does not mount the socket's directory of {PLUGIN_SOCKET}"
        ));
    }
    p
}

pub(super) fn check_install_cni(c: &Container) -> Vec<String> {
    let mut p = check_security(c, &[]);
    let a = args(c);
    if a.first().map(String::as_str) != Some("install-cni") {
        p.push(format!(
            "the init container runs {a:?}, not `trellis install-cni`"
        ));
    }
    let root = flag(&a, "--host-root").unwrap_or("/host");
    for (dir, default) in [
        ("--cni-bin-dir", "/opt/cni/bin"),
        ("--cni-net-dir", "/etc/cni/net.d"),
    ] {
        let under = format!("{root}{}", flag(&a, dir).unwrap_or(default));
        if !c
            .volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path == under)
        {
            p.push(format!("install-cni writes {under}, which is not mounted"));
        }
    }
    p
}

pub(super) fn field_ref<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| {
            e.value_from
                .as_ref()?
                .field_ref
                .as_ref()
                .map(|f| f.field_path.as_str())
        })
}

// ---------------------------------------------------------------------------------------------
// Flags and environment, through the real parser.

/// The container's environment as the kubelet would set it (ConfigMap keys resolved, field
/// references given sample values).
pub(super) fn environment(m: &Manifest, c: &Container) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let v = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => match (&from.config_map_key_ref, &from.field_ref) {
                (Some(r), _) => m.config(&r.name).get(&r.key).cloned().ok_or_else(|| {
                    format!(
                        "{}: env {} names ConfigMap key {}/{}, which is missing",
                        c.name, e.name, r.name, r.key
                    )
                })?,
                (None, Some(f)) => {
                    format!("sample-{}", f.field_path.replace('.', "-").to_lowercase())
                }
                _ => {
                    return Err(format!(
                        "{}: env {} has an unsupported source",
                        c.name, e.name
                    ))
                }
            },
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), v);
    }
    Ok(env)
}

/// `$(VAR)` expanded as the kubelet does; a reference to no variable of the container fails.
pub(super) fn expand(arg: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find("$(") {
        out.push_str(&rest[..i]);
        let end = rest[i..]
            .find(')')
            .ok_or_else(|| format!("unclosed $( in {arg}"))?
            + i;
        let name = &rest[i + 2..end];
        out.push_str(
            env.get(name)
                .ok_or_else(|| format!("{arg}: $({name}) is no env variable of the container"))?,
        );
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The container's command line and environment through the real `trellis` parser: its
/// arguments followed by `--help`, which clap reaches only after every argument before it
/// parsed (an unknown flag or a bad value exits 2); and every env variable is one the
/// subcommand reads (its help's `[env: NAME=]`) or TRELLIS_LOG.
pub(super) fn check_cli(m: &Manifest, c: &Container) -> Vec<String> {
    let mut p = Vec::new();
    if c.command.as_deref() != Some(&["/usr/local/bin/trellis".to_string()][..]) {
        p.push(format!(
            "{}: command {:?}, want [/usr/local/bin/trellis] (the Containerfile's)",
            c.name, c.command
        ));
    }
    let env = match environment(m, c) {
        Ok(e) => e,
        Err(e) => return vec![e],
    };
    let argv: Vec<String> = match args(c).iter().map(|a| expand(a, &env)).collect() {
        Ok(a) => a,
        Err(e) => return vec![format!("{}: {e}", c.name)],
    };
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(&argv)
        .arg("--help")
        .env_clear()
        .envs(&env)
        .output()
        .unwrap();
    if !out.status.success() {
        p.push(format!(
            "{}: `trellis {}` does not parse: {}",
            c.name,
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
        return p;
    }
    let help = String::from_utf8_lossy(&out.stdout);
    let all_args = args(c);
    let referenced: BTreeSet<&str> = all_args
        .iter()
        .flat_map(|a| a.split("$(").skip(1))
        .filter_map(|s| s.split(')').next())
        .collect();
    for name in env.keys() {
        let read = help.contains(&format!("[env: {name}=")) || name == "TRELLIS_LOG";
        if !read && !referenced.contains(name.as_str()) {
            p.push(format!(
                "{}: env {name} is read by nothing (not in `trellis {} --help`)",
                c.name, argv[0]
            ));
        }
    }
    p
}

pub(super) fn check_all_cli(m: &Manifest) -> Vec<String> {
    let ds = pod_spec_ds(m.daemonset());
    let dep = pod_spec_deploy(m.deployment());
    let all = ds
        .containers
        .iter()
        .chain(ds.init_containers.iter().flatten())
        .chain(&dep.containers)
        .chain(dep.init_containers.iter().flatten());
    all.flat_map(|c| check_cli(m, c)).collect()
}

// ---------------------------------------------------------------------------------------------
// RBAC.

/// One granted permission: (verb, group, resource, resourceName or "", namespace or "" for
/// cluster-wide).
pub(super) type Grant = (String, String, String, String, String);

pub(super) fn bound_to(
    subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>,
    sa: &str,
) -> bool {
    subjects
        .iter()
        .flatten()
        .any(|s| s.kind == "ServiceAccount" && s.name == sa && s.namespace.as_deref() == Some(NS))
}

pub(super) fn expand_rules(rules: &[PolicyRule], namespace: &str, out: &mut BTreeSet<Grant>) {
    for r in rules {
        let names = r
            .resource_names
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| vec![String::new()]);
        for v in &r.verbs {
            for g in r.api_groups.iter().flatten() {
                for res in r.resources.iter().flatten() {
                    for n in &names {
                        out.insert((
                            v.clone(),
                            g.clone(),
                            res.clone(),
                            n.clone(),
                            namespace.to_string(),
                        ));
                    }
                }
            }
        }
    }
}

/// Everything `sa` is granted, expanded to single permissions.
pub(super) fn grants(m: &Manifest, sa: &str) -> BTreeSet<Grant> {
    let cluster_roles: BTreeMap<String, Vec<PolicyRule>> =
        m.0.iter()
            .filter_map(|o| match o {
                Object::ClusterRole(r) => Some((
                    r.metadata.name.clone()?,
                    r.rules.clone().unwrap_or_default(),
                )),
                _ => None,
            })
            .collect();
    let roles: BTreeMap<(String, String), Vec<PolicyRule>> =
        m.0.iter()
            .filter_map(|o| match o {
                Object::Role(r) => Some((
                    (r.metadata.namespace.clone()?, r.metadata.name.clone()?),
                    r.rules.clone().unwrap_or_default(),
                )),
                _ => None,
            })
            .collect();
    let mut out = BTreeSet::new();
    for o in &m.0 {
        match o {
            Object::ClusterRoleBinding(b) if bound_to(&b.subjects, sa) => {
                let rules = cluster_roles
                    .get(&b.role_ref.name)
                    .cloned()
                    .unwrap_or_default();
                expand_rules(&rules, "", &mut out);
            }
            Object::RoleBinding(b) if bound_to(&b.subjects, sa) => {
                let ns = b.metadata.namespace.clone().unwrap_or_default();
                let rules = match b.role_ref.kind.as_str() {
                    "ClusterRole" => cluster_roles.get(&b.role_ref.name).cloned(),
                    _ => roles.get(&(ns.clone(), b.role_ref.name.clone())).cloned(),
                };
                expand_rules(&rules.unwrap_or_default(), &ns, &mut out);
            }
            _ => {}
        }
    }
    out
}

/// Whether `g` authorises `r`, as RBAC decides.
pub(super) fn authorises(g: &Grant, r: &Request) -> bool {
    let (verb, group, resource, name, ns) = g;
    let any = |x: &str, y: &str| x == "*" || x == y;
    any(verb, &r.verb)
        && any(group, &r.group)
        && any(resource, &r.resource)
        && (name.is_empty() || r.name.as_deref() == Some(name.as_str()))
        && (ns.is_empty() || r.namespace.as_deref() == Some(ns.as_str()))
}

/// Requests no grant authorises, and grants no request used.
pub(super) fn check_rbac(m: &Manifest, seen: &[Request]) -> Vec<String> {
    let g = grants(m, CONTROLLER_SA);
    let mut p = Vec::new();
    let distinct: BTreeSet<&Request> = seen.iter().collect();
    for r in &distinct {
        if !g.iter().any(|g| authorises(g, r)) {
            p.push(format!(
                "not granted: {} {:?}/{} (namespace {:?}, name {:?})",
                r.verb, r.group, r.resource, r.namespace, r.name
            ));
        }
    }
    for grant in &g {
        if grant.0 == "*" || grant.1 == "*" || grant.2 == "*" {
            p.push(format!("a wildcard grant {grant:?}"));
        } else if !distinct.iter().any(|r| authorises(grant, r)) {
            p.push(format!("granted but never used: {grant:?}"));
        }
    }
    if !grants(m, AGENT_SA).is_empty() {
        p.push(format!(
            "{AGENT_SA} is bound to a role (the agent makes no API calls)"
        ));
    }
    let agent_bound = m.0.iter().any(|o| match o {
        Object::ClusterRoleBinding(b) => bound_to(&b.subjects, AGENT_SA),
        Object::RoleBinding(b) => bound_to(&b.subjects, AGENT_SA),
        _ => false,
    });
    if agent_bound {
        p.push(format!("a binding names {AGENT_SA}"));
    }
    for (sa, automount) in [(AGENT_SA, Some(false)), (CONTROLLER_SA, None)] {
        let found = m.0.iter().find_map(|o| match o {
            Object::ServiceAccount(s)
                if s.metadata.name.as_deref() == Some(sa)
                    && s.metadata.namespace.as_deref() == Some(NS) =>
            {
                Some(s)
            }
            _ => None,
        });
        match found {
            None => p.push(format!("no ServiceAccount {NS}/{sa}")),
            Some(s) if s.automount_service_account_token != automount => p.push(format!(
                "ServiceAccount {sa}: automountServiceAccountToken {:?}, want {automount:?}",
                s.automount_service_account_token
            )),
            Some(_) => {}
        }
    }
    p
}
