//! Labels: Kubernetes' rules for keys and values, and `kubectl label`'s edits (`k=v`, `k-`,
//! `--overwrite`). Pure.

use std::collections::BTreeMap;

use crate::ResourceError;

/// Longest label value and key name part (Kubernetes' `LabelValueMaxLength`).
pub const MAX_LABEL_VALUE: usize = 63;
/// Longest key prefix (a DNS subdomain).
pub const MAX_LABEL_PREFIX: usize = 253;

/// 1-63 letters, digits, '-', '_', '.', starting and ending with a letter or digit.
fn qualified_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_VALUE
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// A DNS subdomain: lower-case labels of letters, digits and '-', separated by dots.
fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_PREFIX
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A label key: `[prefix/]name` (Kubernetes' qualified name).
pub fn key(k: &str) -> Result<(), String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if prefix.is_some_and(|p| !dns_subdomain(p)) {
        return Err(format!(
            "label key {k:?}: the prefix must be a DNS subdomain (lower-case letters, digits, '-' and '.', at most {MAX_LABEL_PREFIX})"
        ));
    }
    if !qualified_part(name) {
        return Err(format!(
            "label key {k:?}: the name must be 1-{MAX_LABEL_VALUE} letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A label value: empty, or like a key's name part.
pub fn value(v: &str) -> Result<(), String> {
    if v.is_empty() || qualified_part(v) {
        Ok(())
    } else {
        Err(format!(
            "label value {v:?} must be empty or 1-{MAX_LABEL_VALUE} letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        ))
    }
}

/// Every key and value of a label map; the error names `field` (e.g. `metadata.labels`).
pub fn check(field: &str, labels: &BTreeMap<String, String>) -> Result<(), ResourceError> {
    for (k, v) in labels {
        key(k).map_err(|e| ResourceError::field(field, e))?;
        value(v).map_err(|e| ResourceError::field(format!("{field}.{k}"), e))?;
    }
    Ok(())
}

/// One edit of `trellis label`: `k=v` sets, `k-` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    Set(String, String),
    Remove(String),
}

impl LabelChange {
    /// Parses one argument, checking the key and value.
    pub fn parse(arg: &str) -> Result<LabelChange, ResourceError> {
        let bad = |e: String| ResourceError::field(format!("label {arg:?}"), e);
        if let Some((k, v)) = arg.split_once('=') {
            key(k).map_err(bad)?;
            value(v).map_err(bad)?;
            return Ok(LabelChange::Set(k.into(), v.into()));
        }
        if let Some(k) = arg.strip_suffix('-') {
            key(k).map_err(bad)?;
            return Ok(LabelChange::Remove(k.into()));
        }
        Err(bad("expected KEY=VALUE to set or KEY- to remove".into()))
    }

    pub fn key(&self) -> &str {
        match self {
            LabelChange::Set(k, _) | LabelChange::Remove(k) => k,
        }
    }
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relabelled {
    pub labels: BTreeMap<String, String>,
    /// Keys asked to be removed that were not there (kubectl prints `label "k" not found.`).
    pub not_found: Vec<String>,
}

/// Applies edits with kubectl's rules: changing an existing value needs `overwrite`; a key may
/// not be both set and removed; removing an absent key is reported, not an error. `protected`
/// keys (set by the system) cannot be changed.
pub fn apply(
    current: &BTreeMap<String, String>,
    changes: &[LabelChange],
    overwrite: bool,
    protected: &[(&str, &str)],
) -> Result<Relabelled, ResourceError> {
    let err = |k: &str, reason: String| ResourceError::field(format!("label {k:?}"), reason);
    for (i, c) in changes.iter().enumerate() {
        if changes[..i].iter().any(|d| d.key() == c.key()) {
            return Err(err(
                c.key(),
                "is given twice; set or remove each label once".into(),
            ));
        }
        if let Some((_, v)) = protected.iter().find(|(k, _)| *k == c.key()) {
            let keeps = matches!(c, LabelChange::Set(_, w) if w == v);
            if !keeps {
                return Err(err(
                    c.key(),
                    format!("is set by the system to {v:?} and cannot change"),
                ));
            }
        }
    }
    let mut labels = current.clone();
    let mut not_found = Vec::new();
    for c in changes {
        match c {
            LabelChange::Set(k, v) => match current.get(k) {
                Some(old) if old != v && !overwrite => {
                    return Err(err(
                        k,
                        format!("already has a value ({old}), and --overwrite is false"),
                    ))
                }
                _ => {
                    labels.insert(k.clone(), v.clone());
                }
            },
            LabelChange::Remove(k) => {
                if labels.remove(k).is_none() {
                    not_found.push(k.clone());
                }
            }
        }
    }
    Ok(Relabelled { labels, not_found })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_values_follow_kubernetes() {
        for ok in [
            "app",
            "a.b_c-d",
            "example.com/app",
            "kubernetes.io/metadata.name",
        ] {
            assert!(key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "Ex.com/a", "a/b/c", &"x".repeat(64), "a b"] {
            assert!(key(bad).is_err(), "{bad}");
        }
        assert!(value("").is_ok());
        assert!(value("v1.2").is_ok());
        assert!(value("-v").is_err());
        assert!(value(&"v".repeat(64)).is_err());
    }

    #[test]
    fn kubectl_semantics() {
        let cur = m(&[("a", "1"), ("b", "2")]);
        let set = |k: &str, v: &str| LabelChange::Set(k.into(), v.into());
        // A new key, and the same value again, need no --overwrite.
        let r = apply(&cur, &[set("c", "3"), set("a", "1")], false, &[]).unwrap();
        assert_eq!(r.labels, m(&[("a", "1"), ("b", "2"), ("c", "3")]));
        // A different value does.
        let e = apply(&cur, &[set("a", "9")], false, &[]).unwrap_err();
        assert!(e.reason.contains("--overwrite is false"), "{e}");
        let r = apply(&cur, &[set("a", "9")], true, &[]).unwrap();
        assert_eq!(r.labels["a"], "9");
        // Removal, of a present and an absent key.
        let r = apply(
            &cur,
            &[
                LabelChange::Remove("b".into()),
                LabelChange::Remove("z".into()),
            ],
            false,
            &[],
        )
        .unwrap();
        assert_eq!(r.labels, m(&[("a", "1")]));
        assert_eq!(r.not_found, ["z"]);
        // Set and remove the same key: refused.
        assert!(apply(
            &cur,
            &[set("a", "1"), LabelChange::Remove("a".into())],
            true,
            &[]
        )
        .is_err());
        // A protected key.
        let p = [("kubernetes.io/metadata.name", "x")];
        assert!(apply(&cur, &[set("kubernetes.io/metadata.name", "y")], true, &p).is_err());
        assert!(apply(&cur, &[set("kubernetes.io/metadata.name", "x")], true, &p).is_ok());
    }

    #[test]
    fn arguments_parse() {
        assert_eq!(
            LabelChange::parse("app=web").unwrap(),
            LabelChange::Set("app".into(), "web".into())
        );
        assert_eq!(
            LabelChange::parse("app=").unwrap(),
            LabelChange::Set("app".into(), "".into())
        );
        assert_eq!(
            LabelChange::parse("app-").unwrap(),
            LabelChange::Remove("app".into())
        );
        assert!(LabelChange::parse("app").is_err());
        assert!(LabelChange::parse("a pp=x").is_err());
        assert!(LabelChange::parse("app=x y").is_err());
    }
}
