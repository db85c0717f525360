//! Incremental translation (pure, no I/O): stored objects, one key at a time, into the
//! [`Change`]s the incremental engine takes. The agent's applier feeds it every policy-relevant
//! key whose revision moved; the cost of a change is the change, never a translation of the
//! whole cluster.
//!
//! After any sequence of updates, an engine fed these changes holds the table of
//! `compile(translate(current objects))` (a property test checks it). The one cross-object
//! rule of [`crate::translate`] is kept here: a policy whose tier does not exist is left out
//! (reported against its key) and comes in when the tier appears; deleting a tier takes its
//! policies out again. An object that does not translate is left out and reported; a later
//! valid version clears the report.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use trellis_resources::Resource;

use crate::compile::Change;
use crate::model::{builtin_cluster_tier, Policy, PolicyId, DEFAULT_TIER};
use crate::translate::{item, Item, TranslateError};

/// What an object is in the model (one per key).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Id {
    Tier(String),
    Namespace(String),
    ServiceAccount(String, String),
    NetworkSet(Option<String>, String),
    Profile(String),
    Endpoint(String, String),
    Policy(PolicyId),
}

impl Id {
    fn of(i: &Item) -> Id {
        match i {
            Item::Tier(t) => Id::Tier(t.name.clone()),
            Item::Namespace { name, .. } => Id::Namespace(name.clone()),
            Item::ServiceAccount {
                namespace, name, ..
            } => Id::ServiceAccount(namespace.clone(), name.clone()),
            Item::NetworkSet(s) => Id::NetworkSet(s.namespace.clone(), s.name.clone()),
            Item::Profile(p) => Id::Profile(p.name.clone()),
            Item::Endpoint(e) => Id::Endpoint(e.namespace.clone(), e.name.clone()),
            Item::Policy(p) => Id::Policy(p.id.clone()),
        }
    }

    /// The change that takes this object out of the model.
    fn removal(self) -> Change {
        match self {
            Id::Tier(name) => Change::TierRemove { name },
            Id::Namespace(name) => Change::NamespaceRemove { name },
            Id::ServiceAccount(namespace, name) => Change::ServiceAccountRemove { namespace, name },
            Id::NetworkSet(namespace, name) => Change::NetworkSetRemove { namespace, name },
            Id::Profile(name) => Change::ProfileRemove { name },
            Id::Endpoint(namespace, name) => Change::EndpointRemove { namespace, name },
            Id::Policy(id) => Change::PolicyRemove(id),
        }
    }
}

fn upsert(i: Item) -> Change {
    match i {
        Item::Tier(t) => Change::TierUpsert(t),
        Item::Namespace { name, labels } => Change::NamespaceUpsert { name, labels },
        Item::ServiceAccount {
            namespace,
            name,
            labels,
        } => Change::ServiceAccountUpsert {
            namespace,
            name,
            labels,
        },
        Item::NetworkSet(s) => Change::NetworkSetUpsert(s),
        Item::Profile(p) => Change::ProfileUpsert(p),
        Item::Endpoint(e) => Change::EndpointUpsert(e),
        Item::Policy(p) => Change::PolicyUpsert(p),
    }
}

/// What one key holds now.
#[derive(Debug)]
struct Held {
    id: Id,
    /// The policy, kept to bring it in (or out) when its tier comes (or goes).
    policy: Option<Policy>,
    /// Whether the model has it (a policy waiting for its tier does not).
    active: bool,
}

/// The outcome of one update: the engine's changes, in order, and the keys whose standing
/// changed (`Some`: left out, and why; `None`: in the model or gone).
#[derive(Debug, Default, PartialEq)]
pub struct Update {
    pub changes: Vec<Change>,
    pub reports: Vec<(String, Option<TranslateError>)>,
}

/// The translation state, key by key.
#[derive(Debug, Default)]
pub struct ModelSync {
    held: HashMap<String, Held>,
    /// Tier objects by name, with their key.
    tiers: BTreeMap<String, String>,
    /// Keys of policies per tier (active or waiting).
    by_tier: BTreeMap<String, BTreeSet<String>>,
    /// Keys left out, and why.
    bad: BTreeMap<String, TranslateError>,
}

impl ModelSync {
    pub fn new() -> ModelSync {
        ModelSync::default()
    }

    /// Keys currently left out of the model, and why.
    pub fn bad(&self) -> &BTreeMap<String, TranslateError> {
        &self.bad
    }

    /// Whether a Calico tier exists (the built-in ClusterNetworkPolicy tiers are none, even
    /// when a Tier object of their name was written around the validating edge).
    fn tier_exists(&self, tier: &str) -> bool {
        builtin_cluster_tier(tier).is_none()
            && (tier == DEFAULT_TIER || self.tiers.contains_key(tier))
    }

    /// Whether a policy's tier lets it into the model: ClusterNetworkPolicies their built-in
    /// tier, every other policy an existing Calico tier (as `translate::check_tier`).
    fn admits(&self, p: &Policy) -> bool {
        if p.id.kind.is_cluster() {
            builtin_cluster_tier(&p.tier).is_some()
        } else {
            self.tier_exists(&p.tier)
        }
    }

    /// The object under `key` is now `new` (`None`: deleted).
    pub fn update(&mut self, key: &str, new: Option<&Resource>) -> Update {
        let mut up = Update::default();
        let translated = match new.map(item) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(i))) => Some(i),
            Some(Err(e)) => {
                self.remove_key(key, None, &mut up);
                self.report(key, Some(e), &mut up);
                return up;
            }
        };
        let Some(new) = translated else {
            self.remove_key(key, None, &mut up);
            self.report(key, None, &mut up);
            return up;
        };
        let id = Id::of(&new);
        let stays = match &new {
            Item::Policy(p) => self.admits(p).then(|| id.clone()),
            _ => Some(id.clone()),
        };
        self.remove_key(key, stays.as_ref(), &mut up);
        match new {
            Item::Policy(p) => self.add_policy(key, p, &mut up),
            Item::Tier(t) => {
                let name = t.name.clone();
                self.tiers.insert(name.clone(), key.to_string());
                self.held.insert(key.to_string(), held(id, None, true));
                up.changes.push(Change::TierUpsert(t));
                self.report(key, None, &mut up);
                self.tier_arrived(&name, &mut up);
            }
            other => {
                self.held.insert(key.to_string(), held(id, None, true));
                up.changes.push(upsert(other));
                self.report(key, None, &mut up);
            }
        }
        up
    }

    /// Takes what `key` held out of the indexes, and out of the model unless the new version
    /// keeps the same object in it (`stays`: then its upsert replaces it).
    fn remove_key(&mut self, key: &str, stays: Option<&Id>, up: &mut Update) {
        let Some(old) = self.held.remove(key) else {
            return;
        };
        if let Some(p) = &old.policy {
            if let Some(keys) = self.by_tier.get_mut(&p.tier) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_tier.remove(&p.tier);
                }
            }
        }
        let kept = stays == Some(&old.id);
        if let Id::Tier(name) = &old.id {
            if self.tiers.get(name).is_some_and(|k| k == key) {
                self.tiers.remove(name);
            }
            if !kept && !self.tier_exists(name) {
                self.tier_gone(name, up);
            }
        }
        if old.active && !kept {
            up.changes.push(old.id.removal());
        }
    }

    fn add_policy(&mut self, key: &str, p: Policy, up: &mut Update) {
        let tier = p.tier.clone();
        self.by_tier
            .entry(tier.clone())
            .or_default()
            .insert(key.to_string());
        let id = Id::Policy(p.id.clone());
        if self.admits(&p) {
            self.held
                .insert(key.to_string(), held(id, Some(p.clone()), true));
            up.changes.push(Change::PolicyUpsert(p));
            self.report(key, None, up);
        } else {
            let why = if builtin_cluster_tier(&tier).is_some() != p.id.kind.is_cluster() {
                TranslateError::ClusterTier { tier }
            } else {
                TranslateError::MissingTier { tier }
            };
            self.held.insert(key.to_string(), held(id, Some(p), false));
            self.report(key, Some(why), up);
        }
    }

    /// A tier now exists: its waiting policies come in.
    fn tier_arrived(&mut self, tier: &str, up: &mut Update) {
        if !self.tier_exists(tier) {
            return;
        }
        let keys: Vec<String> = self
            .by_tier
            .get(tier)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for k in keys {
            let Some(h) = self.held.get_mut(&k).filter(|h| !h.active) else {
                continue;
            };
            h.active = true;
            if let Some(p) = h.policy.clone() {
                up.changes.push(Change::PolicyUpsert(p));
            }
            self.report(&k, None, up);
        }
    }

    /// A tier no longer exists: its policies go out (before the tier) and wait for it.
    fn tier_gone(&mut self, tier: &str, up: &mut Update) {
        if builtin_cluster_tier(tier).is_some() {
            return;
        }
        let keys: Vec<String> = self
            .by_tier
            .get(tier)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for k in keys {
            let Some(h) = self.held.get_mut(&k).filter(|h| h.active) else {
                continue;
            };
            h.active = false;
            up.changes.push(h.id.clone().removal());
            let e = TranslateError::MissingTier { tier: tier.into() };
            self.report(&k, Some(e), up);
        }
    }

    fn report(&mut self, key: &str, bad: Option<TranslateError>, up: &mut Update) {
        let changed = match &bad {
            Some(e) => self.bad.insert(key.to_string(), e.clone()).as_ref() != Some(e),
            None => self.bad.remove(key).is_some(),
        };
        if changed {
            up.reports.push((key.to_string(), bad));
        }
    }
}

fn held(id: Id, policy: Option<Policy>, active: bool) -> Held {
    Held { id, policy, active }
}

#[cfg(test)]
mod tests;
