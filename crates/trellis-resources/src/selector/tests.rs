use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn evaluates_calico_examples() {
    let l = labels(&[("zone", "a"), ("role", "worker"), ("rack", "rack-12")]);
    for (src, want) in [
        ("all()", true),
        ("", true),
        ("all( )", true),
        ("global()", true),
        ("zone == 'a'", true),
        ("zone != 'a'", false),
        ("gpu != 'yes'", true),
        ("has(role) && zone in {'a', 'b'}", true),
        ("has( role )", true),
        ("!has(gpu)", true),
        ("!!has(gpu)", false),
        ("!!!has(gpu)", true),
        ("zone not in {'a'} || role == \"worker\"", true),
        ("zone notin {'a'}", false),
        ("(zone == 'b' || zone == 'c') && has(role)", false),
        ("!(zone == 'b' || zone == 'c') && has(role)", true),
        (
            "zone == 'a' && role == 'worker' && !has(gpu) && rack != 'x'",
            true,
        ),
        ("zone == 'x' || zone == 'y' || role == 'worker'", true),
        ("rack contains 'ck-1'", true),
        ("rack contains 'x'", false),
        ("gpu contains ''", false),
        ("rack starts with 'rack-'", true),
        ("rack starts  with 'x'", false),
        ("rack ends with '12'", true),
        ("rack ends with 'rack'", false),
        ("zone in {}", false),
        ("zone not in {}", true),
        // Labels that begin like keywords are labels.
        ("has == 'x'", false),
        ("all != 'x'", true),
    ] {
        let s = Selector::parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(s.matches(&l), want, "{src} → {s:?}");
    }
}

#[test]
fn keywords_need_a_word_boundary() {
    // `into` is not `in` followed by a label.
    assert!(matches!(
        Selector::parse("zone into {'a'}"),
        Err(SelectorError::Syntax { offset: 5, .. })
    ));
    assert!(Selector::parse("zone containsx 'a'").is_err());
    assert_eq!(
        Selector::parse("a.b/c-d_e contains 'x'").unwrap(),
        Selector::Contains("a.b/c-d_e".into(), "x".into())
    );
}

#[test]
fn errors_say_where() {
    let e = Selector::parse("zone = 'a'").unwrap_err();
    assert!(matches!(e, SelectorError::Syntax { offset: 5, .. }), "{e}");
    assert!(e.to_string().contains("offset 5"), "{e}");
    assert!(Selector::parse("zone == 'a").is_err());
    assert!(Selector::parse("has(zone").is_err());
    assert!(Selector::parse("all(x)").is_err());
    assert!(Selector::parse("zone == 'a' extra").is_err());
    assert!(Selector::parse("(zone == 'a'").is_err());
    assert!(Selector::parse("zone == 'a' &&").is_err());
}

#[test]
fn display_round_trips() {
    for src in [
        "!has(a) && (b in {'x','y'} || c != 'z')",
        "a == 'x' || b == 'y' && c == 'z'",
        "!(a == 'x' || b == \"it's\") && global()",
        "a contains 'x' && b starts with 'y' || c ends with 'z' && d not in {}",
        "((a == 'x'))",
    ] {
        let s = Selector::parse(src).unwrap();
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s, "{src} → {s}");
    }
}

#[test]
fn length_is_bounded_like_calico() {
    let at_limit = format!("a == '{}'", "x".repeat(MAX_SELECTOR_LEN - 7));
    assert_eq!(at_limit.chars().count(), MAX_SELECTOR_LEN);
    Selector::parse(&at_limit).unwrap();
    let over = format!("{at_limit} ");
    assert_eq!(
        Selector::parse(&over),
        Err(SelectorError::TooLong {
            len: MAX_SELECTOR_LEN + 1,
            max: MAX_SELECTOR_LEN
        })
    );
    // Characters, not bytes.
    let wide = format!("a == '{}'", "é".repeat(MAX_SELECTOR_LEN - 7));
    Selector::parse(&wide).unwrap();
    let label = "k".repeat(MAX_LABEL_LEN + 1);
    assert!(matches!(
        Selector::parse(&format!("has({label})")),
        Err(SelectorError::LabelTooLong { offset: 4, .. })
    ));
}

#[test]
fn nesting_is_bounded_and_reports_the_position() {
    let nest = |n: usize| format!("{}all(){}", "(".repeat(n), ")".repeat(n));
    Selector::parse(&nest(MAX_SELECTOR_DEPTH)).unwrap();
    assert_eq!(
        Selector::parse(&nest(MAX_SELECTOR_DEPTH + 1)),
        Err(SelectorError::TooDeep {
            offset: MAX_SELECTOR_DEPTH,
            max: MAX_SELECTOR_DEPTH
        })
    );
    // The inputs: 4 000 parentheses (8 KB) and 40 000 `!` are refused without
    // recursion, whatever their length. Run on a small stack to prove no deep recursion.
    let deep = nest(4000);
    let bangs = format!("{}all()", "!".repeat(40_000));
    let long_chain = vec!["a == 'b'"; 80].join(" && ");
    let t = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            assert!(matches!(
                Selector::parse(&deep),
                Err(SelectorError::TooLong { .. })
            ));
            assert!(matches!(
                Selector::parse(&bangs),
                Err(SelectorError::TooLong { .. })
            ));
            // Under the length limit: folded negations, flat chains.
            let b = format!("{}all()", "!".repeat(1001));
            assert_eq!(
                Selector::parse(&b).unwrap(),
                Selector::Not(Box::new(Selector::All))
            );
            let s = Selector::parse(&long_chain).unwrap();
            assert!(matches!(&s, Selector::And(v) if v.len() == 80));
            assert!(!s.matches(&BTreeMap::new()));
        })
        .unwrap();
    t.join().unwrap();
}

#[test]
fn evaluation_needs_no_recursion() {
    // A selector built by hand (not through `parse`) 100 000 levels deep still evaluates on a
    // small stack.
    let mut s = Selector::Has("a".into());
    for i in 0..100_000 {
        s = if i % 2 == 0 {
            Selector::Not(Box::new(s))
        } else {
            Selector::And(vec![Selector::All, s])
        };
    }
    let l = labels(&[("a", "1")]);
    let t = std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let r = s.matches(&l);
            // Leak it: dropping a hand-built 100 000-deep tree recurses (Box's drop).
            std::mem::forget(s);
            r
        })
        .unwrap();
    // 50 000 negations: even, so has(a) decides.
    assert!(t.join().unwrap());
}
