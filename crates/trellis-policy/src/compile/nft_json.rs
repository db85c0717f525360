//! The ruleset and operations as nftables JSON (pure): batches for `nft -j -f -`, and each
//! object in the form `nft -j -n list` prints it (the same form: what is loaded lists back
//! unchanged, which `drift` relies on). Numbers stay numbers (`-n`): no service, protocol or
//! ICMP type names, which would depend on the host's /etc files and nft's tables.

use std::net::IpAddr;

use serde_json::{json, Map, Value};

use super::intervals::prefix_len;
use super::ruleset::{
    Chain, Element, Expr, NftOp, Op, Ops, Rule, Ruleset, Set, SetKind, Stmt, Verdict, VerdictMap,
    FAMILY, TABLE,
};
use super::FLOW_LOG_SNAPLEN;

fn addr_value(first: &IpAddr, last: &IpAddr) -> Value {
    if first == last {
        return json!(first.to_string());
    }
    match prefix_len(first, last) {
        Some(len) => json!({"prefix": {"addr": first.to_string(), "len": len}}),
        None => json!({"range": [first.to_string(), last.to_string()]}),
    }
}

pub(crate) fn element_value(e: &Element) -> Value {
    match e {
        Element::Addr { first, last } => addr_value(first, last),
        Element::NamedPort { addr, proto, port } => {
            json!({"concat": [addr.to_string(), proto, port]})
        }
    }
}

fn expr_value(e: &Expr) -> Value {
    match e {
        Expr::Meta(k) => json!({"meta": {"key": k}}),
        Expr::Payload(p, f) => json!({"payload": {"protocol": p, "field": f}}),
        Expr::CtState => json!({"ct": {"key": "state"}}),
        Expr::MarkMasked(m) => json!({"&": [{"meta": {"key": "mark"}}, m]}),
        Expr::Concat(v) => json!({"concat": v.iter().map(expr_value).collect::<Vec<_>>()}),
        Expr::Num(n) => json!(n),
        Expr::Str(s) => json!(s),
        Expr::Addr { first, last } => addr_value(first, last),
        Expr::Range(a, b) => json!({"range": [a, b]}),
        Expr::AnonSet(v) => json!({"set": v.iter().map(expr_value).collect::<Vec<_>>()}),
        Expr::SetRef(n) => json!(format!("@{n}")),
        Expr::Flags(v) => json!(v),
    }
}

fn verdict_value(v: &Verdict) -> Value {
    match v {
        Verdict::Accept => json!({"accept": null}),
        Verdict::Drop => json!({"drop": null}),
        Verdict::Return => json!({"return": null}),
        Verdict::Jump(c) => json!({"jump": {"target": c}}),
        Verdict::Goto(c) => json!({"goto": {"target": c}}),
    }
}

fn mark_value(op: &str, m: u32) -> Value {
    json!({"mangle": {"key": {"meta": {"key": "mark"}},
                      "value": {op: [{"meta": {"key": "mark"}}, m]}}})
}

fn stmt_value(s: &Stmt) -> Value {
    match s {
        Stmt::Match { left, op, right } => {
            let op = match op {
                Op::Eq => "==",
                Op::Ne => "!=",
                Op::In => "in",
            };
            json!({"match": {"op": op, "left": expr_value(left), "right": expr_value(right)}})
        }
        Stmt::Counter => json!({ "counter": null }),
        Stmt::Log(p) => json!({"log": {"prefix": p}}),
        Stmt::FlowLog { group, prefix } => {
            json!({"log": {"prefix": prefix, "group": group, "snaplen": FLOW_LOG_SNAPLEN}})
        }
        Stmt::MarkAnd(m) => mark_value("&", *m),
        Stmt::MarkOr(m) => mark_value("|", *m),
        Stmt::Vmap { key, map } => {
            json!({"vmap": {"key": expr_value(key), "data": format!("@{map}")}})
        }
        Stmt::Verdict(v) => verdict_value(v),
    }
}

/// `{"family", "table", ...fields}`: an object of our table.
fn obj(fields: Value) -> Value {
    let mut m = Map::new();
    m.insert("family".into(), json!(FAMILY));
    m.insert("table".into(), json!(TABLE));
    if let Value::Object(f) = fields {
        m.extend(f);
    }
    Value::Object(m)
}

fn named(name: &str) -> Value {
    obj(json!({ "name": name }))
}

/// A rule's fields (without family/table): `chain`, `expr` and `comment`.
pub(crate) fn rule_fields(chain: &str, r: &Rule) -> Value {
    let mut v = json!({
        "chain": chain,
        "expr": r.stmts.iter().map(stmt_value).collect::<Vec<_>>(),
    });
    if let Some(c) = &r.comment {
        v["comment"] = json!(c);
    }
    v
}

/// A set's fields as listed (`elem` only when it has elements).
pub(crate) fn set_fields(name: &str, s: &Set) -> Value {
    let mut v = match s.kind {
        SetKind::Addresses(f) => json!({"name": name, "type": f.addr_type()}),
        SetKind::Networks(f) => {
            json!({"name": name, "type": f.addr_type(), "flags": ["interval"]})
        }
        SetKind::NamedPorts(f) => {
            json!({"name": name, "type": [f.addr_type(), "inet_proto", "inet_service"]})
        }
    };
    if !s.elements.is_empty() {
        v["elem"] = json!(s.elements.iter().map(element_value).collect::<Vec<_>>());
    }
    v
}

fn map_elem(key: &str, chain: &str) -> Value {
    json!([key, {"goto": {"target": chain}}])
}

/// A verdict map's fields as listed.
pub(crate) fn map_fields(name: &str, m: &VerdictMap) -> Value {
    let mut v = json!({"name": name, "type": "ifname", "map": "verdict"});
    if !m.elements.is_empty() {
        let elems: Vec<Value> = m.elements.iter().map(|(k, c)| map_elem(k, c)).collect();
        v["elem"] = json!(elems);
    }
    v
}

/// A chain's fields as listed.
pub(crate) fn chain_fields(name: &str, c: &Chain) -> Value {
    if c.base {
        json!({"name": name, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"})
    } else {
        json!({ "name": name })
    }
}

impl Ruleset {
    /// The batch that replaces the whole table with this ruleset, atomically: add the table
    /// (so the delete cannot fail), delete it, then create everything.
    pub fn to_nft_json(&self) -> Value {
        let mut cmds = Vec::new();
        self.push_replace(&mut cmds);
        json!({ "nftables": cmds })
    }

    fn push_replace(&self, cmds: &mut Vec<Value>) {
        let table = json!({"family": FAMILY, "name": TABLE});
        cmds.push(json!({"add": {"table": table}}));
        cmds.push(json!({"delete": {"table": table}}));
        cmds.push(json!({"add": {"table": table}}));
        for (n, s) in &self.sets {
            cmds.push(json!({"add": {"set": obj(set_fields(n, s))}}));
        }
        // Chains before the maps and rules that refer to them.
        for (n, c) in &self.chains {
            cmds.push(json!({"add": {"chain": obj(chain_fields(n, c))}}));
        }
        for (n, m) in &self.maps {
            cmds.push(json!({"add": {"map": obj(map_fields(n, m))}}));
        }
        for (n, c) in &self.chains {
            for r in &c.rules {
                cmds.push(json!({"add": {"rule": obj(rule_fields(n, r))}}));
            }
        }
    }
}

impl Ops {
    /// The batch as one nft JSON document (`{"nftables": [...]}`), in order.
    pub fn to_nft_json(&self) -> Value {
        let mut cmds = Vec::new();
        for op in &self.ops {
            op_json(op, &mut cmds);
        }
        json!({ "nftables": cmds })
    }
}

fn elements(set: &str, elems: Vec<Value>) -> Value {
    obj(json!({"name": set, "elem": elems}))
}

fn op_json(op: &NftOp, cmds: &mut Vec<Value>) {
    let cmd = match op {
        NftOp::Replace(r) => return r.push_replace(cmds),
        NftOp::AddSet { name, kind } => {
            let s = Set {
                kind: *kind,
                elements: Default::default(),
            };
            json!({"add": {"set": obj(set_fields(name, &s))}})
        }
        NftOp::DeleteSet(n) => json!({"delete": {"set": named(n)}}),
        NftOp::AddElements { set, elements: e } => {
            json!({"add": {"element": elements(set, e.iter().map(element_value).collect())}})
        }
        NftOp::DeleteElements { set, elements: e } => {
            json!({"delete": {"element": elements(set, e.iter().map(element_value).collect())}})
        }
        NftOp::AddChain(n) => json!({"add": {"chain": named(n)}}),
        NftOp::FlushChain(n) => json!({"flush": {"chain": named(n)}}),
        NftOp::DeleteChain(n) => json!({"delete": {"chain": named(n)}}),
        NftOp::AddRule { chain, rule } => json!({"add": {"rule": obj(rule_fields(chain, rule))}}),
        NftOp::AddMapElements { map, elements: e } => {
            let elems = e.iter().map(|(k, c)| map_elem(k, c)).collect();
            json!({"add": {"element": elements(map, elems)}})
        }
        NftOp::DeleteMapElements { map, keys } => {
            json!({"delete": {"element": elements(map, keys.iter().map(|k| json!(k)).collect())}})
        }
    };
    cmds.push(cmd);
}
