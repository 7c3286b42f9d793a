//! Test support.

use std::sync::{Mutex, MutexGuard};

static CHILDREN: Mutex<()> = Mutex::new(());

/// Serializes tests that spawn and reap children: a reaper waits for any child, so two at
/// once in one test process would steal each other's statuses.
pub fn child_lock() -> MutexGuard<'static, ()> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a test that needs root (`chroot`, mounts, namespaces) can run: without root it
/// prints why it skips; under CI (`AGENTVM_REQUIRE_VM=1`) it fails instead.
pub fn as_root(test: &str, why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("AGENTVM_REQUIRE_VM").as_deref() != Ok("1"),
        "{test}: needs root for {why} (AGENTVM_REQUIRE_VM=1 forbids skipping)"
    );
    eprintln!("SKIP {test}: needs root for {why}");
    false
}

/// Runs `f` in a forked child and returns its exit code (`f`'s return value). `f` runs
/// between `fork` and `_exit` in a copy of a multi-threaded process: it must not allocate or
/// take locks (prepare everything before).
pub fn in_child(f: impl FnOnce() -> i32) -> i32 {
    let _children = child_lock();
    // SAFETY: the child only runs `f`, which the caller keeps to async-signal-safe calls,
    // and leaves with `_exit`, never returning into the test harness.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            let code = f();
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, 0) };
            assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
            assert!(
                libc::WIFEXITED(status),
                "the child did not exit: status {status:#x}"
            );
            libc::WEXITSTATUS(status)
        }
    }
}
