//! `trellis install-cni` against a temporary host root: install, check, repair, foreign files
//! left alone, uninstall (twice), flag validation, symbolic links on the host resolved within
//! the host root, that a reader of the installed binary never sees it half-written while
//! installs replace it, and that an install killed mid-copy leaves nothing a kubelet would
//! use half-written.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bin;

fn install(host: &Path, extra: &[&str]) -> Output {
    std::process::Command::new(bin("trellis"))
        .arg("install-cni")
        .arg("--host-root")
        .arg(host)
        .args(extra)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(host: &Path, extra: &[&str]) -> String {
    let o = install(host, extra);
    assert!(o.status.success(), "install-cni {extra:?}: {}", text(&o));
    text(&o)
}

fn failing(host: &Path, extra: &[&str]) -> String {
    let o = install(host, extra);
    assert_eq!(
        o.status.code(),
        Some(1),
        "install-cni {extra:?}: {}",
        text(&o)
    );
    text(&o)
}

struct Host {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        Host { _dir: dir, root }
    }
    fn bin(&self, name: &str) -> PathBuf {
        self.root.join("opt/cni/bin").join(name)
    }
    fn net(&self, name: &str) -> PathBuf {
        self.root.join("etc/cni/net.d").join(name)
    }
}

/// Every file under `dir`, with its content (links as `-> target`).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p);
            } else if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).unwrap();
                out.push((p, format!("-> {}", t.display()).into_bytes()));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn install_check_repair_and_uninstall() {
    let h = Host::new();
    // Another plugin's files, which nothing here may touch.
    std::fs::create_dir_all(h.root.join("opt/cni/bin")).unwrap();
    std::fs::create_dir_all(h.root.join("etc/cni/net.d")).unwrap();
    std::fs::write(h.bin("bridge"), b"other plugin").unwrap();
    std::fs::write(h.net("05-other.conflist"), b"{\"other\": true}").unwrap();

    // Before: check names all three as missing.
    let out = failing(&h.root, &["--check"]);
    assert_eq!(out.matches("missing").count(), 3, "{out}");

    // Install from the default source: this executable's directory.
    let out = ok(&h.root, &[]);
    assert_eq!(out.matches("wrote").count(), 3, "{out}");
    let source = std::fs::read(bin("trellis-cni")).unwrap();
    assert_eq!(std::fs::read(h.bin("trellis-cni")).unwrap(), source);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&h.bin("trellis-cni")), 0o755);
    assert_eq!(
        std::fs::read_link(h.bin("trellis-ipam")).unwrap(),
        Path::new("trellis-cni")
    );
    let conflist: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.net("10-trellis.conflist")).unwrap()).unwrap();
    assert_eq!(conflist["plugins"][0]["type"], "trellis-cni");
    assert_eq!(conflist["plugins"][0]["mode"], "routed");
    assert_eq!(conflist["plugins"][0]["ipam"]["type"], "trellis-ipam");
    assert_eq!(mode(&h.net("10-trellis.conflist")), 0o644);

    // Again: nothing changes (the binary is the same inode), and it says so.
    let ino = std::fs::metadata(h.bin("trellis-cni")).unwrap().ino();
    let before = snapshot(&h.root);
    let out = ok(&h.root, &[]);
    assert!(out.contains("up to date: nothing changed"), "{out}");
    assert_eq!(std::fs::metadata(h.bin("trellis-cni")).unwrap().ino(), ino);
    assert_eq!(snapshot(&h.root), before);
    assert!(ok(&h.root, &["--check"]).contains("up to date"));

    // Tampered: a changed binary, a re-pointed link, a conflist with another mode.
    let mut bad = source.clone();
    bad.push(0);
    std::fs::write(h.bin("trellis-cni"), &bad).unwrap();
    std::fs::remove_file(h.bin("trellis-ipam")).unwrap();
    std::os::unix::fs::symlink("bridge", h.bin("trellis-ipam")).unwrap();
    std::fs::set_permissions(
        h.net("10-trellis.conflist"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let out = failing(&h.root, &["--check"]);
    for want in [
        "trellis-cni: content differs",
        "trellis-ipam: links to bridge, want trellis-cni",
        "10-trellis.conflist: mode 0600, want 0644",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    // --check changed nothing.
    assert_eq!(std::fs::read(h.bin("trellis-cni")).unwrap(), bad);
    let out = ok(&h.root, &[]);
    assert_eq!(out.matches("wrote").count(), 3, "{out}");
    assert!(ok(&h.root, &["--check"]).contains("up to date"));
    assert_eq!(snapshot(&h.root), before, "repaired to exactly the install");

    // Uninstall: ours go, the other plugin's stay; a second uninstall is a no-op.
    let out = ok(&h.root, &["--uninstall"]);
    assert_eq!(out.matches("removed").count(), 3, "{out}");
    let left: Vec<_> = snapshot(&h.root).into_iter().map(|(p, _)| p).collect();
    assert_eq!(left, [h.net("05-other.conflist"), h.bin("bridge")]);
    assert_eq!(std::fs::read(h.bin("bridge")).unwrap(), b"other plugin");
    let out = ok(&h.root, &["--uninstall"]);
    assert!(out.contains("nothing to remove"), "{out}");
    assert_eq!(left.len(), snapshot(&h.root).len());
}

/// The host's CNI directories are symbolic links — the bin directory to an absolute path
/// (`/opt/cni/bin -> /usr/libexec/cni` on some distributions), the net directory by a relative
/// path with more `..` than there are levels: both are resolved as the host resolves them,
/// within the host root, and nothing is written outside it (in the container, an absolute
/// link followed as is leads into the container's own files).
#[test]
fn symbolic_links_on_the_host_are_resolved_within_the_host_root() {
    let h = Host::new();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("libexec-cni");
    let rel = target.strip_prefix("/").unwrap();
    // The targets exist outside too (as the container's own directories might).
    std::fs::create_dir_all(target.join("net")).unwrap();
    std::fs::create_dir_all(h.root.join("opt/cni")).unwrap();
    std::fs::create_dir_all(h.root.join("etc/cni")).unwrap();
    std::os::unix::fs::symlink(&target, h.root.join("opt/cni/bin")).unwrap();
    let up = "../".repeat(64);
    std::os::unix::fs::symlink(
        format!("{up}{}", rel.join("net").display()),
        h.root.join("etc/cni/net.d"),
    )
    .unwrap();
    // The host's view of those paths, under the host root.
    let bin_dir = h.root.join(rel);
    let net_dir = h.root.join(rel).join("net");

    let out = ok(&h.root, &[]);
    assert_eq!(out.matches("wrote").count(), 3, "{out}");
    let escaped: Vec<PathBuf> = snapshot(outside.path())
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(
        escaped.is_empty(),
        "written outside the host root: {escaped:?}"
    );
    assert_eq!(
        std::fs::read(bin_dir.join("trellis-cni")).unwrap(),
        std::fs::read(bin("trellis-cni")).unwrap()
    );
    assert!(net_dir.join("10-trellis.conflist").is_file(), "{out}");
    // What the kubelet sees through the links is what was installed.
    assert!(ok(&h.root, &["--check"]).contains("up to date"));
    let out = ok(&h.root, &["--uninstall"]);
    assert_eq!(out.matches("removed").count(), 3, "{out}");
    assert!(!bin_dir.join("trellis-cni").exists());
    // The links themselves are the host's: left as they were.
    assert_eq!(
        std::fs::read_link(h.root.join("opt/cni/bin")).unwrap(),
        target
    );

    // A link loop is an error naming the flag, not a hang.
    let h = Host::new();
    std::fs::create_dir_all(h.root.join("opt/cni")).unwrap();
    std::os::unix::fs::symlink("/opt/cni/bin", h.root.join("opt/cni/bin")).unwrap();
    let out = failing(&h.root, &[]);
    assert!(
        out.contains("--cni-bin-dir") && out.contains("symbolic links"),
        "{out}"
    );
    // A file where a directory should be.
    let h = Host::new();
    std::fs::create_dir_all(h.root.join("opt/cni")).unwrap();
    std::fs::write(h.root.join("opt/cni/bin"), b"").unwrap();
    let out = failing(&h.root, &[]);
    assert!(
        out.contains("--cni-bin-dir") && out.contains("is not a directory"),
        "{out}"
    );
}

#[test]
fn a_template_and_conflist_name_are_written_verbatim_and_bad_ones_refused() {
    let h = Host::new();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("trellis-cni"), b"plugin v1").unwrap();
    let s = src.path().to_str().unwrap();
    let template = src.path().join("t.conflist");
    let body = "{\"cniVersion\": \"0.4.0\", \"name\": \"net2\",\n \"plugins\": [{\"type\": \"trellis-cni\", \"mode\": \"bridge\", \"ipam\": {\"type\": \"trellis-ipam\", \"ranges\": [[{\"subnet\": \"10.9.0.0/24\"}]]}}]}\n";
    std::fs::write(&template, body).unwrap();
    let t = template.to_str().unwrap();
    ok(
        &h.root,
        &[
            "--source-dir",
            s,
            "--template",
            t,
            "--conflist-name",
            "20-net2.conflist",
        ],
    );
    assert_eq!(
        std::fs::read(h.net("20-net2.conflist")).unwrap(),
        body.as_bytes()
    );
    assert_eq!(std::fs::read(h.bin("trellis-cni")).unwrap(), b"plugin v1");
    // The built-in template is a different conflist: check says so.
    let out = failing(
        &h.root,
        &[
            "--check",
            "--source-dir",
            s,
            "--conflist-name",
            "20-net2.conflist",
        ],
    );
    assert!(out.contains("20-net2.conflist: content differs"), "{out}");

    // Other directory layouts (k3s, OpenShift).
    let other = Host::new();
    ok(
        &other.root,
        &[
            "--source-dir",
            s,
            "--cni-bin-dir",
            "/var/lib/cni/bin",
            "--cni-net-dir",
            "/var/lib/cni/net.d",
        ],
    );
    let names: Vec<_> = snapshot(&other.root)
        .into_iter()
        .map(|(p, _)| p.strip_prefix(&other.root).unwrap().to_path_buf())
        .collect();
    assert_eq!(
        names,
        [
            Path::new("var/lib/cni/bin/trellis-cni"),
            Path::new("var/lib/cni/bin/trellis-ipam"),
            Path::new("var/lib/cni/net.d/10-trellis.conflist"),
        ]
    );

    // Bad flags: a clear error naming the flag, and nothing on the host changes.
    let before = snapshot(&h.root);
    let bad_template = src.path().join("bad.conflist");
    std::fs::write(&bad_template, "{\"cniVersion\": \"1.0.0\", \"name\": \"n\", \"plugins\": [{\"type\": \"trellis-cni\", \"mode\": \"sideways\", \"ipam\": {\"type\": \"trellis-ipam\"}}]}").unwrap();
    let empty = tempfile::tempdir().unwrap();
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec![
                "--source-dir",
                s,
                "--template",
                bad_template.to_str().unwrap(),
            ],
            "--template",
        ),
        (
            vec!["--source-dir", s, "--template", "/nonexistent/t"],
            "--template",
        ),
        (
            vec!["--source-dir", empty.path().to_str().unwrap()],
            "--source-dir",
        ),
        (
            vec!["--source-dir", s, "--conflist-name", "../x.conflist"],
            "--conflist-name",
        ),
        (
            vec!["--source-dir", s, "--cni-bin-dir", "opt/cni/bin"],
            "--cni-bin-dir",
        ),
        (
            vec!["--source-dir", s, "--cni-net-dir", "/etc/../x"],
            "--cni-net-dir",
        ),
    ];
    for (args, flag) in cases {
        let out = failing(&h.root, &args);
        assert!(out.contains(flag), "{args:?}: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    let out = failing(Path::new("/nonexistent-host-root"), &["--source-dir", s]);
    assert!(out.contains("--host-root"), "{out}");
    assert_eq!(snapshot(&h.root), before);
}

/// While installs alternately replace the binary with one of two 8 MiB versions, a reader that
/// keeps reading it sees either no file or one version whole — never a truncated or mixed one
/// (what a kubelet executing the plugin at that moment would run).
#[test]
fn a_reader_never_sees_a_partial_binary() {
    let h = Host::new();
    let versions: Vec<(tempfile::TempDir, Vec<u8>)> = (0u8..2)
        .map(|v| {
            let d = tempfile::tempdir().unwrap();
            let bytes: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8 ^ v).collect();
            std::fs::write(d.path().join("trellis-cni"), &bytes).unwrap();
            (d, bytes)
        })
        .collect();
    let dest = h.bin("trellis-cni");
    let done = Arc::new(AtomicBool::new(false));
    let whole: Vec<Vec<u8>> = versions.iter().map(|(_, b)| b.clone()).collect();
    let reader = {
        let (done, dest) = (done.clone(), dest.clone());
        std::thread::spawn(move || {
            let (mut reads, mut seen) = (0u32, [0u32; 2]);
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(Ordering::Acquire) && Instant::now() < deadline {
                match std::fs::read(&dest) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => panic!("reading {}: {e}", dest.display()),
                    Ok(b) => {
                        let which = whole.iter().position(|w| *w == b);
                        let Some(which) = which else {
                            panic!(
                                "read {} bytes that are neither version whole (after {reads} reads)",
                                b.len()
                            );
                        };
                        seen[which] += 1;
                    }
                }
                reads += 1;
            }
            (reads, seen)
        })
    };
    for i in 0..16 {
        let src = versions[i % 2].0.path().to_str().unwrap();
        let out = ok(&h.root, &["--source-dir", src]);
        assert!(out.contains("wrote"), "install {i}: {out}");
        if reader.is_finished() {
            break;
        }
    }
    done.store(true, Ordering::Release);
    let (reads, seen) = reader.join().expect("the reader saw a partial binary");
    eprintln!("{reads} reads: {seen:?} of each version");
    assert!(
        seen[0] > 0 && seen[1] > 0,
        "the reader did not see both versions ({seen:?}): it tested nothing"
    );
}

/// An install killed (SIGKILL) while it copies the binary — the kill lands while its temporary
/// file is still there, so before the rename — leaves no `trellis-cni`, no link and no conflist
/// (the conflist comes last, so a kubelet never reads one naming a missing binary) and no file
/// a kubelet would load (`.conflist`); `--check` reports the leftover, and the next install
/// removes it and installs whole.
#[test]
fn an_install_killed_mid_copy_leaves_nothing_half_written() {
    let src = tempfile::tempdir().unwrap();
    // Big enough that copying it takes a while (sparse: cheap to make, slow to copy).
    let f = std::fs::File::create(src.path().join("trellis-cni")).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let src_arg = src.path().to_str().unwrap();
    let mut landed = None;
    for attempt in 0..10 {
        let h = Host::new();
        let mut child = std::process::Command::new(bin("trellis"))
            .arg("install-cni")
            .arg("--host-root")
            .arg(&h.root)
            .args(["--source-dir", src_arg])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let bin_dir = h.root.join("opt/cni/bin");
        let temp_of = |d: &Path| -> Option<PathBuf> {
            std::fs::read_dir(d).ok()?.find_map(|e| {
                let p = e.ok()?.path();
                let n = p.file_name()?.to_str()?.to_string();
                n.starts_with(".trellis-cni.trellis-install-").then_some(p)
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while temp_of(&bin_dir).is_none()
            && child.try_wait().unwrap().is_none()
            && Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Where did the kill land? Only a temporary file still there proves "mid-copy".
        match temp_of(&bin_dir) {
            Some(t) if !h.bin("trellis-cni").exists() => {
                landed = Some((h, t));
                break;
            }
            _ => eprintln!("attempt {attempt}: the kill landed after the copy; again"),
        }
    }
    let (h, temp) = landed.expect("no kill landed mid-copy in 10 attempts");
    assert!(std::fs::metadata(&temp).unwrap().len() < 64 << 20);
    assert!(!h.bin("trellis-cni").exists());
    assert!(std::fs::symlink_metadata(h.bin("trellis-ipam")).is_err());
    let net: Vec<_> = std::fs::read_dir(h.root.join("etc/cni/net.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(net.is_empty(), "{net:?}");

    let out = failing(&h.root, &["--check", "--source-dir", src_arg]);
    assert!(
        out.contains("temporary file left by an interrupted install"),
        "{out}"
    );
    let out = ok(&h.root, &["--source-dir", src_arg]);
    assert!(out.contains("removed"), "{out}");
    assert!(!temp.exists());
    assert_eq!(
        std::fs::metadata(h.bin("trellis-cni")).unwrap().len(),
        64 << 20
    );
    assert!(h.net("10-trellis.conflist").is_file());
    assert!(ok(&h.root, &["--check", "--source-dir", src_arg]).contains("up to date"));
}
