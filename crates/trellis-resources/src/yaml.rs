//! Reading YAML or JSON input into JSON values, bounded so no input can exhaust memory, time or
//! the stack. Pure: no I/O.
//!
//! The limits, checked before any value is built:
//! - at most [`MAX_INPUT_BYTES`] (4 MiB) of input;
//! - collections nested at most [`MAX_DEPTH`] (64) deep;
//! - at most [`MAX_NODES`] (1 Mi) values in the whole input, counting every value an alias
//!   (`*name`) repeats, so a "billion laughs" file is refused instead of expanded;
//! - every mapping key at most once (YAML and JSON parsers keep the last silently);
//! - numbers finite (`.inf`/`.nan` have no JSON form and used to become null).
//!
//! YAML is first scanned as a stream of libyaml events (the same parser `serde_norway` uses,
//! pulled one event at a time, so a deeply nested flow collection is stopped after
//! [`MAX_DEPTH`] levels instead of being scanned whole — libyaml's flow scanning is quadratic in
//! the depth). Only then does `serde_norway` build values, through a visitor that enforces the
//! same limits again and rejects duplicate keys and non-finite numbers, naming the field.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::ResourceError;

/// Largest input read, in bytes.
pub const MAX_INPUT_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting of sequences and mappings (resources nest about six levels).
pub const MAX_DEPTH: usize = 64;
/// Most values in one input, aliases expanded (about 50 bytes of memory each once built).
pub const MAX_NODES: usize = 1 << 20;

/// The input without a leading byte order mark (U+FEFF, which some editors write first): it is
/// not content, and libyaml — its encoding preset, as `serde_norway` presets it — would count
/// it as a column and misread the indentation of the first line.
fn without_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Whether the input is JSON (an object or an array) rather than YAML.
pub fn is_json(text: &str) -> bool {
    let t = without_bom(text).trim_start();
    t.starts_with('{') || t.starts_with('[')
}

/// The documents of `text` as JSON values: one for JSON input, one per non-empty `---`
/// document for YAML, within the limits above. Errors name the document (1-based) and, where
/// there is one, the field.
pub fn parse_values(text: &str) -> Result<Vec<Value>, ResourceError> {
    if text.len() > MAX_INPUT_BYTES {
        return Err(ResourceError::field(
            "document",
            format!(
                "the input is {} bytes; at most {MAX_INPUT_BYTES} (4 MiB) are accepted",
                text.len()
            ),
        ));
    }
    let text = without_bom(text);
    let ctx = Ctx::default();
    if is_json(text) {
        let mut de = serde_json::Deserializer::from_str(text);
        let v = ctx
            .seed(0)
            .deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(|e| ctx.error(1, "JSON", e))?;
        return Ok(vec![v]);
    }
    prescan(text.as_bytes())?;
    let mut out = Vec::new();
    for (i, d) in serde_norway::Deserializer::from_str(text).enumerate() {
        let v = ctx
            .seed(0)
            .deserialize(d)
            .map_err(|e| ctx.error(i + 1, "YAML", e))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

fn limit_error(doc: usize, reason: String) -> ResourceError {
    ResourceError {
        doc: Some(doc.max(1)),
        object: None,
        field: "document".into(),
        reason,
    }
}

/// Walks the YAML event stream once, checking depth and the expanded size of every alias
/// before anything is built. A syntax error ends the scan quietly: `serde_norway` reports it
/// with its own message when it reaches it.
fn prescan(input: &[u8]) -> Result<(), ResourceError> {
    use events::Event;
    let mut events = events::Events::new(input);
    let mut doc = 0;
    let mut nodes: usize = 0;
    // Open collections: their anchor and the node count when they opened.
    let mut open: Vec<(Option<Vec<u8>>, usize)> = Vec::new();
    // Anchor → values its node holds (aliases expanded); None while the node is still open.
    let mut anchors: HashMap<Vec<u8>, Option<usize>> = HashMap::new();
    while let Some((event, mark)) = events.next() {
        let at = || format!("line {} column {}", mark.line + 1, mark.column + 1);
        let add = match event {
            Event::DocumentStart => {
                doc += 1;
                anchors.clear();
                0
            }
            Event::Scalar(anchor) => {
                if let Some(a) = anchor {
                    anchors.insert(a, Some(1));
                }
                1
            }
            Event::CollectionStart(anchor) => {
                if open.len() == MAX_DEPTH {
                    return Err(limit_error(
                        doc,
                        format!("nested deeper than {MAX_DEPTH} levels at {}", at()),
                    ));
                }
                if let Some(a) = &anchor {
                    anchors.insert(a.clone(), None);
                }
                open.push((anchor, nodes));
                1
            }
            Event::CollectionEnd => {
                if let Some((Some(a), start)) = open.pop() {
                    anchors.insert(a, Some(nodes - start));
                }
                0
            }
            Event::Alias(a) => match anchors.get(&a) {
                Some(Some(n)) => *n,
                Some(None) => {
                    return Err(limit_error(
                        doc,
                        format!(
                            "alias *{} at {} refers to a node that contains it",
                            String::from_utf8_lossy(&a),
                            at()
                        ),
                    ))
                }
                // Unknown anchor: serde_norway reports it.
                None => 0,
            },
            Event::Other => 0,
        };
        nodes = nodes.saturating_add(add);
        if nodes > MAX_NODES {
            return Err(limit_error(
                doc,
                format!(
                    "the input holds more than {MAX_NODES} values with its aliases expanded (at {})",
                    at()
                ),
            ));
        }
    }
    Ok(())
}

/// State shared by the visitor while one input is built.
#[derive(Default)]
struct Ctx {
    nodes: Cell<usize>,
    /// Where the visitor is (keys and indices from the document's root).
    path: RefCell<Vec<Segment>>,
    /// The first semantic problem found: (field, reason).
    problem: RefCell<Option<(String, String)>>,
}

enum Segment {
    Key(String),
    Index(usize),
}

impl Ctx {
    fn seed(&self, depth: usize) -> Seed<'_> {
        Seed { ctx: self, depth }
    }

    fn field(&self) -> String {
        let mut out = String::new();
        for s in self.path.borrow().iter() {
            match s {
                Segment::Key(k) if out.is_empty() => out.push_str(k),
                Segment::Key(k) => {
                    out.push('.');
                    out.push_str(k);
                }
                Segment::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        if out.is_empty() {
            "document".into()
        } else {
            out
        }
    }

    /// Records why the value at the current path is refused and aborts the parse.
    fn fail<E: de::Error>(&self, reason: String) -> E {
        let mut p = self.problem.borrow_mut();
        if p.is_none() {
            *p = Some((self.field(), reason.clone()));
        }
        E::custom(reason)
    }

    fn count<E: de::Error>(&self) -> Result<(), E> {
        self.nodes.set(self.nodes.get() + 1);
        if self.nodes.get() > MAX_NODES {
            return Err(self.fail(format!(
                "the input holds more than {MAX_NODES} values with its aliases expanded"
            )));
        }
        Ok(())
    }

    fn error(&self, doc: usize, format: &str, e: impl fmt::Display) -> ResourceError {
        let (field, reason) = self
            .problem
            .borrow_mut()
            .take()
            .unwrap_or_else(|| ("document".into(), format!("invalid {format}: {e}")));
        self.path.borrow_mut().clear();
        ResourceError {
            doc: Some(doc),
            object: None,
            field,
            reason,
        }
    }
}

/// Builds one JSON value, enforcing the limits.
struct Seed<'a> {
    ctx: &'a Ctx,
    /// Collections around this value.
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Seed<'_> {
    fn enter<E: de::Error>(&self) -> Result<(), E> {
        self.ctx.count()?;
        if self.depth >= MAX_DEPTH {
            return Err(self
                .ctx
                .fail(format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML or JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.ctx.count()?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.ctx.count()?;
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.ctx.count()?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.ctx.count()?;
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| self.ctx.fail(format!("{v} is not a finite number")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.ctx.count()?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.ctx.count()?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.ctx.count()?;
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut out = Vec::new();
        loop {
            self.ctx.path.borrow_mut().push(Segment::Index(out.len()));
            let next = seq.next_element_seed(self.ctx.seed(self.depth + 1))?;
            self.ctx.path.borrow_mut().pop();
            match next {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.ctx.path.borrow_mut().push(Segment::Key(key.clone()));
            if out.contains_key(&key) {
                return Err(self.ctx.fail(format!(
                    "duplicate key {key:?}: a key may appear once in a mapping"
                )));
            }
            let v = map.next_value_seed(self.ctx.seed(self.depth + 1))?;
            self.ctx.path.borrow_mut().pop();
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// libyaml's event stream, pulled one event at a time (the only unsafe code here: the FFI of
/// `unsafe-libyaml-norway`, the C library's Rust port that `serde_norway` itself runs on).
mod events {
    use std::marker::PhantomData;
    use std::mem::MaybeUninit;

    use unsafe_libyaml_norway as unsafe_yaml;

    pub enum Event {
        DocumentStart,
        /// A scalar, with its anchor.
        Scalar(Option<Vec<u8>>),
        /// A sequence or mapping opens, with its anchor.
        CollectionStart(Option<Vec<u8>>),
        CollectionEnd,
        /// `*name`.
        Alias(Vec<u8>),
        Other,
    }

    pub struct Mark {
        pub line: u64,
        pub column: u64,
    }

    pub struct Events<'input> {
        /// Boxed: libyaml keeps a pointer to the parser inside the parser, so it never moves.
        parser: Box<MaybeUninit<unsafe_yaml::yaml_parser_t>>,
        done: bool,
        input: PhantomData<&'input [u8]>,
    }

    impl<'input> Events<'input> {
        pub fn new(input: &'input [u8]) -> Events<'input> {
            let mut parser = Box::new(MaybeUninit::<unsafe_yaml::yaml_parser_t>::uninit());
            let p = parser.as_mut_ptr();
            // SAFETY: `p` points to memory that lives (boxed, unmoved) as long as `Events`;
            // `yaml_parser_initialize` fully initialises it before any other call. The input
            // outlives the parser (the `'input` borrow).
            unsafe {
                if unsafe_yaml::yaml_parser_initialize(p).fail {
                    panic!("libyaml could not allocate its parser");
                }
                unsafe_yaml::yaml_parser_set_encoding(p, unsafe_yaml::YAML_UTF8_ENCODING);
                unsafe_yaml::yaml_parser_set_input_string(p, input.as_ptr(), input.len() as u64);
            }
            Events {
                parser,
                done: false,
                input: PhantomData,
            }
        }

        /// The next event, or `None` at the end of the stream or after a syntax error (the
        /// parser is not called again once it failed).
        pub fn next(&mut self) -> Option<(Event, Mark)> {
            if self.done {
                return None;
            }
            let mut event = MaybeUninit::<unsafe_yaml::yaml_event_t>::uninit();
            // SAFETY: the parser was initialised in `new`; a successful `yaml_parser_parse`
            // initialises `event`, whose anchor pointers are NUL-terminated strings owned by
            // the event until `yaml_event_delete`, after which nothing refers to them.
            unsafe {
                let p = self.parser.as_mut_ptr();
                if unsafe_yaml::yaml_parser_parse(p, event.as_mut_ptr()).fail {
                    self.done = true;
                    return None;
                }
                let e = event.as_mut_ptr();
                let anchor = |ptr: *const u8| {
                    (!ptr.is_null())
                        .then(|| std::ffi::CStr::from_ptr(ptr.cast()).to_bytes().to_vec())
                };
                let out = match (*e).type_ {
                    unsafe_yaml::YAML_STREAM_END_EVENT => {
                        self.done = true;
                        Event::Other
                    }
                    unsafe_yaml::YAML_DOCUMENT_START_EVENT => Event::DocumentStart,
                    unsafe_yaml::YAML_ALIAS_EVENT => {
                        Event::Alias(anchor((*e).data.alias.anchor).unwrap_or_default())
                    }
                    unsafe_yaml::YAML_SCALAR_EVENT => {
                        Event::Scalar(anchor((*e).data.scalar.anchor))
                    }
                    unsafe_yaml::YAML_SEQUENCE_START_EVENT => {
                        Event::CollectionStart(anchor((*e).data.sequence_start.anchor))
                    }
                    unsafe_yaml::YAML_MAPPING_START_EVENT => {
                        Event::CollectionStart(anchor((*e).data.mapping_start.anchor))
                    }
                    unsafe_yaml::YAML_SEQUENCE_END_EVENT | unsafe_yaml::YAML_MAPPING_END_EVENT => {
                        Event::CollectionEnd
                    }
                    _ => Event::Other,
                };
                let mark = Mark {
                    line: (*e).start_mark.line,
                    column: (*e).start_mark.column,
                };
                unsafe_yaml::yaml_event_delete(e);
                Some((out, mark))
            }
        }
    }

    impl Drop for Events<'_> {
        fn drop(&mut self) {
            // SAFETY: initialised in `new` and deleted once, here.
            unsafe { unsafe_yaml::yaml_parser_delete(self.parser.as_mut_ptr()) }
        }
    }
}

#[cfg(test)]
mod tests;
