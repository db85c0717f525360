//! Plain data exchanged with a datastore.

/// A stored value and its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the transaction that created the key.
    pub create_revision: i64,
    /// Revision of the last transaction that changed it: the compare-and-swap token.
    pub mod_revision: i64,
}

/// The result of a prefix read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub items: Vec<KeyValue>,
    /// Store revision the listing reflects; watch from `revision + 1` to follow on.
    pub revision: i64,
}

/// A condition a transaction requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// The key does not exist.
    Absent(String),
    /// The key exists with exactly this `mod_revision` (unchanged since read).
    ModRevision(String, i64),
    /// No key under the prefix was created or changed after `revision` (every key there has
    /// `mod_revision <= revision`): what a decision that read a whole listing (e.g. "no pool
    /// overlaps this one") needs. Deletions are not seen; add `ModRevision` for each key read.
    NoneNewer { prefix: String, revision: i64 },
    /// The key exists, whatever its value (a Node still registered, say).
    Exists(String),
}

/// A change a transaction makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    Put(String, Vec<u8>),
    Delete(String),
}

/// Whether a transaction applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    Committed {
        revision: i64,
    },
    /// A precondition failed; nothing changed. Re-read and retry.
    Conflict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    pub key: String,
    /// The new value (empty for deletes).
    pub value: Vec<u8>,
    pub revision: i64,
}
