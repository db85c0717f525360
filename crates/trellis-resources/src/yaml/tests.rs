use std::sync::mpsc;
use std::time::Duration;

use serde_json::json;

use super::*;

/// Runs `f` on another thread and fails the test if it has not finished within `secs`: a hang
/// guard for the bombs below (generous, so a loaded machine does not fail it; the inputs took
/// from seconds to hours before the limits).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("parse did not finish in time")
}

fn refused(text: String) -> ResourceError {
    within(60, move || parse_values(&text)).expect_err("must be refused")
}

#[test]
fn plain_documents_parse() {
    let v = parse_values("a: 1\n---\n---\nb: [x, {c: .5}]\n").unwrap();
    assert_eq!(v, vec![json!({"a": 1}), json!({"b": ["x", {"c": 0.5}]})]);
    assert_eq!(
        parse_values(r#"{"a": [1, -2, 3.5, null, true, "s"]}"#).unwrap(),
        vec![json!({"a": [1, -2, 3.5, null, true, "s"]})]
    );
    // Small aliases are fine (and expanded).
    let v = parse_values("a: &x {b: 1}\nc: *x\n").unwrap();
    assert_eq!(v, vec![json!({"a": {"b": 1}, "c": {"b": 1}})]);
    assert!(parse_values("").unwrap().is_empty());
}

/// A byte order mark (what Windows editors put first) is not content: the documents read as
/// without it. (libyaml, with its encoding preset, read it as a column and then reported a
/// "document 2" the file does not have.)
#[test]
fn a_byte_order_mark_is_ignored() {
    for text in [
        "a: 1\nb: 2\n",
        "---\na: 1\nb: 2\n",
        "a: 1\r\nb: 2\r\n",
        r#"{"a": 1, "b": 2}"#,
    ] {
        let plain = parse_values(text).unwrap();
        assert_eq!(plain, vec![json!({"a": 1, "b": 2})], "{text:?}");
        let marked = format!("\u{feff}{text}");
        assert_eq!(parse_values(&marked).unwrap(), plain, "{text:?} with a BOM");
        assert_eq!(is_json(&marked), is_json(text));
    }
    let docs = crate::parse_documents(
        "\u{feff}[{\"apiVersion\": \"trellis.dev/v1\", \"kind\": \"IPPool\", \
         \"metadata\": {\"name\": \"a\"}, \"spec\": {\"cidr\": \"10.1.0.0/16\"}}]",
    )
    .unwrap();
    assert_eq!(docs.len(), 1);
}

#[test]
fn input_size_is_bounded() {
    let text = format!("a: '{}'\n", "x".repeat(MAX_INPUT_BYTES));
    let e = refused(text);
    assert!(e.reason.contains("4 MiB"), "{e}");
    let ok = format!("a: '{}'\n", "x".repeat(MAX_INPUT_BYTES - 100));
    assert_eq!(parse_values(&ok).unwrap().len(), 1);
}

#[test]
fn nesting_is_bounded_before_values_are_built() {
    let nest = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    parse_values(&format!("a: {}", nest(MAX_DEPTH - 1))).unwrap();
    let e = parse_values(&format!("a: {}", nest(MAX_DEPTH))).unwrap_err();
    assert!(e.reason.contains("nested deeper than 64"), "{e}");
    assert_eq!(e.doc, Some(1));
    // The issue's 100 000 `[` (libyaml scans flow nesting in quadratic time), flow mappings
    // filling the 4 MiB limit, and deep block nesting.
    for text in [
        "[".repeat(100_000),
        format!("x: {}", "{a: ".repeat(MAX_INPUT_BYTES / 4 - 1)),
        "- ".repeat(1_000_000),
        format!("x: 1\n---\n{}", "[".repeat(MAX_INPUT_BYTES - 20)),
    ] {
        let e = refused(text);
        assert!(e.reason.contains("nested deeper than 64"), "{e}");
    }
    // JSON too (serde_json alone allows 128).
    let json = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let e = parse_values(&json).unwrap_err();
    assert!(e.reason.contains("nested deeper than 64"), "{e}");
    assert!(e.field.starts_with("[0][0]"), "{e}");
}

#[test]
fn alias_expansion_is_bounded() {
    // The issue's bomb: a ~1 MB anchor aliased 2 000 times (about 2 GB once expanded).
    let mut text = String::from("a: &big [");
    text.push_str(&"xxxxxxxx, ".repeat(100_000));
    text.push_str("x]\nb: [");
    text.push_str(&"*big, ".repeat(2000));
    text.push_str("]\n");
    let e = refused(text);
    assert!(e.reason.contains("aliases expanded"), "{e}");
    // Billion laughs: each level aliases the one before ten times.
    let mut laughs = String::from("l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for i in 1..10 {
        let p = i - 1;
        laughs.push_str(&format!(
            "l{i}: &l{i} [{}]\n",
            vec![format!("*l{p}"); 10].join(", ")
        ));
    }
    let e = refused(laughs);
    assert!(e.reason.contains("aliases expanded"), "{e}");
    // A node that contains an alias of itself.
    let e = refused("a: &a [1, *a]\n".into());
    assert!(e.reason.contains("contains it"), "{e}");
}

#[test]
fn the_visitor_counts_values_too() {
    // JSON has no aliases, but the value budget holds for it as well.
    let mut json = String::from("[");
    json.push_str(&"0,".repeat(MAX_NODES));
    json.push_str("0]");
    let e = refused(json);
    assert!(e.reason.contains("more than 1048576 values"), "{e}");
}

#[test]
fn duplicate_keys_are_refused_naming_the_key() {
    let e =
        parse_values("a: 1\n---\nspec:\n  cidr: 10.0.0.0/8\n  cidr: 10.1.0.0/16\n").unwrap_err();
    assert_eq!(e.doc, Some(2));
    assert_eq!(e.field, "spec.cidr");
    assert!(e.reason.contains("duplicate key \"cidr\""), "{e}");
    // Quoting does not make a key different.
    let e = parse_values("x: [{a: 1, 'a': 2}]\n").unwrap_err();
    assert_eq!(e.field, "x[0].a");
    let e = parse_values(r#"{"kind": "IPPool", "spec": {"cidr": "a", "cidr": "b"}}"#).unwrap_err();
    assert_eq!(e.field, "spec.cidr");
    assert!(e.reason.contains("duplicate key"), "{e}");
}

#[test]
fn non_finite_numbers_are_refused_naming_the_field() {
    for v in [".inf", "-.inf", ".nan", ".NaN", "+.Inf"] {
        let e = parse_values(&format!("spec:\n  blockSize: {v}\n")).unwrap_err();
        assert_eq!(e.field, "spec.blockSize", "{v}: {e}");
        assert!(e.reason.contains("not a finite number"), "{v}: {e}");
    }
    // Quoted, it is a string (and the resource's type check names it).
    assert_eq!(
        parse_values("a: '.inf'\n").unwrap(),
        vec![json!({"a": ".inf"})]
    );
}

#[test]
fn syntax_errors_name_the_document() {
    let e = parse_values("a: 1\n---\nb: [1, 2\n").unwrap_err();
    assert_eq!(e.doc, Some(2));
    assert_eq!(e.field, "document");
    assert!(e.reason.starts_with("invalid YAML"), "{e}");
    let e = parse_values("{\"a\": 1} x").unwrap_err();
    assert!(e.reason.starts_with("invalid JSON"), "{e}");
}
