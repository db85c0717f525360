//! Calico's label selector language: `all()`, `global()`, `has(k)`, `k == 'v'`, `k != 'v'`,
//! `k in {'a','b'}`, `k not in {...}`, `k contains 'v'`, `k starts with 'v'`,
//! `k ends with 'v'`, `!expr`, `&&`, `||`, parentheses. Pure: parse once, then evaluate
//! against label maps.
//!
//! Selectors come from outside (resources, and later policies), so parsing is bounded: at most
//! [`MAX_SELECTOR_LEN`] characters (Calico's CRD limit), parentheses nested at most
//! [`MAX_SELECTOR_DEPTH`] deep, labels of at most [`MAX_LABEL_LEN`] bytes (Calico's tokenizer
//! limit). `&&`/`||` chains are flat lists and repeated `!` fold into one, so the only recursion
//! in the parser is through parentheses; evaluation uses an explicit stack. Whatever a stored
//! selector holds, parsing or evaluating it cannot overflow the stack.

use std::collections::BTreeMap;
use std::fmt;

/// Longest selector accepted, in characters (Calico's `+kubebuilder:validation:MaxLength=1024`
/// on every selector field).
pub const MAX_SELECTOR_LEN: usize = 1024;
/// Deepest nesting of parentheses accepted. Real selectors nest two or three levels; 64 leaves
/// room for generated ones while keeping the parser's recursion small.
pub const MAX_SELECTOR_DEPTH: usize = 64;
/// Longest label key accepted, in bytes (Calico's tokenizer `MaxLabelLength`).
pub const MAX_LABEL_LEN: usize = 512;

/// A parsed selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    All,
    /// Calico's `global()` (matches every labelled object; namespace selectors use it to mean
    /// "not namespaced").
    Global,
    Has(String),
    Eq(String, String),
    /// True when the label is absent or has another value (Calico's semantics).
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Contains(String, String),
    StartsWith(String, String),
    EndsWith(String, String),
    Not(Box<Selector>),
    /// All of these (two or more).
    And(Vec<Selector>),
    /// Any of these (two or more).
    Or(Vec<Selector>),
}

/// Why a selector was refused; `offset` is the byte offset into the selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("is {len} characters long; selectors may be at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("parentheses nest deeper than {max} at offset {offset}")]
    TooDeep { offset: usize, max: usize },
    #[error("label at offset {offset} is {len} bytes long; labels may be at most {max}")]
    LabelTooLong {
        offset: usize,
        len: usize,
        max: usize,
    },
    #[error("expected {expected} at offset {offset} (near {near:?})")]
    Syntax {
        offset: usize,
        expected: &'static str,
        near: String,
    },
}

impl Selector {
    /// Parses `src` (empty means `all()`); the error says where and what was expected.
    pub fn parse(src: &str) -> Result<Selector, SelectorError> {
        let len = src.chars().count();
        if len > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong {
                len,
                max: MAX_SELECTOR_LEN,
            });
        }
        let mut p = Parser {
            s: src.as_bytes(),
            i: 0,
            depth: 0,
        };
        p.ws();
        if p.i == p.s.len() {
            return Ok(Selector::All);
        }
        let sel = p.or()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(p.err("&&, || or the end of the selector"));
        }
        Ok(sel)
    }

    fn leaf(&self, labels: &BTreeMap<String, String>) -> Option<bool> {
        let get = |k: &String| labels.get(k);
        Some(match self {
            Selector::All | Selector::Global => true,
            Selector::Has(k) => labels.contains_key(k),
            Selector::Eq(k, v) => get(k) == Some(v),
            Selector::Ne(k, v) => get(k) != Some(v),
            Selector::In(k, vs) => get(k).is_some_and(|l| vs.contains(l)),
            Selector::NotIn(k, vs) => !get(k).is_some_and(|l| vs.contains(l)),
            Selector::Contains(k, v) => get(k).is_some_and(|l| l.contains(v.as_str())),
            Selector::StartsWith(k, v) => get(k).is_some_and(|l| l.starts_with(v.as_str())),
            Selector::EndsWith(k, v) => get(k).is_some_and(|l| l.ends_with(v.as_str())),
            Selector::Not(_) | Selector::And(_) | Selector::Or(_) => return None,
        })
    }

    /// Whether `labels` match. Iterative (an explicit stack), short-circuiting like Calico.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        enum Task<'a> {
            Eval(&'a Selector),
            Negate,
            /// The rest of an `&&` (true) or `||` (false) list: continue while the result
            /// equals the flag.
            Rest(&'a [Selector], bool),
        }
        let mut stack = vec![Task::Eval(self)];
        let mut result = true;
        while let Some(task) = stack.pop() {
            match task {
                Task::Eval(s) => match s {
                    Selector::Not(inner) => {
                        stack.push(Task::Negate);
                        stack.push(Task::Eval(inner));
                    }
                    Selector::And(list) => {
                        result = true;
                        stack.push(Task::Rest(list, true));
                    }
                    Selector::Or(list) => {
                        result = false;
                        stack.push(Task::Rest(list, false));
                    }
                    leaf => result = leaf.leaf(labels).expect("leaf"),
                },
                Task::Negate => result = !result,
                Task::Rest(list, and) => {
                    if result == and {
                        if let Some((first, rest)) = list.split_first() {
                            stack.push(Task::Rest(rest, and));
                            stack.push(Task::Eval(first));
                        }
                    }
                }
            }
        }
        result
    }
}

fn quoted(v: &str) -> String {
    if v.contains('\'') {
        format!("\"{v}\"")
    } else {
        format!("'{v}'")
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |vs: &[String]| vs.iter().map(|v| quoted(v)).collect::<Vec<_>>().join(", ");
        // Parentheses only where precedence needs them (around `&&`/`||` lists).
        let term = |x: &Selector| match x {
            Selector::And(_) | Selector::Or(_) => format!("({x})"),
            _ => x.to_string(),
        };
        let join = |f: &mut fmt::Formatter<'_>, xs: &[Selector], op: &str| {
            let terms: Vec<String> = xs.iter().map(term).collect();
            f.write_str(&terms.join(op))
        };
        match self {
            Selector::All => write!(f, "all()"),
            Selector::Global => write!(f, "global()"),
            Selector::Has(k) => write!(f, "has({k})"),
            Selector::Eq(k, v) => write!(f, "{k} == {}", quoted(v)),
            Selector::Ne(k, v) => write!(f, "{k} != {}", quoted(v)),
            Selector::In(k, vs) => write!(f, "{k} in {{{}}}", list(vs)),
            Selector::NotIn(k, vs) => write!(f, "{k} not in {{{}}}", list(vs)),
            Selector::Contains(k, v) => write!(f, "{k} contains {}", quoted(v)),
            Selector::StartsWith(k, v) => write!(f, "{k} starts with {}", quoted(v)),
            Selector::EndsWith(k, v) => write!(f, "{k} ends with {}", quoted(v)),
            Selector::Not(s) => write!(f, "!{}", term(s)),
            Selector::And(xs) => join(f, xs, " && "),
            Selector::Or(xs) => join(f, xs, " || "),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    /// Open parentheses around the current position.
    depth: usize,
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"_-./".contains(&c)
}

impl Parser<'_> {
    fn err(&self, expected: &'static str) -> SelectorError {
        let rest = String::from_utf8_lossy(&self.s[self.i.min(self.s.len())..]);
        SelectorError::Syntax {
            offset: self.i,
            expected,
            near: rest.chars().take(16).collect(),
        }
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
    /// Eats a keyword (words separated by whitespace, e.g. `starts with`) only when a word
    /// boundary follows it, so a label `into` is not the operator `in`.
    fn keyword(&mut self, words: &[&str]) -> bool {
        let start = self.i;
        for w in words {
            if !self.eat(w) {
                self.i = start;
                return false;
            }
        }
        if self.s.get(self.i).is_some_and(|c| ident_char(*c)) {
            self.i = start;
            return false;
        }
        true
    }
    /// Eats `name(` `)` with optional blanks inside, as Calico's tokenizer does.
    fn call(&mut self, name: &str) -> Result<bool, SelectorError> {
        let start = self.i;
        if !self.eat(name) || !self.eat("(") {
            self.i = start;
            return Ok(false);
        }
        if !self.eat(")") {
            return Err(self.err("')'"));
        }
        Ok(true)
    }
    fn or(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.and()?];
        while self.eat("||") {
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one")
        } else {
            Selector::Or(terms)
        })
    }
    fn and(&mut self) -> Result<Selector, SelectorError> {
        let mut terms = vec![self.unary()?];
        while self.eat("&&") {
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.pop().expect("one")
        } else {
            Selector::And(terms)
        })
    }
    fn unary(&mut self) -> Result<Selector, SelectorError> {
        // Repeated negations fold into one (Calico's parser does the same), without recursion.
        let mut negated = false;
        loop {
            self.ws();
            if self.s[self.i..].starts_with(b"!") && !self.s[self.i..].starts_with(b"!=") {
                self.i += 1;
                negated = !negated;
            } else {
                break;
            }
        }
        let sel = self.operand()?;
        Ok(if negated {
            match sel {
                Selector::Not(inner) => *inner,
                other => Selector::Not(Box::new(other)),
            }
        } else {
            sel
        })
    }
    fn operand(&mut self) -> Result<Selector, SelectorError> {
        self.ws();
        let open = self.i;
        if self.eat("(") {
            if self.depth == MAX_SELECTOR_DEPTH {
                return Err(SelectorError::TooDeep {
                    offset: open,
                    max: MAX_SELECTOR_DEPTH,
                });
            }
            self.depth += 1;
            let inner = self.or()?;
            self.depth -= 1;
            if !self.eat(")") {
                return Err(self.err("')'"));
            }
            return Ok(inner);
        }
        if self.call("all")? {
            return Ok(Selector::All);
        }
        if self.call("global")? {
            return Ok(Selector::Global);
        }
        let start = self.i;
        if self.eat("has") && self.eat("(") {
            let k = self.ident()?;
            if !self.eat(")") {
                return Err(self.err("')'"));
            }
            return Ok(Selector::Has(k));
        }
        self.i = start;
        let k = self.ident()?;
        if self.eat("==") {
            return Ok(Selector::Eq(k, self.string()?));
        }
        if self.eat("!=") {
            return Ok(Selector::Ne(k, self.string()?));
        }
        if self.keyword(&["contains"]) {
            return Ok(Selector::Contains(k, self.string()?));
        }
        if self.keyword(&["starts", "with"]) {
            return Ok(Selector::StartsWith(k, self.string()?));
        }
        if self.keyword(&["ends", "with"]) {
            return Ok(Selector::EndsWith(k, self.string()?));
        }
        if self.keyword(&["not", "in"]) {
            return Ok(Selector::NotIn(k, self.set()?));
        }
        if self.keyword(&["in"]) {
            return Ok(Selector::In(k, self.set()?));
        }
        Err(self.err(
            "an operator (==, !=, in, not in, contains, starts with, ends with) after the label",
        ))
    }
    fn ident(&mut self) -> Result<String, SelectorError> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && ident_char(self.s[self.i]) {
            self.i += 1;
        }
        if start == self.i {
            return Err(self.err("a label key"));
        }
        if self.i - start > MAX_LABEL_LEN {
            return Err(SelectorError::LabelTooLong {
                offset: start,
                len: self.i - start,
                max: MAX_LABEL_LEN,
            });
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn string(&mut self) -> Result<String, SelectorError> {
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
    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
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
mod tests;
