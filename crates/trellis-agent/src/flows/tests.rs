//! The flow log's aggregation: intervals, bounds, queries.

use super::*;

fn packet(prefix: &str, src: &str, dst: &str, dport: u16) -> LoggedPacket {
    LoggedPacket {
        prefix: prefix.into(),
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: 6,
        src_port: Some(40000),
        dst_port: Some(dport),
        icmp: None,
    }
}

fn resolve(ip: IpAddr) -> FlowPeer {
    match ip.to_string().as_str() {
        "10.0.0.1" => FlowPeer::Pod {
            namespace: "x".into(),
            name: "a".into(),
        },
        "10.0.0.2" => FlowPeer::Pod {
            namespace: "y".into(),
            name: "b".into(),
        },
        _ => FlowPeer::External { address: ip },
    }
}

fn settings(max_open: usize, max_records: usize) -> FlowSettings {
    FlowSettings {
        group: 1,
        interval: Duration::from_secs(5),
        max_open,
        max_records,
    }
}

#[test]
fn packets_aggregate_per_flow_and_interval_and_name_the_deciding_rule() {
    let mut log = FlowLog::new("n1", settings(100, 100), 0);
    let deny = packet("deny knp/y/deny-all/in/0", "10.0.0.1", "10.0.0.2", 80);
    let allow = packet("allow gnp/web/in/2", "10.0.0.1", "10.0.0.2", 81);
    for t in [0, 100, 200] {
        log.observe(t, &deny, &resolve);
    }
    log.observe(300, &allow, &resolve);
    // Open: visible only when asked for, without a sequence number.
    assert!(log.query(&FlowQuery::default(), 400).records.is_empty());
    let open = log.query(
        &FlowQuery {
            open: true,
            ..Default::default()
        },
        400,
    );
    assert_eq!(open.records.len(), 2);
    assert!(open.records.iter().all(|r| r.seq.is_none()));
    // The interval closes at 5 s: one record per flow, packets summed.
    log.tick(5_000);
    let all = log.query(&FlowQuery::default(), 5_000);
    assert_eq!(all.next, 2);
    let denied: Vec<&FlowRecord> = all
        .records
        .iter()
        .filter(|r| r.key.verdict == FlowVerdict::Denied)
        .collect();
    assert_eq!(denied.len(), 1);
    let d = denied[0];
    assert_eq!(d.packets, 3);
    assert_eq!((d.start, d.end), (0, 5_000));
    assert_eq!(d.key.policy, "knp/y/deny-all");
    assert_eq!(
        (d.key.direction.as_str(), d.key.rule.as_str()),
        ("ingress", "0")
    );
    assert_eq!(d.key.source.to_string(), "x/a");
    assert_eq!(d.key.destination.to_string(), "y/b");
    assert_eq!(d.key.port, Some(80));
    assert_eq!(log.denied().get("knp/y/deny-all"), Some(&3));
    // Filters: verdict, namespace, and `after` for --follow.
    let q = |verdict, namespace: Option<&str>, after| FlowQuery {
        verdict,
        namespace: namespace.map(String::from),
        after,
        open: false,
    };
    assert_eq!(
        log.query(&q(Some(FlowVerdict::Allowed), None, None), 0)
            .records
            .len(),
        1
    );
    assert_eq!(log.query(&q(None, Some("y"), None), 0).records.len(), 2);
    assert_eq!(log.query(&q(None, Some("z"), None), 0).records.len(), 0);
    assert_eq!(log.query(&q(None, None, Some(1)), 0).records.len(), 1);
    assert_eq!(log.query(&q(None, None, Some(2)), 0).records.len(), 0);
}

#[test]
fn memory_is_bounded_and_what_does_not_fit_is_counted() {
    let mut log = FlowLog::new("n1", settings(10, 25), 0);
    for i in 0..15u16 {
        log.observe(
            1,
            &packet("allow none/in/default", "10.0.0.1", "203.0.113.9", 1000 + i),
            &resolve,
        );
    }
    assert_eq!(log.lost(), 5, "five flows beyond the bound of ten");
    // Not a Trellis prefix: counted as lost, not recorded.
    log.observe(
        2,
        &packet("someone else's", "10.0.0.1", "10.0.0.2", 1),
        &resolve,
    );
    assert_eq!(log.lost(), 6);
    log.tick(5_000);
    for i in 0..10u16 {
        log.observe(
            5_001,
            &packet("allow none/in/default", "10.0.0.1", "10.0.0.2", i),
            &resolve,
        );
    }
    log.tick(10_000);
    for i in 0..10u16 {
        log.observe(
            10_001,
            &packet("allow none/in/default", "10.0.0.1", "10.0.0.2", 100 + i),
            &resolve,
        );
    }
    log.tick(15_000);
    let all = log.query(&FlowQuery::default(), 15_000);
    assert_eq!(all.records.len(), 25, "only the newest 25 records are kept");
    assert!(!all.more);
    assert_eq!(all.records.last().unwrap().seq, Some(30));
    assert_eq!(all.records.first().unwrap().seq, Some(6));
}

#[test]
fn quiet_time_is_skipped_not_recorded_as_empty_intervals() {
    let mut log = FlowLog::new("n1", settings(10, 10), 0);
    log.observe(
        1,
        &packet("deny tier/admin/out/default", "10.0.0.1", "10.0.0.2", 1),
        &resolve,
    );
    // An hour later: the old interval closes once, the new one starts now.
    log.observe(
        3_600_000,
        &packet("deny tier/admin/out/default", "10.0.0.1", "10.0.0.2", 1),
        &resolve,
    );
    let r = log.query(&FlowQuery::default(), 3_600_000);
    assert_eq!(r.records.len(), 1);
    assert_eq!((r.records[0].start, r.records[0].end), (0, 5_000));
    assert_eq!(r.records[0].key.policy, "tier/admin");
    log.tick(3_605_000);
    let r = log.query(&FlowQuery::default(), 3_605_000);
    assert_eq!(
        (r.records[1].start, r.records[1].end),
        (3_600_000, 3_605_000)
    );
}

#[test]
fn a_large_log_is_read_page_by_page_without_gaps_or_repeats() {
    let mut log = FlowLog::new("n1", settings(20_000, 20_000), 0);
    for i in 0..12_000u32 {
        let verdict = if i % 3 == 0 { "deny" } else { "allow" };
        let p = packet(
            &format!("{verdict} knp/y/p/in/0"),
            "10.0.0.1",
            &format!("10.1.{}.{}", i / 250, i % 250),
            80,
        );
        log.observe(1, &p, &resolve);
    }
    log.tick(5_000);
    log.observe(
        5_001,
        &packet("deny knp/y/p/in/0", "10.0.0.1", "10.0.0.2", 81),
        &resolve,
    );
    for verdict in [None, Some(FlowVerdict::Denied)] {
        let mut after = None;
        let mut seen = Vec::new();
        let mut open = 0;
        for page in 0.. {
            assert!(page < 10, "paging does not end");
            let r = log.query(
                &FlowQuery {
                    after,
                    verdict,
                    open: true,
                    ..Default::default()
                },
                5_002,
            );
            assert!(r.records.len() <= MAX_REPLY_RECORDS);
            open += r.records.iter().filter(|r| r.seq.is_none()).count();
            seen.extend(r.records.iter().filter_map(|r| r.seq));
            after = Some(r.next);
            if !r.more {
                break;
            }
        }
        let want = if verdict.is_some() { 4_000 } else { 12_000 };
        let mut unique = seen.clone();
        unique.dedup();
        assert_eq!((seen.len(), unique.len()), (want, want), "{verdict:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
        assert_eq!(open, 1, "the open interval comes once, with the last page");
    }
}
