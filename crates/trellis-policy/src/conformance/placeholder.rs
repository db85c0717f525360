//! Pod-address placeholders in a suite's documents (pure): `$(ip x/a)`, `$(cidr x/a)` and
//! `$(cidr x/a/LEN)`, checked when a suite is parsed and replaced once the pods' addresses are
//! known.

use ipnet::IpNet;
use serde_json::Value;

use super::{invalid, Addresses, ConformanceError, ConformanceModel, PodRef};

/// What a placeholder stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// The address.
    Ip,
    /// The network of this prefix length holding the address (`None`: the host length).
    Cidr(Option<u8>),
}

/// A placeholder: the form and the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placeholder {
    form: Form,
    pod: PodRef,
}

/// The placeholders of a string, with their byte ranges.
fn placeholders(s: &str) -> Result<Vec<(std::ops::Range<usize>, Placeholder)>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = s[from..].find("$(") {
        let start = from + i;
        let Some(len) = s[start..].find(')') else {
            return Err(format!("unclosed placeholder in {s:?}"));
        };
        let end = start + len + 1;
        let inner = &s[start + 2..end - 1];
        let ph = match inner.split_once(' ') {
            Some(("ip", p)) => Placeholder {
                form: Form::Ip,
                pod: p.parse()?,
            },
            Some(("cidr", p)) => match p.matches('/').count() {
                1 => Placeholder {
                    form: Form::Cidr(None),
                    pod: p.parse()?,
                },
                2 => {
                    let (pod, len) = p.rsplit_once('/').expect("two slashes");
                    let prefix = len
                        .parse::<u8>()
                        .ok()
                        .filter(|l| *l <= 128)
                        .ok_or_else(|| format!("{len:?} is not a prefix length"))?;
                    Placeholder {
                        form: Form::Cidr(Some(prefix)),
                        pod: pod.parse()?,
                    }
                }
                _ => return Err(format!("$({inner}): expected $(cidr NS/POD[/LEN])")),
            },
            _ => {
                return Err(format!(
                    "$({inner}): expected $(ip NS/POD) or $(cidr NS/POD[/LEN])"
                ))
            }
        };
        out.push((start..end, ph));
        from = end;
    }
    Ok(out)
}

/// Every string of `v`, mutably, in document order.
fn strings_mut(
    v: &mut Value,
    f: &mut dyn FnMut(&mut String) -> Result<(), ConformanceError>,
) -> Result<(), ConformanceError> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter_mut().try_for_each(|x| strings_mut(x, f)),
        Value::Object(o) => o.values_mut().try_for_each(|x| strings_mut(x, f)),
        _ => Ok(()),
    }
}

pub(super) fn check_placeholders(
    m: &ConformanceModel,
    field: &str,
    d: &Value,
) -> Result<(), ConformanceError> {
    let mut d = d.clone();
    strings_mut(&mut d, &mut |s| {
        for (_, ph) in placeholders(s).map_err(|e| invalid(field, s.as_str(), e))? {
            if !m.has_pod(&ph.pod) {
                return Err(invalid(
                    field,
                    s.as_str(),
                    format!("{} is not a model pod", ph.pod),
                ));
            }
        }
        Ok(())
    })
}

/// The documents with every placeholder replaced by the address it names.
pub fn resolve(docs: &[Value], addrs: &Addresses) -> Result<Vec<Value>, ConformanceError> {
    let mut out = docs.to_vec();
    for d in &mut out {
        strings_mut(d, &mut |s| {
            let found = placeholders(s).map_err(|e| invalid("document", s.as_str(), e))?;
            for (range, ph) in found.into_iter().rev() {
                let ip = *addrs
                    .get(&ph.pod)
                    .ok_or_else(|| ConformanceError::NoAddress {
                        pod: ph.pod.to_string(),
                    })?;
                let text = match ph.form {
                    Form::Ip => ip.to_string(),
                    Form::Cidr(prefix) => {
                        let host = if ip.is_ipv4() { 32 } else { 128 };
                        let len = prefix.unwrap_or(host);
                        IpNet::new(ip, len)
                            .map_err(|_| {
                                invalid(
                                    "document",
                                    s.as_str(),
                                    format!("/{len} is too long for {ip}"),
                                )
                            })?
                            .trunc()
                            .to_string()
                    }
                };
                s.replace_range(range, &text);
            }
            Ok(())
        })?;
    }
    Ok(out)
}
