//! One host uid per sandbox for its QEMU and vhost-device-vsock.
//!
//! A sandbox's VMM runs as a uid (and gid) of its own, taken from a range no one else uses
//! ([`crate::config::HostConfig::sandbox_uid_base`], [`SANDBOX_UID_COUNT`] of them): a
//! compromised QEMU is then an unprivileged user that owns nothing on the host — it cannot
//! signal or trace another sandbox's processes or any of root's, and reads only what is
//! world-readable of the host's tree (in its jail, that is its program and libraries).
//!
//! The uid is claimed by creating `<state root>/.uids/<n>` exclusively (the state root is a
//! tmpfs: a reboot frees every uid); the file names the sandbox's state dir, and a claim whose
//! state dir is gone (a sandbox killed before its cleanup) is taken back. Dropping the
//! [`SandboxUser`] frees the uid.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::config::SANDBOX_UID_COUNT;
use crate::error::{Error, Result};

/// A claimed sandbox uid; the gid has the same number.
#[derive(Debug)]
pub struct SandboxUser {
    pub uid: u32,
    claim: PathBuf,
}

impl SandboxUser {
    /// Claims a free uid of `[base, base + count)` for the sandbox whose state dir is
    /// `state_dir`, starting at a slot derived from its name (so the same sandbox tends to get
    /// the same uid).
    pub fn claim(claims: &Path, base: u32, count: u32, state_dir: &Path) -> Result<SandboxUser> {
        std::fs::create_dir_all(claims).map_err(|e| Error::io("create", claims, e))?;
        sweep(claims);
        let count = count.clamp(1, SANDBOX_UID_COUNT);
        let start = fnv1a(state_dir.as_os_str().as_bytes()) % count;
        for i in 0..count {
            let slot = (start + i) % count;
            let claim = claims.join(slot.to_string());
            for _ in 0..2 {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&claim)
                {
                    Ok(mut f) => {
                        f.write_all(state_dir.as_os_str().as_bytes())
                            .map_err(|e| Error::io("write", &claim, e))?;
                        return Ok(SandboxUser {
                            uid: base + slot,
                            claim,
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        // Taken, unless its sandbox is gone: then take it back once.
                        let owner = std::fs::read(&claim).unwrap_or_default();
                        let owner = Path::new(std::ffi::OsStr::from_bytes(&owner));
                        if owner.as_os_str().is_empty() || owner.exists() {
                            break;
                        }
                        let _ = std::fs::remove_file(&claim);
                    }
                    Err(e) => return Err(Error::io("create", &claim, e)),
                }
            }
        }
        Err(Error::Invalid(format!(
            "all {count} sandbox uids are in use (claims in {}): too many sandboxes at once",
            claims.display()
        )))
    }

    /// The gid of the sandbox (the same number as its uid).
    pub fn gid(&self) -> u32 {
        self.uid
    }
}

impl Drop for SandboxUser {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.claim);
    }
}

/// Frees every uid claimed for the sandbox whose state dir is `state_dir` (its end, however
/// it came: a killed shim never drops its [`SandboxUser`]).
pub fn release_claims_of(claims: &Path, state_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(claims) else {
        return;
    };
    for e in entries.flatten() {
        if std::fs::read(e.path()).is_ok_and(|owner| owner == state_dir.as_os_str().as_bytes()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Removes the claims whose sandbox is gone (a claim being written, still empty, stays).
fn sweep(claims: &Path) {
    let Ok(entries) = std::fs::read_dir(claims) else {
        return;
    };
    for e in entries.flatten() {
        let Ok(owner) = std::fs::read(e.path()) else {
            continue;
        };
        if !owner.is_empty() && !Path::new(std::ffi::OsStr::from_bytes(&owner)).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The claims whose sandbox is still there.
pub fn live_claims(claims: &Path) -> usize {
    std::fs::read_dir(claims)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read(e.path()).is_ok_and(|o| {
                        !o.is_empty() && Path::new(std::ffi::OsStr::from_bytes(&o)).exists()
                    })
                })
                .count()
        })
        .unwrap_or(0)
}

/// FNV-1a, 32 bits: a stable spread of state dir names over the slots.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sandbox_gets_its_own_uid_and_gives_it_back() {
        let t = tempfile::tempdir().unwrap();
        let claims = t.path().join(".uids");
        let dirs: Vec<PathBuf> = (0..3).map(|i| t.path().join(format!("sb{i}"))).collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        // Three slots for three sandboxes: all different, all in range.
        let users: Vec<SandboxUser> = dirs
            .iter()
            .map(|d| SandboxUser::claim(&claims, 5000, 3, d).unwrap())
            .collect();
        let mut uids: Vec<u32> = users.iter().map(|u| u.uid).collect();
        uids.sort();
        assert_eq!(uids, [5000, 5001, 5002]);
        // A fourth finds none, and says so.
        let extra = t.path().join("sb3");
        std::fs::create_dir(&extra).unwrap();
        let e = SandboxUser::claim(&claims, 5000, 3, &extra).unwrap_err();
        assert!(
            e.to_string().contains("all 3 sandbox uids are in use"),
            "{e}"
        );
        // They end: their uids are free again.
        drop(users);
        let again = SandboxUser::claim(&claims, 5000, 3, &extra).unwrap();
        assert!((5000..5003).contains(&again.uid));
    }

    #[test]
    fn a_sandboxs_end_releases_its_claim_and_only_its() {
        let t = tempfile::tempdir().unwrap();
        let claims = t.path().join(".uids");
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let ua = SandboxUser::claim(&claims, 9000, 8, &a).unwrap();
        let ub = SandboxUser::claim(&claims, 9000, 8, &b).unwrap();
        assert_eq!(live_claims(&claims), 2);
        // `a`'s owner dies without dropping its claim; its state goes.
        std::mem::forget(ua);
        std::fs::remove_dir(&a).unwrap();
        assert_eq!(live_claims(&claims), 1);
        release_claims_of(&claims, &a);
        assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 1);
        // Stale claims are swept by the next claim.
        let gone = t.path().join("gone");
        std::fs::write(claims.join("5"), gone.as_os_str().as_encoded_bytes()).unwrap();
        let c = t.path().join("c");
        std::fs::create_dir(&c).unwrap();
        let uc = SandboxUser::claim(&claims, 9000, 8, &c).unwrap();
        assert!(!claims.join("5").exists() || uc.uid == 9005);
        drop(uc);
        drop(ub);
        assert_eq!(std::fs::read_dir(&claims).unwrap().count(), 0);
    }

    #[test]
    fn a_claim_whose_sandbox_is_gone_is_taken_back() {
        let t = tempfile::tempdir().unwrap();
        let claims = t.path().join(".uids");
        let (gone, live) = (t.path().join("gone"), t.path().join("live"));
        std::fs::create_dir(&gone).unwrap();
        std::fs::create_dir(&live).unwrap();
        let stale = SandboxUser::claim(&claims, 7000, 1, &gone).unwrap();
        // The sandbox was killed before its cleanup: the claim stays, its state dir goes.
        std::mem::forget(stale);
        std::fs::remove_dir(&gone).unwrap();
        let u = SandboxUser::claim(&claims, 7000, 1, &live).unwrap();
        assert_eq!(u.uid, 7000);
        // A claim whose sandbox lives is never taken.
        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        assert!(SandboxUser::claim(&claims, 7000, 1, &other).is_err());
    }
}
