//! Choosing KVM or TCG. KVM is used only when it demonstrably boots our guest: some hosts
//! expose a `/dev/kvm` whose hypervisor hangs standard kernels, so its presence proves nothing.
//! The probe boots the real kernel and agent once under KVM and caches the verdict per host
//! boot, kernel and QEMU.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::assets::{self, Assets};
use crate::error::{Error, Result};
use crate::sandbox::{new_id, Sandbox, SandboxConfig};
use crate::vmm::Accel;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" | "" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(Error::Invalid(format!(
                "unknown accelerator {other:?}: use auto, kvm or tcg"
            ))),
        }
    }
}

/// The decision and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub kvm_usable: bool,
    pub reason: String,
    key: String,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves `choice` to an accelerator. `Auto` uses the cached probe, running it if needed.
/// The returned string, when present, is a warning for the user.
pub async fn resolve(choice: AccelChoice, assets: &Assets) -> Result<(Accel, Option<String>)> {
    if let Some(v) = std::env::var_os("AGENTVM_ACCEL") {
        if choice == AccelChoice::Auto {
            let forced: AccelChoice = v.to_string_lossy().parse()?;
            if forced != AccelChoice::Auto {
                return Box::pin(resolve(forced, assets)).await;
            }
        }
    }
    match choice {
        AccelChoice::Kvm => Ok((Accel::Kvm, None)),
        AccelChoice::Tcg => Ok((Accel::Tcg, None)),
        AccelChoice::Auto => {
            let v = probe(assets).await?;
            if v.kvm_usable {
                Ok((Accel::Kvm, None))
            } else {
                Ok((
                    Accel::Tcg,
                    Some(format!(
                        "KVM is not usable ({}); running under TCG software emulation, which is \
                         many times slower",
                        v.reason
                    )),
                ))
            }
        }
    }
}

fn probe_key(assets: &Assets) -> String {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .map(|m| format!("{}:{}", m.size(), m.mtime()))
            .unwrap_or_default()
    };
    format!(
        "{}|{}|{}|{}",
        boot_id.trim(),
        stamp(&assets.kernel),
        stamp(&assets.qemu),
        stamp(&assets.agent)
    )
}

/// The verdict recorded by an earlier probe for this host boot, kernel, agent and QEMU.
pub fn cached(assets: &Assets) -> Option<Verdict> {
    let text = std::fs::read_to_string(assets::cache_dir().join("accel-probe.json")).ok()?;
    let v: Verdict = serde_json::from_str(&text).ok()?;
    (v.key == probe_key(assets)).then_some(v)
}

/// Returns the cached verdict for this host boot, kernel and QEMU, or probes.
pub async fn probe(assets: &Assets) -> Result<Verdict> {
    if let Err(reason) = kvm_device_usable() {
        return Ok(Verdict {
            kvm_usable: false,
            reason,
            key: String::new(),
        });
    }
    let key = probe_key(assets);
    let dir = assets::cache_dir();
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let cache = dir.join("accel-probe.json");
    // One probe at a time: parallel first runs wait for the first verdict.
    let lock_path = dir.join("accel-probe.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::io("open", &lock_path, e))?;
    let _lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
    })
    .await
    .map_err(|e| Error::Invalid(format!("probe lock task: {e}")))?
    .map_err(|(_, e)| Error::io("lock", &lock_path, e.into()))?;
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok(v) = serde_json::from_str::<Verdict>(&text) {
            if v.key == key {
                return Ok(v);
            }
        }
    }
    let cfg = SandboxConfig {
        id: format!("kvm-probe-{}", new_id()),
        disks: Vec::new(),
        shares: Vec::new(),
        nics: Vec::new(),
        netns: None,
        memory_mib: 256,
        vcpus: 1,
        accel: Accel::Kvm,
        boot_timeout: PROBE_TIMEOUT,
        icount: false,
        debug: false,
    };
    let started = std::time::Instant::now();
    let verdict = match Sandbox::boot(&cfg, assets).await {
        Ok((sandbox, _conn)) => {
            sandbox.destroy(Duration::ZERO).await;
            Verdict {
                kvm_usable: true,
                reason: format!("guest booted under KVM in {:?}", started.elapsed()),
                key,
            }
        }
        Err(e) => Verdict {
            kvm_usable: false,
            reason: format!(
                "a test boot under KVM failed: {}",
                e.to_string().lines().next().unwrap_or_default()
            ),
            key,
        },
    };
    let tmp = dir.join(format!(
        ".accel-probe.{}.{}",
        std::process::id(),
        UNIX_EPOCH.elapsed().map(|d| d.as_nanos()).unwrap_or(0)
    ));
    let json = serde_json::to_string_pretty(&verdict).expect("verdict serializes");
    if std::fs::write(&tmp, json).is_ok() {
        let _ = std::fs::rename(&tmp, &cache);
    }
    Ok(verdict)
}

/// Checks that /dev/kvm can be opened and answers KVM_GET_API_VERSION.
pub fn kvm_device_usable() -> std::result::Result<(), String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd is valid
    // for the duration of the call.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v != 12 {
        return Err(format!("/dev/kvm answered API version {v}, expected 12"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_choice_parses() {
        assert_eq!("kvm".parse::<AccelChoice>().unwrap(), AccelChoice::Kvm);
        assert_eq!("tcg".parse::<AccelChoice>().unwrap(), AccelChoice::Tcg);
        assert_eq!("auto".parse::<AccelChoice>().unwrap(), AccelChoice::Auto);
        assert!("hvf".parse::<AccelChoice>().is_err());
    }
}
