//! Text of `policy trace` and `policy show`.

use trellis_policy::eval::{DirectionTrace, PassedBy, PeerView, Trace, Verdict};
use trellis_policy::model::{
    Action, Direction, PolicyId, Protocol, RuleOrigin, Tier, TierDefault, ADMIN_TIER, BASELINE_TIER,
};

fn order(o: Option<f64>) -> String {
    o.map(|o| o.to_string()).unwrap_or_else(|| "none".into())
}

/// `x/a (10.0.0.1 on n1)`, `10.9.9.9`, `node n1 (172.16.0.1)`.
pub fn peer(v: &PeerView) -> String {
    let addr = v.address.map(|a| a.to_string());
    match (&v.endpoint, &v.node) {
        (Some((ns, name)), node) => {
            let who = match &v.pod {
                Some(p) if p != name => format!("{ns}/{p} (endpoint {name})"),
                _ => format!("{ns}/{name}"),
            };
            let mut at: Vec<String> = addr.into_iter().collect();
            if let Some(n) = node {
                at.push(format!("on {n}"));
            }
            if at.is_empty() {
                who
            } else {
                format!("{who} ({})", at.join(" "))
            }
        }
        (None, Some(n)) => format!("node {n} ({})", addr.unwrap_or_default()),
        (None, None) => addr.unwrap_or_else(|| "?".into()),
    }
}

pub fn protocol(p: Protocol) -> String {
    match p {
        Protocol::Tcp => "TCP".into(),
        Protocol::Udp => "UDP".into(),
        Protocol::Sctp => "SCTP".into(),
        Protocol::Icmp => "ICMP".into(),
        Protocol::Icmpv6 => "ICMPv6".into(),
        Protocol::UdpLite => "UDPLite".into(),
        Protocol::Number(n) => format!("protocol {n}"),
    }
}

fn action(a: Action) -> &'static str {
    match a {
        Action::Allow => "Allow",
        Action::Deny => "Deny",
        Action::Pass => "Pass",
        Action::Log => "Log",
    }
}

fn default_action(d: TierDefault) -> &'static str {
    match d {
        TierDefault::Deny => "Deny",
        TierDefault::Pass => "Pass",
    }
}

fn outcome(a: Action) -> &'static str {
    if a == Action::Allow {
        "allowed"
    } else {
        "denied"
    }
}

fn verdict(v: &Verdict, d: Direction) -> String {
    let dir = match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    };
    match v {
        Verdict::NotAnEndpoint => format!("allowed: not an endpoint, so no {dir} policy applies"),
        Verdict::UnknownEndpoint => "denied: no such endpoint".into(),
        Verdict::OwnNode => "allowed: between a pod and its own node (never filtered)".into(),
        Verdict::SameEndpoint => "allowed: a pod talking to itself never leaves it".into(),
        Verdict::NoPolicy => format!("allowed: no {dir} policy applies and no profile"),
        Verdict::Rule { rule, action: a } => format!(
            "{} by {} rule {} ({}) of {}",
            outcome(*a),
            dir,
            rule.index,
            action(*a),
            rule.policy
        ),
        Verdict::TierDefault { tier } => {
            format!("denied by tier {tier}'s default action: policies applied, none allowed")
        }
        Verdict::EndOfTiers => "allowed: every tier passed, and no profile".into(),
        Verdict::ProfileRule {
            profile,
            index,
            action: a,
        } => format!(
            "{} by {dir} rule {index} ({}) of profile {profile}",
            outcome(*a),
            action(*a)
        ),
        Verdict::ProfileDefault => "denied: the endpoint's profiles matched nothing".into(),
    }
}

/// A tier's heading; ClusterNetworkPolicy's built-in tiers say where they stand.
fn tier_line(name: &str, o: Option<f64>, d: TierDefault) -> String {
    match name {
        ADMIN_TIER => "  tier admin (ClusterNetworkPolicy Admin tier: before every other tier; \
                       no rule decided: on to the next tier)\n"
            .into(),
        BASELINE_TIER => "  tier baseline (ClusterNetworkPolicy Baseline tier: after every other \
                          tier; no rule decided: on to profiles or allow)\n"
            .into(),
        _ => format!(
            "  tier {name} (order {}, default action {})\n",
            order(o),
            default_action(d)
        ),
    }
}

/// A policy's place in its tier: a ClusterNetworkPolicy's priority, another's order.
fn policy_order(id: &PolicyId, o: Option<f64>) -> String {
    match id.kind {
        k if k.is_cluster() => format!("priority {}", order(o)),
        _ => format!("order {}", order(o)),
    }
}

/// ` (from rule 1 "deny-y")`: the written rule a model rule came from, if it is another.
fn origin(o: Option<&RuleOrigin>) -> String {
    match o {
        Some(RuleOrigin {
            index,
            name: Some(n),
        }) => format!(" (from rule {index} {n:?})"),
        Some(RuleOrigin { index, name: None }) => format!(" (from rule {index})"),
        None => String::new(),
    }
}

/// The written rule behind the rule that decided a direction, as the trace recorded it.
fn deciding_origin(d: &DirectionTrace) -> Option<&RuleOrigin> {
    let Verdict::Rule { rule, .. } = &d.verdict else {
        return None;
    };
    d.tiers
        .iter()
        .flat_map(|t| &t.policies)
        .filter(|p| p.policy == rule.policy)
        .flat_map(|p| &p.rules)
        .find(|r| r.index == rule.index)
        .and_then(|r| r.origin.as_ref())
}

fn direction(out: &mut String, title: &str, d: &DirectionTrace) {
    out.push_str(&format!("{title}:\n"));
    for t in &d.tiers {
        out.push_str(&tier_line(&t.tier, t.order, t.default_action));
        for p in &t.policies {
            out.push_str(&format!(
                "    policy {} ({})\n",
                p.policy,
                policy_order(&p.policy, p.order)
            ));
            if p.rules.is_empty() {
                out.push_str("      no rules\n");
            }
            for r in &p.rules {
                let what = match &r.mismatch {
                    None => "matched".to_string(),
                    Some(m) => format!("no match: {}: {}", m.field, m.reason),
                };
                out.push_str(&format!(
                    "      rule {} {}{}: {what}\n",
                    r.index,
                    action(r.action),
                    origin(r.origin.as_ref())
                ));
            }
        }
        match &t.passed {
            Some(PassedBy::Rule(id)) => out.push_str(&format!(
                "    passed to the next tier by rule {} of {}\n",
                id.index, id.policy
            )),
            Some(PassedBy::TierDefault) => {
                out.push_str("    no rule decided: default action Pass, to the next tier\n")
            }
            None if matches!(d.verdict, Verdict::TierDefault { .. }) => {
                out.push_str("    no rule decided: default action Deny\n")
            }
            None => {}
        }
    }
    for p in &d.profiles {
        if p.missing {
            out.push_str(&format!(
                "  profile {} (listed, but it does not exist)\n",
                p.profile
            ));
            continue;
        }
        out.push_str(&format!("  profile {}\n", p.profile));
        for r in &p.rules {
            let what = match &r.mismatch {
                None => "matched".to_string(),
                Some(m) => format!("no match: {}: {}", m.field, m.reason),
            };
            out.push_str(&format!(
                "    rule {} {}: {what}\n",
                r.index,
                action(r.action)
            ));
        }
    }
    out.push_str(&format!(
        "  => {}{}\n",
        verdict(&d.verdict, d.direction),
        origin(deciding_origin(d))
    ));
}

/// The whole trace, as `policy trace` prints it.
pub fn render(t: &Trace, what: &str) -> String {
    let mut out = format!(
        "{} -> {}, {what}\n\n",
        peer(&t.source),
        peer(&t.destination)
    );
    direction(
        &mut out,
        &format!("egress from {}", peer(&t.source)),
        &t.egress,
    );
    out.push('\n');
    direction(
        &mut out,
        &format!("ingress to {}", peer(&t.destination)),
        &t.ingress,
    );
    let denied: Vec<&str> = [("egress", &t.egress), ("ingress", &t.ingress)]
        .iter()
        .filter(|(_, d)| !d.verdict.allows())
        .map(|(n, _)| *n)
        .collect();
    out.push_str(&if t.allowed {
        "\nverdict: ALLOWED\n".to_string()
    } else {
        format!("\nverdict: DENIED (by {})\n", denied.join(" and "))
    });
    out
}

/// A tier and the policies of it that apply (id, order), as `policy show` lists them.
pub type Applying = (Tier, Vec<(PolicyId, Option<f64>)>);

/// `policy show`: one direction's applying tiers and policies.
pub fn applying(out: &mut String, d: &str, tiers: &[Applying]) {
    out.push_str(&format!("{d}:\n"));
    if tiers.is_empty() {
        out.push_str("  no policy applies\n");
    }
    let mut n = 0;
    for (t, ps) in tiers {
        out.push_str(&tier_line(&t.name, t.order, t.default_action));
        for (id, o) in ps {
            n += 1;
            out.push_str(&format!("    {n}. {id} ({})\n", policy_order(id, *o)));
        }
    }
}
