//! `trellis install-cni`: puts the CNI plugin (`trellis-cni`, the `trellis-ipam` link to it)
//! and a conflist on a host whose root is mounted at `--host-root`, as an init container does
//! (Calico's install-cni). This module validates the flags, reads the sources, observes the
//! host and applies the plan [`plan`] makes; every write is atomic — a temporary file in the
//! same directory, fsync, rename, fsync of the directory — so a kubelet never executes a
//! half-written binary or reads half a conflist. Does I/O: the host's files.

pub mod plan;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use plan::{Entry, Observed, Op, Seen, Want};

/// The conflist written when no `--template` is given: routed mode with cluster IPAM from the
/// node agent (which also gives each pod its MTU), as the README's agent example.
pub const DEFAULT_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "plugins": [
    {
      "type": "trellis-cni",
      "mode": "routed",
      "ipam": {"type": "trellis-ipam"},
      "capabilities": {"ips": true, "mac": true}
    }
  ]
}
"#;

/// The largest template read (a conflist is a few hundred bytes).
const MAX_TEMPLATE: u64 = 1 << 20;

/// `trellis install-cni` flags.
#[derive(Args, Debug)]
pub struct InstallCniArgs {
    /// Where the host's root filesystem is mounted.
    #[arg(long, default_value = "/host")]
    pub host_root: PathBuf,
    /// The directory holding the `trellis-cni` binary to install (default: this executable's).
    #[arg(long)]
    pub source_dir: Option<PathBuf>,
    /// The host's CNI binary directory (absolute, under --host-root).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI configuration directory (absolute, under --host-root).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_net_dir: PathBuf,
    /// The conflist's file name in the configuration directory.
    #[arg(long, default_value = "10-trellis.conflist")]
    pub conflist_name: String,
    /// The conflist to write (default: routed mode, IPAM from the node agent).
    #[arg(long)]
    pub template: Option<PathBuf>,
    /// Report what is missing or out of date (exit 1 if anything is); change nothing.
    #[arg(long, conflicts_with = "uninstall")]
    pub check: bool,
    /// Remove what install writes (and nothing else).
    #[arg(long)]
    pub uninstall: bool,
}

/// Runs install, `--check` or `--uninstall`.
pub fn run(a: &InstallCniArgs) -> Result<ExitCode> {
    let (bin_dir, net_dir) = directories(a)?;
    let name = conflist_name(&a.conflist_name)?;
    let desired = if a.uninstall {
        // Only the paths count: no source or template is needed to remove what install wrote.
        plan::desired(bin_dir, net_dir, Vec::new(), name, Vec::new())
    } else {
        let plugin = read_plugin(a)?;
        let conflist = read_template(a.template.as_deref())?;
        plan::desired(bin_dir, net_dir, plugin, name, conflist)
    };
    let observed = observe(&desired)?;
    if a.check {
        let ops = plan::plan(&desired, &observed);
        for op in &ops {
            println!("out of date: {op}");
        }
        if ops.is_empty() {
            println!("up to date");
            return Ok(ExitCode::SUCCESS);
        }
        return Ok(ExitCode::FAILURE);
    }
    let ops = if a.uninstall {
        plan::plan_uninstall(&desired, &observed)
    } else {
        plan::plan(&desired, &observed)
    };
    if ops.is_empty() {
        println!(
            "{}",
            if a.uninstall {
                "nothing to remove: not installed"
            } else {
                "up to date: nothing changed"
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    apply(&ops, a.uninstall)
}

/// The bin and net directories under the host root, created for an install.
fn directories(a: &InstallCniArgs) -> Result<(PathBuf, PathBuf)> {
    let meta = fs::metadata(&a.host_root)
        .with_context(|| format!("--host-root {}", a.host_root.display()))?;
    if !meta.is_dir() {
        bail!("--host-root {}: not a directory", a.host_root.display());
    }
    let under = |flag: &str, dir: &Path| -> Result<PathBuf> {
        let ok = dir.is_absolute()
            && dir
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !ok {
            bail!(
                "{flag} {}: must be an absolute path without `.` or `..`",
                dir.display()
            );
        }
        in_root(&a.host_root, dir, !a.uninstall && !a.check).with_context(|| flag.to_string())
    };
    Ok((
        under("--cni-bin-dir", &a.cni_bin_dir)?,
        under("--cni-net-dir", &a.cni_net_dir)?,
    ))
}

/// How many symbolic links one path may pass through (Linux's limit).
const MAX_LINKS: u32 = 40;

/// Where `dir` (absolute, without `.` or `..`) is on the host whose root is `root`, as the
/// host resolves it: a symbolic link on the way is followed within `root` — an absolute
/// target starts again at `root`, `..` stops at it (openat2's RESOLVE_IN_ROOT) — so a link
/// such as the host's `/opt/cni/bin -> /usr/libexec/cni` leads where the kubelet looks and never
/// out of the host root into the container's own files. With `create`, missing directories
/// are made (0755); without, the first missing one ends the walk (nothing exists below it).
pub fn in_root(root: &Path, dir: &Path, create: bool) -> Result<PathBuf> {
    use std::collections::VecDeque;
    use std::ffi::OsString;
    let mut at: Vec<OsString> = Vec::new();
    let mut todo: VecDeque<OsString> = normal(dir).collect();
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            at.pop();
            continue;
        }
        let here: PathBuf = root
            .iter()
            .chain(at.iter().map(|c| c.as_os_str()))
            .collect();
        let path = here.join(&name);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    bail!(
                        "{}: more than {MAX_LINKS} symbolic links on the way",
                        dir.display()
                    );
                }
                let target = fs::read_link(&path)
                    .with_context(|| format!("reading the link {}", path.display()))?;
                if target.is_absolute() {
                    at.clear();
                }
                for c in normal(&target).collect::<Vec<_>>().into_iter().rev() {
                    todo.push_front(c);
                }
            }
            Ok(m) if m.is_dir() => at.push(name),
            Ok(_) => bail!("{}: {} is not a directory", dir.display(), path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                match fs::create_dir(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(e).with_context(|| format!("creating {}", path.display()))
                    }
                    // Made now (or meanwhile by someone else): look at it again.
                    _ => todo.push_front(name),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(path.join(todo.iter().collect::<PathBuf>()));
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }
    Ok(root
        .iter()
        .chain(at.iter().map(|c| c.as_os_str()))
        .collect())
}

/// A path's names and `..`s, without its root and `.`s.
fn normal(p: &Path) -> impl Iterator<Item = std::ffi::OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    })
}

/// A conflist file name: `[A-Za-z0-9._-]`, not starting with `.`, ending `.conflist`.
fn conflist_name(name: &str) -> Result<&str> {
    let ok = name.len() <= 255
        && name.len() > ".conflist".len()
        && !name.starts_with('.')
        && name.ends_with(".conflist")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!(
            "--conflist-name {name:?}: must be a file name of letters, digits, `.`, `_` and `-` ending in .conflist (at most 255 bytes, no leading `.`)"
        );
    }
    Ok(name)
}

fn read_plugin(a: &InstallCniArgs) -> Result<Vec<u8>> {
    let (dir, flag) = match &a.source_dir {
        Some(d) => (d.clone(), "--source-dir"),
        None => {
            let exe = std::env::current_exe().context("finding this executable's directory")?;
            let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
            (
                dir,
                "the default source (this executable's directory; --source-dir)",
            )
        }
    };
    let path = dir.join(plan::PLUGIN);
    let meta = fs::metadata(&path).with_context(|| format!("{flag}: {}", path.display()))?;
    if !meta.is_file() || meta.len() == 0 {
        bail!("{flag}: {} is not a non-empty regular file", path.display());
    }
    fs::read(&path).with_context(|| format!("{flag}: reading {}", path.display()))
}

/// The conflist bytes: the template file or the built-in one, validated.
fn read_template(template: Option<&Path>) -> Result<Vec<u8>> {
    let Some(path) = template else {
        return Ok(DEFAULT_CONFLIST.as_bytes().to_vec());
    };
    let mut bytes = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_TEMPLATE + 1).read_to_end(&mut bytes))
        .with_context(|| format!("--template {}", path.display()))?;
    if bytes.len() as u64 > MAX_TEMPLATE {
        bail!(
            "--template {}: larger than {MAX_TEMPLATE} bytes",
            path.display()
        );
    }
    validate_conflist(&bytes).with_context(|| format!("--template {}", path.display()))?;
    Ok(bytes)
}

/// A conflist as libcni loads it: an object with `cniVersion` and `name` strings and a
/// non-empty `plugins` list of objects with a `type`; a `trellis-cni` plugin's configuration
/// must pass the plugin's own validation (as the runtime will hand it over).
pub fn validate_conflist(bytes: &[u8]) -> Result<()> {
    let v: Value = serde_json::from_slice(bytes).context("not JSON")?;
    let obj = v.as_object().context("not a JSON object")?;
    for key in ["cniVersion", "name"] {
        if !obj.get(key).is_some_and(Value::is_string) {
            bail!("{key}: missing or not a string");
        }
    }
    let plugins = obj
        .get("plugins")
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
        .context("plugins: missing, not a list, or empty")?;
    for (i, p) in plugins.iter().enumerate() {
        let ty = p
            .get("type")
            .and_then(Value::as_str)
            .with_context(|| format!("plugins[{i}].type: missing or not a string"))?;
        if ty == plan::PLUGIN {
            let mut conf = p.clone();
            conf["cniVersion"] = obj["cniVersion"].clone();
            conf["name"] = obj["name"].clone();
            trellis_cni_types::PluginConfig::parse(conf.to_string().as_bytes())
                .map_err(|e| anyhow::anyhow!("plugins[{i}]: {e}"))?;
        }
    }
    Ok(())
}

/// What is at each entry's path, and our leftover temporary files beside them.
fn observe(desired: &[Entry]) -> Result<Observed> {
    let mut obs = Observed::default();
    for e in desired {
        let path = e.path();
        let seen = match fs::symlink_metadata(&path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Seen::Absent,
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
            Ok(m) if m.file_type().is_symlink() => Seen::Link {
                target: fs::read_link(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .to_string_lossy()
                    .into_owned(),
            },
            Ok(m) if m.is_file() => Seen::File {
                sha256: plan::sha256(
                    &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                ),
                mode: m.permissions().mode() & 0o7777,
            },
            Ok(m) => Seen::Other {
                kind: kind_of(&m.file_type()).into(),
            },
        };
        obs.seen.push(seen);
        obs.temps.extend(temps_of(&e.dir, &e.name)?);
    }
    Ok(obs)
}

fn kind_of(t: &fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else {
        "device"
    }
}

fn temps_of(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.with_context(|| format!("listing {}", dir.display()))?,
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|f| plan::is_temp_of(f, name))
        {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Carries out `ops`, printing each. Install stops at the first failure (the conflist comes
/// last, so it is never written before its binaries); uninstall goes on and reports them all.
fn apply(ops: &[Op], uninstall: bool) -> Result<ExitCode> {
    let mut errors = Vec::new();
    for op in ops {
        let done = match op {
            Op::Write {
                dir, name, want, ..
            } => write_atomic(dir, name, want),
            Op::Remove { path, .. } => remove(path),
        };
        match done {
            Ok(()) => println!(
                "{} {op}",
                if matches!(op, Op::Write { .. }) {
                    "wrote"
                } else {
                    "removed"
                }
            ),
            Err(e) if uninstall => errors.push(format!("{e:#}")),
            Err(e) => return Err(e),
        }
    }
    if errors.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    bail!("{}", errors.join("; "))
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Puts `want` at `dir/name`: built under a temporary name in `dir`, flushed to disk, renamed
/// over the old one (atomic: a reader sees the old or the new, whole), then the directory is
/// flushed so the rename survives a crash.
fn write_atomic(dir: &Path, name: &str, want: &Want) -> Result<()> {
    let tmp = dir.join(format!(
        ".{name}{}{}-{}",
        plan::TEMP_MARK,
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let made = (|| -> std::io::Result<()> {
        match want {
            Want::File { bytes, mode } => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(*mode)
                    .open(&tmp)?;
                f.write_all(bytes)?;
                // The umask may have taken bits away.
                f.set_permissions(fs::Permissions::from_mode(*mode))?;
                f.sync_all()
            }
            Want::Link { target } => std::os::unix::fs::symlink(target, &tmp),
        }
    })()
    .and_then(|()| fs::rename(&tmp, dir.join(name)));
    if let Err(e) = made {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", dir.join(name).display()));
    }
    sync_dir(dir)
}

/// Removes `path` (already gone is fine) and flushes its directory.
fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        r => r.with_context(|| format!("removing {}", path.display()))?,
    }
    sync_dir(path.parent().unwrap_or(Path::new("/")))
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("flushing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_conflist_is_valid_for_the_plugin() {
        validate_conflist(DEFAULT_CONFLIST.as_bytes()).unwrap();
    }

    #[test]
    fn templates_are_validated_naming_the_field() {
        let cases = [
            ("[]", "not a JSON object"),
            ("{\"name\": \"n\", \"plugins\": []}", "cniVersion"),
            (
                "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": []}",
                "plugins",
            ),
            (
                "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [{}]}",
                "plugins[0].type",
            ),
            (
                "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [{\"type\": \"trellis-cni\", \"mode\": \"sideways\"}]}",
                "plugins[0]",
            ),
        ];
        for (text, field) in cases {
            let e = format!("{:#}", validate_conflist(text.as_bytes()).unwrap_err());
            assert!(e.contains(field), "{text}: {e}");
        }
        let other = "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [{\"type\": \"trellis-cni\", \"ipam\": {\"type\": \"trellis-ipam\"}}, {\"type\": \"portmap\", \"capabilities\": {\"portMappings\": true}}]}";
        validate_conflist(other.as_bytes()).unwrap();
    }

    #[test]
    fn conflist_names_are_plain_file_names() {
        for ok in ["10-trellis.conflist", "99_x.y.conflist"] {
            assert!(conflist_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "../10-trellis.conflist",
            "a/b.conflist",
            ".hidden.conflist",
            "10-trellis.conf",
            ".conflist",
            "x y.conflist",
            "",
        ] {
            let e = conflist_name(bad).unwrap_err().to_string();
            assert!(e.contains("--conflist-name"), "{bad}: {e}");
        }
    }
}
