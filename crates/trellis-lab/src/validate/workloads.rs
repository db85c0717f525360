//! Checks of what a lab's pods look like to Kubernetes and to policy: namespaces and their
//! labels, each pod's Kubernetes name (unique in its namespace), its ports (named as Kubernetes
//! names container ports) and its service account. Pure.

use std::collections::BTreeMap;

use super::{bad, dns_label, labels, name_field};
use crate::topology::Topology;
use crate::LabError;

/// Most namespaces a lab lists, and ports a pod declares.
pub const MAX_NAMESPACES: usize = 50;
pub const MAX_PORTS: usize = 16;

/// Namespace names (DNS labels, listed once) and labels.
pub(super) fn namespaces(t: &Topology) -> Result<(), LabError> {
    if t.namespaces.len() > MAX_NAMESPACES {
        return Err(bad(
            "namespaces",
            "",
            format!(
                "{} entries; a lab has at most {MAX_NAMESPACES}",
                t.namespaces.len()
            ),
        ));
    }
    for (i, n) in t.namespaces.iter().enumerate() {
        name_field(format!("namespaces[{i}].name"), &n.name, 63)?;
        if let Some(j) = t.namespaces[..i].iter().position(|o| o.name == n.name) {
            return Err(bad(
                format!("namespaces[{i}].name"),
                format!("{:?}", n.name),
                format!("already listed as namespaces[{j}]"),
            ));
        }
        labels(format!("namespaces[{i}].labels"), &n.labels)?;
    }
    Ok(())
}

/// A pod's Kubernetes name, namespace (listed, when namespaces are), ports and service account.
pub(super) fn pods(t: &Topology) -> Result<(), LabError> {
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (i, p) in t.pods.iter().enumerate() {
        if let Some(n) = &p.pod_name {
            name_field(format!("pods[{i}].podName"), n, 63)?;
        }
        let key = (p.namespace.clone(), p.pod_name().to_string());
        if let Some(j) = seen.insert(key, i) {
            return Err(bad(
                format!("pods[{i}].podName"),
                format!("{:?}", p.pod_name()),
                format!(
                    "pods[{j}] has that name in namespace {} already",
                    p.namespace
                ),
            ));
        }
        if !t.namespaces.is_empty() && !t.namespaces.iter().any(|n| n.name == p.namespace) {
            return Err(bad(
                format!("pods[{i}].namespace"),
                format!("{:?}", p.namespace),
                "not one of the topology's namespaces",
            ));
        }
        if let Some(sa) = &p.service_account {
            subdomain(sa)
                .map_err(|r| bad(format!("pods[{i}].serviceAccount"), format!("{sa:?}"), r))?;
        }
        ports(i, p)?;
    }
    Ok(())
}

fn ports(i: usize, p: &crate::topology::LabPod) -> Result<(), LabError> {
    if p.ports.len() > MAX_PORTS {
        return Err(bad(
            format!("pods[{i}].ports"),
            "",
            format!("at most {MAX_PORTS}"),
        ));
    }
    for (k, port) in p.ports.iter().enumerate() {
        let field = format!("pods[{i}].ports[{k}]");
        if port.port == 0 {
            return Err(bad(format!("{field}.port"), "0", "ports are 1-65535"));
        }
        if let Some(name) = &port.name {
            service_name(name).map_err(|r| bad(format!("{field}.name"), format!("{name:?}"), r))?;
        }
        let earlier = &p.ports[..k];
        if earlier
            .iter()
            .any(|o| o.port == port.port && o.protocol == port.protocol)
        {
            return Err(bad(
                format!("{field}.port"),
                port.port.to_string(),
                format!("{} is declared twice", port.protocol.as_str()),
            ));
        }
        if let Some(name) = &port.name {
            if earlier.iter().any(|o| o.name.as_ref() == Some(name)) {
                return Err(bad(
                    format!("{field}.name"),
                    format!("{name:?}"),
                    "declared twice",
                ));
            }
        }
    }
    Ok(())
}

/// A named port: an IANA service name (Kubernetes' container port names): 1-15 lower-case
/// letters, digits and '-', at least one letter, no '-' at either end or twice in a row.
fn service_name(n: &str) -> Result<(), String> {
    let ok = (1..=15).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && n.chars().any(|c| c.is_ascii_lowercase())
        && !n.starts_with('-')
        && !n.ends_with('-')
        && !n.contains("--");
    if ok {
        Ok(())
    } else {
        Err("must be 1-15 lower-case letters, digits and '-' with a letter (a port name)".into())
    }
}

/// A DNS subdomain (a service account name): dot-separated DNS labels, at most 253 characters.
fn subdomain(n: &str) -> Result<(), String> {
    if n.len() > 253 {
        return Err("must be at most 253 characters".into());
    }
    n.split('.').try_for_each(|l| dns_label(l, 63))
}
