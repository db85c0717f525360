//! Work a verb finishes after the runtime has its answer: deleting host-side links, whose
//! unregistration waits for an RCU grace period. The links are already down (so routes
//! through them are gone) when they are queued. After the result is written, the process forks;
//! the child detaches (new session, stdio on /dev/null so the runtime's pipes close) and
//! deletes the links by index — never by name, so a new interface of the same name created
//! meanwhile is safe. If the child never runs, the down links are removed with the pod's
//! namespace or by the next ADD of the same attachment.

use std::sync::Mutex;

use trellis_dataplane::Netlink;

static LINKS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Queues the link with this index (in the plugin's namespace) for deletion.
pub fn delete_link(index: u32) {
    LINKS.lock().unwrap_or_else(|p| p.into_inner()).push(index);
}

/// Deletes queued links now, in this process (used by tests and when forking fails).
pub fn run_now() {
    let links: Vec<u32> = std::mem::take(&mut *LINKS.lock().unwrap_or_else(|p| p.into_inner()));
    if links.is_empty() {
        return;
    }
    match Netlink::open() {
        Ok(mut nl) => {
            for index in links {
                if let Err(e) = nl.delete_link_index(index) {
                    tracing::warn!(index, error = %e, "deferred link deletion failed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "deferred link deletion: cannot open netlink"),
    }
}

/// Forks a detached child that deletes the queued links; the parent returns at once. Call only
/// after the result has been written and while the process is single-threaded.
pub fn run_detached() {
    if LINKS.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
        return;
    }
    // SAFETY: called from the single-threaded CLI entry point after all work is done; the
    // child only makes plain system calls before exiting.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let _ = nix::unistd::setsid();
            if let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            {
                use std::os::fd::AsRawFd;
                for fd in 0..3 {
                    // SAFETY: plain dup2 onto the standard descriptors.
                    unsafe { libc::dup2(null.as_raw_fd(), fd) };
                }
            }
            run_now();
            // SAFETY: leave without running the parent's destructors or atexit handlers.
            unsafe { libc::_exit(0) };
        }
        Ok(nix::unistd::ForkResult::Parent { .. }) => {}
        Err(_) => run_now(),
    }
}
