//! Test support.

use std::sync::{Mutex, MutexGuard};

static CHILDREN: Mutex<()> = Mutex::new(());

/// Serializes tests that spawn and reap children: a reaper waits for any child, so two at
/// once in one test process would steal each other's statuses.
pub fn child_lock() -> MutexGuard<'static, ()> {
    CHILDREN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the tests run as root (needed for `chroot`); tests that need it print why they skip.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}
