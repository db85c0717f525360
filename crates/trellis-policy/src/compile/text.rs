//! The ruleset in nft's text syntax (pure), as `nft list table` would print it with `-n`:
//! what golden files hold and what a reviewer reads. Names are quoted where nft needs it.

use std::fmt::{self, Display, Formatter, Write};

use super::intervals::prefix_len;
use super::ruleset::{Element, Expr, Op, Rule, Ruleset, SetKind, Stmt, Verdict, FAMILY, TABLE};
use super::FLOW_LOG_SNAPLEN;

fn addr(first: &std::net::IpAddr, last: &std::net::IpAddr) -> String {
    if first == last {
        first.to_string()
    } else if let Some(len) = prefix_len(first, last) {
        format!("{first}/{len}")
    } else {
        format!("{first}-{last}")
    }
}

fn expr(e: &Expr) -> String {
    match e {
        Expr::Meta(k @ ("iifname" | "oifname")) => k.to_string(),
        Expr::Meta(k) => format!("meta {k}"),
        Expr::Payload(p, f) => format!("{p} {f}"),
        Expr::CtState => "ct state".into(),
        Expr::MarkMasked(m) => format!("meta mark & {m:#010x}"),
        Expr::Concat(v) => v.iter().map(expr).collect::<Vec<_>>().join(" . "),
        Expr::Num(n) => n.to_string(),
        Expr::Str(s) => format!("{s:?}"),
        Expr::Addr { first, last } => addr(first, last),
        Expr::Range(a, b) => format!("{a}-{b}"),
        Expr::AnonSet(v) => format!(
            "{{ {} }}",
            v.iter().map(expr).collect::<Vec<_>>().join(", ")
        ),
        Expr::SetRef(n) => format!("@{n}"),
        Expr::Flags(v) => v
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn stmt(s: &Stmt) -> String {
    match s {
        Stmt::Match {
            left: Expr::CtState,
            right,
            ..
        } => format!("ct state {}", ct_states(right)),
        Stmt::Match { left, op, right } => match op {
            Op::Ne => format!("{} != {}", expr(left), expr(right)),
            Op::Eq | Op::In => format!("{} {}", expr(left), expr(right)),
        },
        Stmt::Counter => "counter".into(),
        Stmt::Log(p) => format!("log prefix {p:?}"),
        Stmt::FlowLog { group, prefix } => {
            format!("log prefix {prefix:?} group {group} snaplen {FLOW_LOG_SNAPLEN}")
        }
        Stmt::MarkAnd(m) => format!("meta mark set meta mark & {m:#010x}"),
        Stmt::MarkOr(m) => format!("meta mark set meta mark | {m:#010x}"),
        Stmt::Vmap { key, map } => format!("{} vmap @{map}", expr(key)),
        Stmt::Verdict(v) => match v {
            Verdict::Accept => "accept".into(),
            Verdict::Drop => "drop".into(),
            Verdict::Return => "return".into(),
            Verdict::Jump(c) => format!("jump {c}"),
            Verdict::Goto(c) => format!("goto {c}"),
        },
    }
}

fn ct_states(e: &Expr) -> String {
    let name = |v: &u64| match v {
        1 => "invalid".to_string(),
        2 => "established".to_string(),
        4 => "related".to_string(),
        8 => "new".to_string(),
        v => v.to_string(),
    };
    match e {
        Expr::Num(v) => name(v),
        Expr::Flags(v) => v.iter().map(name).collect::<Vec<_>>().join(","),
        other => expr(other),
    }
}

/// One rule as a line of nft syntax.
pub fn rule_text(r: &Rule) -> String {
    let mut line = r.stmts.iter().map(stmt).collect::<Vec<_>>().join(" ");
    if let Some(c) = &r.comment {
        let _ = write!(line, " comment {c:?}");
    }
    line
}

fn element(e: &Element) -> String {
    match e {
        Element::Addr { first, last } => addr(first, last),
        Element::NamedPort { addr, proto, port } => format!("{addr} . {proto} . {port}"),
    }
}

impl Display for Ruleset {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "table {FAMILY} {TABLE} {{")?;
        for (name, s) in &self.sets {
            let (ty, flags) = match s.kind {
                SetKind::Addresses(fam) => (fam.addr_type().to_string(), ""),
                SetKind::Networks(fam) => (fam.addr_type().to_string(), "\n\t\tflags interval"),
                SetKind::NamedPorts(fam) => (
                    format!("{} . inet_proto . inet_service", fam.addr_type()),
                    "",
                ),
            };
            writeln!(f, "\tset {name} {{\n\t\ttype {ty}{flags}")?;
            if !s.elements.is_empty() {
                let elems: Vec<String> = s.elements.iter().map(element).collect();
                writeln!(f, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "))?;
            }
            writeln!(f, "\t}}\n")?;
        }
        for (name, m) in &self.maps {
            writeln!(f, "\tmap {name} {{\n\t\ttype ifname : verdict")?;
            if !m.elements.is_empty() {
                let elems: Vec<String> = m
                    .elements
                    .iter()
                    .map(|(k, c)| format!("{k:?} : goto {c}"))
                    .collect();
                writeln!(f, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "))?;
            }
            writeln!(f, "\t}}\n")?;
        }
        for (n, (name, c)) in self.chains.iter().enumerate() {
            if n > 0 {
                writeln!(f)?;
            }
            writeln!(f, "\tchain {name} {{")?;
            if c.base {
                writeln!(
                    f,
                    "\t\ttype filter hook forward priority filter; policy accept;"
                )?;
            }
            for r in &c.rules {
                writeln!(f, "\t\t{}", rule_text(r))?;
            }
            writeln!(f, "\t}}")?;
        }
        writeln!(f, "}}")
    }
}
