//! What `trellis install-cni` manages and what to do about it (pure, no I/O): the desired
//! entries (the plugin binary, the `trellis-ipam` link to it, the conflist), what was observed
//! at their paths, and the plan — plain-data [`Op`]s that `apply` carries out.
//!
//! Install writes an entry whose content (SHA-256), mode or kind differs, and removes the
//! temporary files an interrupted install of ours left. Uninstall removes exactly the entries'
//! paths — files and links only; a directory someone put there is not ours — and our
//! temporary files; nothing else in either directory is touched. Order matters to a kubelet
//! that watches `net.d`: binaries are installed before the conflist that names them, and the
//! conflist removed before them.

use std::path::PathBuf;

use sha2::{Digest, Sha256};

/// The plugin binary's name in the CNI bin directory.
pub const PLUGIN: &str = "trellis-cni";
/// The IPAM plugin's name: a symbolic link to [`PLUGIN`] (the binary acts on its argv[0]),
/// as the README's manual install makes it.
pub const IPAM: &str = "trellis-ipam";
/// Marks our temporary files: `.NAME` + this + a unique suffix, in NAME's directory.
pub const TEMP_MARK: &str = ".trellis-install-";

/// What one managed path should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    File {
        bytes: Vec<u8>,
        mode: u32,
    },
    /// A symbolic link with this (relative) target.
    Link {
        target: String,
    },
}

/// A managed path: `dir` (absolute, under the host root) and file `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub dir: PathBuf,
    pub name: String,
    pub want: Want,
}

impl Entry {
    pub fn path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }
}

/// What is at a managed path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Absent,
    File {
        sha256: [u8; 32],
        mode: u32,
    },
    Link {
        target: String,
    },
    /// A directory, FIFO, socket or device.
    Other {
        kind: String,
    },
}

/// What was found: one [`Seen`] per entry (same order), and our leftover temporary files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    pub seen: Vec<Seen>,
    pub temps: Vec<PathBuf>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Put `want` at `dir/name` atomically (temporary file, fsync, rename); `why` it is needed.
    Write {
        dir: PathBuf,
        name: String,
        want: Want,
        why: String,
    },
    Remove {
        path: PathBuf,
        why: String,
    },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write { dir, name, why, .. } => {
                write!(f, "{}: {why}", dir.join(name).display())
            }
            Op::Remove { path, why } => write!(f, "{}: {why}", path.display()),
        }
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The first 12 hex digits of a digest, for messages.
pub fn short(d: &[u8; 32]) -> String {
    d[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why `seen` does not satisfy `want`, or `None` when it does.
pub fn differs(want: &Want, seen: &Seen) -> Option<String> {
    match (want, seen) {
        (_, Seen::Absent) => Some("missing".into()),
        (_, Seen::Other { kind }) => Some(format!("a {kind} is in the way")),
        (
            Want::File { bytes, mode },
            Seen::File {
                sha256: got,
                mode: m,
            },
        ) => {
            let digest = sha256(bytes);
            if digest != *got {
                Some(format!(
                    "content differs (sha256 {}…, want {}…)",
                    short(got),
                    short(&digest)
                ))
            } else if m != mode {
                Some(format!("mode {m:04o}, want {mode:04o}"))
            } else {
                None
            }
        }
        (Want::File { .. }, Seen::Link { target }) => {
            Some(format!("a symbolic link to {target}, want a file"))
        }
        (Want::Link { target }, Seen::Link { target: got }) if got == target => None,
        (Want::Link { target }, Seen::Link { target: got }) => {
            Some(format!("links to {got}, want {target}"))
        }
        (Want::Link { target }, Seen::File { .. }) => {
            Some(format!("a regular file, want a symbolic link to {target}"))
        }
    }
}

/// Install: write what differs, in `desired`'s order, then drop our leftover temporary files.
pub fn plan(desired: &[Entry], observed: &Observed) -> Vec<Op> {
    let mut ops: Vec<Op> = desired
        .iter()
        .zip(&observed.seen)
        .filter_map(|(e, seen)| {
            differs(&e.want, seen).map(|why| Op::Write {
                dir: e.dir.clone(),
                name: e.name.clone(),
                want: e.want.clone(),
                why,
            })
        })
        .collect();
    ops.extend(temps(observed));
    ops
}

/// Uninstall: remove each entry's file or link (reverse order), and our temporary files.
pub fn plan_uninstall(desired: &[Entry], observed: &Observed) -> Vec<Op> {
    let mut ops: Vec<Op> = desired
        .iter()
        .zip(&observed.seen)
        .rev()
        .filter_map(|(e, seen)| {
            let why = match seen {
                Seen::Absent | Seen::Other { .. } => return None,
                Seen::File { .. } => "installed file",
                Seen::Link { .. } => "installed link",
            };
            Some(Op::Remove {
                path: e.path(),
                why: why.into(),
            })
        })
        .collect();
    ops.extend(temps(observed));
    ops
}

fn temps(observed: &Observed) -> impl Iterator<Item = Op> + '_ {
    observed.temps.iter().map(|p| Op::Remove {
        path: p.clone(),
        why: "temporary file left by an interrupted install".into(),
    })
}

/// Whether `file_name` is one of our temporary files for `name`.
pub fn is_temp_of(file_name: &str, name: &str) -> bool {
    file_name
        .strip_prefix('.')
        .and_then(|rest| rest.strip_prefix(name))
        .is_some_and(|rest| rest.starts_with(TEMP_MARK))
}

/// The entries install-cni manages: the plugin binary and its IPAM link in `bin_dir`, the
/// conflist `conflist_name` in `net_dir`.
pub fn desired(
    bin_dir: PathBuf,
    net_dir: PathBuf,
    plugin: Vec<u8>,
    conflist_name: &str,
    conflist: Vec<u8>,
) -> Vec<Entry> {
    vec![
        Entry {
            dir: bin_dir.clone(),
            name: PLUGIN.into(),
            want: Want::File {
                bytes: plugin,
                mode: 0o755,
            },
        },
        Entry {
            dir: bin_dir,
            name: IPAM.into(),
            want: Want::Link {
                target: PLUGIN.into(),
            },
        },
        Entry {
            dir: net_dir,
            name: conflist_name.into(),
            want: Want::File {
                bytes: conflist,
                mode: 0o644,
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<Entry> {
        desired(
            "/h/opt/cni/bin".into(),
            "/h/etc/cni/net.d".into(),
            b"ELF".to_vec(),
            "10-trellis.conflist",
            b"{}".to_vec(),
        )
    }

    fn installed() -> Vec<Seen> {
        vec![
            Seen::File {
                sha256: sha256(b"ELF"),
                mode: 0o755,
            },
            Seen::Link {
                target: PLUGIN.into(),
            },
            Seen::File {
                sha256: sha256(b"{}"),
                mode: 0o644,
            },
        ]
    }

    fn names(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .map(|o| match o {
                Op::Write { dir, name, .. } => format!("write {}", dir.join(name).display()),
                Op::Remove { path, .. } => format!("remove {}", path.display()),
            })
            .collect()
    }

    #[test]
    fn a_fresh_host_gets_binaries_before_the_conflist() {
        let obs = Observed {
            seen: vec![Seen::Absent; 3],
            temps: vec![],
        };
        let ops = plan(&entries(), &obs);
        assert_eq!(
            names(&ops),
            [
                "write /h/opt/cni/bin/trellis-cni",
                "write /h/opt/cni/bin/trellis-ipam",
                "write /h/etc/cni/net.d/10-trellis.conflist"
            ]
        );
        assert!(ops.iter().all(|o| o.to_string().ends_with(": missing")));
    }

    #[test]
    fn an_installed_host_needs_nothing() {
        let obs = Observed {
            seen: installed(),
            temps: vec![],
        };
        assert_eq!(plan(&entries(), &obs), []);
    }

    #[test]
    fn content_mode_kind_and_link_target_are_compared() {
        let cases: [(usize, Seen, &str); 6] = [
            (
                0,
                Seen::File {
                    sha256: sha256(b"ELF2"),
                    mode: 0o755,
                },
                "content differs",
            ),
            (
                0,
                Seen::File {
                    sha256: sha256(b"ELF"),
                    mode: 0o644,
                },
                "mode 0644, want 0755",
            ),
            (0, Seen::Link { target: "x".into() }, "a symbolic link to x"),
            (
                1,
                Seen::Link {
                    target: "calico".into(),
                },
                "links to calico, want trellis-cni",
            ),
            (
                1,
                Seen::File {
                    sha256: sha256(b"ELF"),
                    mode: 0o755,
                },
                "a regular file, want a symbolic link",
            ),
            (
                2,
                Seen::Other {
                    kind: "directory".into(),
                },
                "a directory is in the way",
            ),
        ];
        for (i, seen, why) in cases {
            let mut obs = Observed {
                seen: installed(),
                temps: vec![],
            };
            obs.seen[i] = seen;
            let ops = plan(&entries(), &obs);
            assert_eq!(ops.len(), 1, "{ops:?}");
            let Op::Write { name, .. } = &ops[0] else {
                panic!("{ops:?}")
            };
            assert_eq!(name, &entries()[i].name);
            assert!(ops[0].to_string().contains(why), "{} vs {why}", ops[0]);
        }
    }

    #[test]
    fn leftover_temporary_files_are_removed_by_install_and_uninstall() {
        let t = PathBuf::from("/h/opt/cni/bin/.trellis-cni.trellis-install-7-1");
        let obs = Observed {
            seen: installed(),
            temps: vec![t.clone()],
        };
        let want = vec![Op::Remove {
            path: t,
            why: "temporary file left by an interrupted install".into(),
        }];
        assert_eq!(plan(&entries(), &obs), want);
        assert_eq!(plan_uninstall(&entries(), &obs).last(), want.last());
    }

    #[test]
    fn uninstall_removes_the_conflist_first_and_leaves_what_is_not_ours() {
        let obs = Observed {
            seen: installed(),
            temps: vec![],
        };
        assert_eq!(
            names(&plan_uninstall(&entries(), &obs)),
            [
                "remove /h/etc/cni/net.d/10-trellis.conflist",
                "remove /h/opt/cni/bin/trellis-ipam",
                "remove /h/opt/cni/bin/trellis-cni"
            ]
        );
        // A tampered file at our path is still ours; a directory there is not; absent is done.
        let obs = Observed {
            seen: vec![
                Seen::File {
                    sha256: sha256(b"other"),
                    mode: 0o700,
                },
                Seen::Absent,
                Seen::Other {
                    kind: "directory".into(),
                },
            ],
            temps: vec![],
        };
        assert_eq!(
            names(&plan_uninstall(&entries(), &obs)),
            ["remove /h/opt/cni/bin/trellis-cni"]
        );
        let gone = Observed {
            seen: vec![Seen::Absent; 3],
            temps: vec![],
        };
        assert_eq!(plan_uninstall(&entries(), &gone), []);
    }

    #[test]
    fn temporary_names_are_recognised_exactly() {
        assert!(is_temp_of(
            ".trellis-cni.trellis-install-12-0",
            "trellis-cni"
        ));
        assert!(!is_temp_of(
            ".trellis-cni.trellis-install-12-0",
            "trellis-ipam"
        ));
        assert!(!is_temp_of("trellis-cni.trellis-install-1", "trellis-cni"));
        assert!(!is_temp_of(".trellis-cni", "trellis-cni"));
        assert!(!is_temp_of(".trellis-cni.bak", "trellis-cni"));
    }
}
