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
