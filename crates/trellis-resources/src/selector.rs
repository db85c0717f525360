//! Calico's label selector language (the subset resources use): `all()`, `has(k)`, `!has(k)`,
//! `k == 'v'`, `k != 'v'`, `k in {'a','b'}`, `k not in {...}`, `!expr`, `&&`, `||`, parentheses.
//! Pure: parse once, then evaluate against label maps.

use std::collections::BTreeMap;
use std::fmt;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Not(Box<Selector>),
    And(Box<Selector>, Box<Selector>),
    Or(Box<Selector>, Box<Selector>),
}

impl Selector {
    /// Parses `src`; the error says where and what was expected.
    pub fn parse(src: &str) -> Result<Selector, String> {
        let mut p = Parser {
            s: src.as_bytes(),
            i: 0,
        };
        p.ws();
        if p.i == p.s.len() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(p.err("end of selector"));
        }
        Ok(sel)
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Selector::All => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => labels.get(k) == Some(v),
            Selector::Ne(k, v) => labels.get(k) != Some(v),
            Selector::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.contains(l)),
            Selector::Not(s) => !s.matches(labels),
            Selector::And(a, b) => a.matches(labels) && b.matches(labels),
            Selector::Or(a, b) => a.matches(labels) || b.matches(labels),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| {
            vs.iter()
                .map(|v| format!("'{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == '{v}'"),
            Selector::Ne(k, v) => write!(f, "{k} != '{v}'"),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Selector::Not(s) => write!(f, "!({s})"),
            Selector::And(a, b) => write!(f, "({a}) && ({b})"),
            Selector::Or(a, b) => write!(f, "({a}) || ({b})"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, want: &str) -> String {
        let rest = String::from_utf8_lossy(&self.s[self.i.min(self.s.len())..]);
        format!(
            "expected {want} at offset {} (near {:?})",
            self.i,
            rest.chars().take(16).collect::<String>()
        )
    }
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }
    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(tok.as_bytes()) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }
    fn or(&mut self) -> Result<Selector, String> {
        let mut left = self.and()?;
        while self.eat("||") {
            left = Selector::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }
    fn and(&mut self) -> Result<Selector, String> {
        let mut left = self.unary()?;
        while self.eat("&&") {
            left = Selector::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }
    fn unary(&mut self) -> Result<Selector, String> {
        if self.eat("!") {
            return Ok(Selector::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let inner = self.or()?;
            if !self.eat(")") {
                return Err(self.err("')'"));
            }
            return Ok(inner);
        }
        if self.eat("all()") {
            return Ok(Selector::All);
        }
        if self.eat("has(") {
            let k = self.ident()?;
            if !self.eat(")") {
                return Err(self.err("')'"));
            }
            return Ok(Selector::Has(k));
        }
        let k = self.ident()?;
        if self.eat("==") {
            return Ok(Selector::Eq(k, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(k, self.string()?));
        }
        if self.eat("not in") {
            return Ok(Selector::NotIn(k, self.set()?));
        }
        if self.eat("in") {
            return Ok(Selector::In(k, self.set()?));
        }
        Err(self.err("==, !=, in or not in"))
    }
    fn ident(&mut self) -> Result<String, String> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len()
            && (self.s[self.i].is_ascii_alphanumeric() || b"_-./".contains(&self.s[self.i]))
        {
            self.i += 1;
        }
        if start == self.i {
            return Err(self.err("a label key"));
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn string(&mut self) -> Result<String, String> {
        self.ws();
        let Some(&q) = self.s.get(self.i).filter(|c| **c == b'\'' || **c == b'"') else {
            return Err(self.err("a quoted value"));
        };
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i == self.s.len() {
            return Err(self.err("a closing quote"));
        }
        let v = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(v)
    }
    fn set(&mut self) -> Result<Vec<String>, String> {
        if !self.eat("{") {
            return Err(self.err("'{'"));
        }
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.string()?);
            if self.eat("}") {
                return Ok(out);
            }
            if !self.eat(",") {
                return Err(self.err("',' or '}'"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn evaluates_calico_examples() {
        let l = labels(&[("zone", "a"), ("role", "worker")]);
        for (src, want) in [
            ("all()", true),
            ("", true),
            ("zone == 'a'", true),
            ("zone != 'a'", false),
            ("has(role) && zone in {'a', 'b'}", true),
            ("!has(gpu)", true),
            ("zone not in {'a'} || role == \"worker\"", true),
            ("(zone == 'b' || zone == 'c') && has(role)", false),
        ] {
            assert_eq!(Selector::parse(src).unwrap().matches(&l), want, "{src}");
        }
    }

    #[test]
    fn errors_say_where() {
        let e = Selector::parse("zone = 'a'").unwrap_err();
        assert!(e.contains("offset"), "{e}");
        assert!(Selector::parse("zone == 'a").is_err());
        assert!(Selector::parse("has(zone").is_err());
        assert!(Selector::parse("zone == 'a' extra").is_err());
    }

    #[test]
    fn display_round_trips() {
        let s = Selector::parse("!has(a) && (b in {'x','y'} || c != 'z')").unwrap();
        assert_eq!(Selector::parse(&s.to_string()).unwrap(), s);
    }
}
