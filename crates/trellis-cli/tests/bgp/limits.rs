//! BGPPeer `maxPrefixes` against a gobgpd ToR announcing more prefixes than the limit.

use super::*;

/// n1's session with the ToR as n1 reports it.
fn tor_session(lab: &str) -> Value {
    peers(lab, "n1")
        .into_iter()
        .find(|p| p["address"] == "192.168.76.100")
        .unwrap_or_default()
}

/// n1's kernel routes into 10.99.0.0/16 (where the test's ToR announces its prefixes).
fn limited_routes(lab: &str) -> usize {
    routes(lab, "n1")
        .lines()
        .filter(|l| l.starts_with("10.99."))
        .count()
}

#[test]
fn max_prefixes_rejects_or_resets_a_peer_that_sends_too_many() {
    let lab = "tbgpmax";
    let _g = up(
        lab,
        &PAIR.replace("  - {name: peer, subnet: rack1}", &tor("gobgp", "")),
    );
    converge(lab, &["n1"], 2);
    // A changed limit resets the session: wait for it to be established again.
    let log = || std::fs::read_to_string(format!("/run/trellis/lab/{lab}/n1.log")).unwrap();
    let sessions = || {
        log()
            .matches("BGP session established peer=192.168.76.100 ")
            .count()
    };
    let before = sessions();
    apply(lab, &tor_peer("maxPrefixes: {limit: 5, action: Reject}"));
    wait_for("the session back with the limit", 30, || {
        sessions() > before && tor_up(lab)
    });
    // What n1 holds from the ToR already (its own block, sent back and rejected as a loop).
    let held = tor_session(lab)["received"].as_u64().unwrap();
    assert!(held < 5, "{}", tor_session(lab));
    for i in 0..8 {
        let prefix = format!("10.99.{i}.0/24");
        let (ok, out) = exec(
            lab,
            "tor",
            &[
                "gobgp",
                "global",
                "rib",
                "add",
                &prefix,
                "nexthop",
                "192.168.76.100",
            ],
        );
        assert!(ok, "{out}");
    }
    // Reject: every announcement beyond the limit is counted and ignored; the session stays.
    let beyond = held + 8 - 5;
    wait_for(
        "the announcements beyond the limit to be counted",
        20,
        || tor_session(lab)["prefixesOverLimit"].as_u64() == Some(beyond),
    );
    let s = tor_session(lab);
    assert_eq!(s["received"].as_u64(), Some(5), "{s}");
    assert_eq!(s["state"], "Established", "{s}");
    assert_eq!(
        limited_routes(lab),
        (5 - held) as usize,
        "{}",
        routes(lab, "n1")
    );
    let (ok, m) = exec(lab, "n1", &["python3", "-c", "import urllib.request;print(urllib.request.urlopen('http://192.168.76.10:9091/metrics').read().decode())"]);
    assert!(ok, "{m}");
    assert!(
        m.contains(&format!(
            "trellis_bgp_prefixes_over_limit_total{{peer=\"192.168.76.100\"}} {beyond}"
        )),
        "{m}"
    );
    assert!(
        log().contains(
            "peer exceeded its maxPrefixes limit peer=192.168.76.100 limit=5 action=Reject"
        ),
        "{}",
        log()
    );
    // Restart (the default action): the session comes back, the ToR sends its table again and
    // n1 ends the session with Cease / Maximum Number of Prefixes Reached (RFC 4486), dropping
    // the ToR's routes; it then holds the session idle instead of reloading at once.
    apply(lab, &tor_peer("maxPrefixes: {limit: 5}"));
    wait_for("n1 to reset the session for too many prefixes", 30, || {
        tor_session(lab)["lastError"]
            .as_str()
            .is_some_and(|e| e.contains("sent cease: maximum number of prefixes reached (6/1)"))
    });
    wait_for("the ToR's routes to go", 10, || limited_routes(lab) == 0);
    // gobgpd received the NOTIFICATION with its data: AFI 1, SAFI 1, limit 5 (RFC 4486 §4).
    let gobgp_log =
        || std::fs::read_to_string(format!("/run/trellis/lab/{lab}/tor.gobgp.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let got_it = |log: String| {
        log.lines().any(|l| {
            l.contains("msg=\"received notification\" Code=6 Data=\"[0 1 1 0 0 0 5]\"")
                && l.contains("Subcode=1 ")
        })
    };
    while !got_it(gobgp_log()) {
        assert!(Instant::now() < deadline, "gobgpd's log:\n{}", gobgp_log());
        std::thread::sleep(Duration::from_millis(250));
    }
}
