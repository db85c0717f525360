//! How the RIB holds a prefix's paths compactly (a full table is 100 000 prefixes and more).
//! A [`Path`] is one pointer to a [`PathInfo`] shared by every prefix announced together — an
//! UPDATE's prefixes have the same source, attributes and next hop — and a prefix's [`Paths`]
//! hold the usual single path inline, without an allocation of its own, beside the next hop
//! its kernel route was last given (an index into the few distinct ones, [`NextHops`]).
//! Pure.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;

use crate::attrs::PathAttrs;

/// Where a path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Source {
    Local,
    Peer(super::PeerId),
}

/// What a path is: shared, never changed in place (a path marked stale is a new one).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PathInfo {
    pub source: Source,
    pub attrs: Arc<PathAttrs>,
    pub next_hop: IpAddr,
    pub stale: bool,
}

/// One path of a prefix.
#[derive(Debug, Clone)]
pub(super) struct Path(Arc<PathInfo>);

impl Path {
    pub fn new(info: PathInfo) -> Path {
        Path(Arc::new(info))
    }

    /// This path marked stale; paths that shared their [`PathInfo`] share the stale one too
    /// (`seen` maps each original to its stale copy).
    fn to_stale(&self, seen: &mut HashMap<*const PathInfo, Path>) -> Path {
        seen.entry(Arc::as_ptr(&self.0))
            .or_insert_with(|| {
                Path::new(PathInfo {
                    stale: true,
                    ..(*self.0).clone()
                })
            })
            .clone()
    }
}

impl Deref for Path {
    type Target = PathInfo;
    fn deref(&self) -> &PathInfo {
        &self.0
    }
}

/// An interned next hop ([`NextHops`]), or [`NOT_INSTALLED`].
pub(super) type NhId = u32;

/// The prefix has no kernel route.
pub(super) const NOT_INSTALLED: NhId = NhId::MAX;

/// The distinct next hops of installed routes, counted, so a prefix names its own by index.
#[derive(Debug, Default)]
pub(super) struct NextHops {
    addrs: Vec<IpAddr>,
    refs: Vec<u32>,
    index: HashMap<IpAddr, NhId>,
    free: Vec<NhId>,
}

impl NextHops {
    pub fn get(&self, id: NhId) -> Option<&IpAddr> {
        self.addrs.get(id as usize).filter(|_| id != NOT_INSTALLED)
    }

    /// The id of `nh`, counted once more.
    pub fn acquire(&mut self, nh: IpAddr) -> NhId {
        if let Some(&id) = self.index.get(&nh) {
            self.refs[id as usize] += 1;
            return id;
        }
        let id = match self.free.pop() {
            Some(id) => {
                self.addrs[id as usize] = nh;
                self.refs[id as usize] = 1;
                id
            }
            None => {
                self.addrs.push(nh);
                self.refs.push(1);
                (self.addrs.len() - 1) as NhId
            }
        };
        self.index.insert(nh, id);
        id
    }

    /// One use of `id` fewer; the last frees it.
    pub fn release(&mut self, id: NhId) {
        let Some(r) = self
            .refs
            .get_mut(id as usize)
            .filter(|_| id != NOT_INSTALLED)
        else {
            return;
        };
        *r -= 1;
        if *r == 0 {
            self.index.remove(&self.addrs[id as usize]);
            self.free.push(id);
        }
    }
}

/// A prefix's paths, at most one per source, and its kernel route's next hop. An entry with
/// no path stays only until the next flush takes its kernel route away ([`Paths::is_dead`]
/// once it has none either: the caller removes it).
// `Many` boxes its `Vec` (a thin pointer) so every entry stays 16 bytes: the rare prefix with
// several paths pays an allocation more, the 100 000 with one pay 8 bytes less.
#[allow(clippy::box_collection)]
#[derive(Debug, Clone)]
pub(super) enum Paths {
    Gone {
        installed: NhId,
    },
    One {
        installed: NhId,
        path: Path,
    },
    Many {
        installed: NhId,
        paths: Box<Vec<Path>>,
    },
}

impl Paths {
    pub fn new(path: Path) -> Paths {
        Paths::One {
            installed: NOT_INSTALLED,
            path,
        }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Path> {
        match self {
            Paths::Gone { .. } => [].iter(),
            Paths::One { path, .. } => std::slice::from_ref(path).iter(),
            Paths::Many { paths, .. } => paths.iter(),
        }
    }

    pub fn installed(&self) -> NhId {
        match self {
            Paths::Gone { installed }
            | Paths::One { installed, .. }
            | Paths::Many { installed, .. } => *installed,
        }
    }

    pub fn set_installed(&mut self, id: NhId) {
        match self {
            Paths::Gone { installed }
            | Paths::One { installed, .. }
            | Paths::Many { installed, .. } => *installed = id,
        }
    }

    /// No path and no kernel route: the prefix goes.
    pub fn is_dead(&self) -> bool {
        matches!(self, Paths::Gone { installed } if *installed == NOT_INSTALLED)
    }

    /// Puts `path` in place of the one from the same source, or beside the others.
    pub fn put(&mut self, new: Path) {
        let installed = self.installed();
        match self {
            Paths::Gone { .. } => {
                *self = Paths::One {
                    installed,
                    path: new,
                }
            }
            Paths::One { path, .. } if path.source == new.source => *path = new,
            Paths::One { path, .. } => {
                let paths = Box::new(vec![path.clone(), new]);
                *self = Paths::Many { installed, paths };
            }
            Paths::Many { paths, .. } => match paths.iter_mut().find(|p| p.source == new.source) {
                Some(p) => *p = new,
                None => paths.push(new),
            },
        }
    }

    /// Keeps the paths `keep` accepts; returns how many were removed.
    pub fn retain(&mut self, mut keep: impl FnMut(&Path) -> bool) -> usize {
        let installed = self.installed();
        match self {
            Paths::Gone { .. } => 0,
            Paths::One { path, .. } => {
                if keep(path) {
                    return 0;
                }
                *self = Paths::Gone { installed };
                1
            }
            Paths::Many { paths, .. } => {
                let before = paths.len();
                paths.retain(|p| keep(p));
                let removed = before - paths.len();
                match paths.len() {
                    0 => *self = Paths::Gone { installed },
                    1 => {
                        let path = paths.pop().expect("one");
                        *self = Paths::One { installed, path };
                    }
                    _ => {}
                }
                removed
            }
        }
    }

    /// Marks the paths `which` selects stale.
    pub fn mark_stale(
        &mut self,
        which: impl Fn(&Path) -> bool,
        seen: &mut HashMap<*const PathInfo, Path>,
    ) {
        match self {
            Paths::Gone { .. } => {}
            Paths::One { path, .. } if which(path) => *path = path.to_stale(seen),
            Paths::One { .. } => {}
            Paths::Many { paths, .. } => {
                for p in paths.iter_mut().filter(|p| which(p)) {
                    *p = p.to_stale(seen);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;

    fn path(peer: u32) -> Path {
        Path::new(PathInfo {
            source: Source::Peer(peer),
            attrs: Arc::new(PathAttrs::default()),
            next_hop: "192.0.2.1".parse().unwrap(),
            stale: false,
        })
    }

    /// The point of this module: a prefix with its path and its kernel route's next hop costs
    /// a pointer, a tag and an index beside its key in the map, no allocation of its own (a
    /// `Vec` with one path cost 24 bytes plus a 160-byte allocation, and the kernel routes a
    /// second map: a 100 000-prefix table took 27 MB instead of 5).
    #[test]
    fn a_prefix_with_one_path_is_small_and_inline() {
        assert_eq!(std::mem::size_of::<Path>(), 8);
        assert_eq!(std::mem::size_of::<Paths>(), 16);
        assert!(std::mem::size_of::<(IpNet, Paths)>() <= 40);
    }

    #[test]
    fn put_replaces_by_source_and_retain_reports_what_is_left() {
        let mut ps = Paths::new(path(1));
        ps.set_installed(7);
        ps.put(path(1));
        assert_eq!(ps.iter().count(), 1);
        ps.put(path(2));
        assert_eq!(ps.iter().count(), 2);
        assert_eq!(ps.retain(|p| p.source != Source::Peer(2)), 1);
        assert!(matches!(ps, Paths::One { .. }), "back to inline");
        assert_eq!(ps.retain(|_| true), 0);
        assert_eq!(ps.retain(|_| false), 1);
        assert_eq!((ps.iter().count(), ps.installed()), (0, 7));
        assert!(!ps.is_dead(), "kept until its kernel route is taken away");
        ps.set_installed(NOT_INSTALLED);
        assert!(ps.is_dead());
    }

    #[test]
    fn next_hops_are_counted_and_reused() {
        let mut n = NextHops::default();
        let a = n.acquire("192.0.2.1".parse().unwrap());
        assert_eq!(n.acquire("192.0.2.1".parse().unwrap()), a);
        let b = n.acquire("192.0.2.2".parse().unwrap());
        n.release(a);
        assert_eq!(
            n.get(a),
            Some(&"192.0.2.1".parse().unwrap()),
            "still used once"
        );
        n.release(a);
        let c = n.acquire("192.0.2.3".parse().unwrap());
        assert_eq!(c, a, "a freed id is reused");
        assert_ne!(b, c);
        assert_eq!(n.get(NOT_INSTALLED), None);
    }

    #[test]
    fn stale_copies_stay_shared() {
        let shared = path(1);
        let mut a = Paths::new(shared.clone());
        let mut b = Paths::new(shared);
        b.put(path(2));
        let mut seen = HashMap::new();
        let is1 = |p: &Path| p.source == Source::Peer(1);
        a.mark_stale(is1, &mut seen);
        b.mark_stale(is1, &mut seen);
        let sa = a.iter().next().unwrap();
        let sb = b.iter().find(|p| is1(p)).unwrap();
        assert!(sa.stale && Arc::ptr_eq(&sa.0, &sb.0));
        assert!(
            b.iter().any(|p| !p.stale),
            "the other peer's path is untouched"
        );
    }
}
