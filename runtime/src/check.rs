//! `agentvm check`: what this host has and lacks, and what to do about each.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::accel::{self, AccelChoice};
use crate::assets::{self, Assets};
use crate::error::{Error, Result};

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub item: &'static str,
    pub ok: bool,
    /// Whether agentvm can run without it.
    pub required: bool,
    pub detail: String,
}

fn finding(item: &'static str, required: bool, r: Result<String, String>) -> Finding {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(d) => (false, d),
    };
    Finding {
        item,
        ok,
        required,
        detail,
    }
}

/// Collects the findings. With `probe`, boots a test VM under KVM to tell whether it works.
pub async fn check(probe: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let qemu = assets::qemu_path();
    out.push(finding(
        "qemu",
        true,
        match &qemu {
            Ok(p) => qemu_version(p).map(|v| format!("{v} ({})", p.display())),
            Err(e) => Err(e.to_string()),
        },
    ));
    out.push(finding(
        "kernel",
        true,
        assets::kernel_path()
            .map(|p| describe_file(&p))
            .map_err(|e| e.to_string()),
    ));
    out.push(finding(
        "agent",
        true,
        assets::agent_path()
            .map_err(|e| e.to_string())
            .and_then(|p| {
                let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                if assets::elf_is_static(&bytes) {
                    Ok(describe_file(&p))
                } else {
                    Err(format!(
                        "{} is not a static binary: rebuild with hack/setup.sh",
                        p.display()
                    ))
                }
            }),
    ));
    let vhost = Path::new("/dev/vhost-vsock").exists();
    out.push(finding(
        "vhost-vsock",
        false,
        if vhost {
            Ok("/dev/vhost-vsock present: in-kernel vsock".into())
        } else {
            Err("no /dev/vhost-vsock (modprobe vhost_vsock to get it); the vhost-user daemon is used instead".into())
        },
    ));
    out.push(finding(
        "vhost-device-vsock",
        !vhost,
        assets::vhost_vsock_daemon()
            .map(|p| p.display().to_string())
            .map_err(|e| e.to_string()),
    ));
    out.push(finding(
        "virtiofsd",
        false,
        assets::virtiofsd()
            .map(|p| format!("{}: volumes and bind mounts use virtio-fs", p.display()))
            .map_err(|e| e.to_string()),
    ));
    let kvm = match accel::kvm_device_usable() {
        Err(e) => Err(format!("{e}; VMs run under TCG emulation (slow)")),
        Ok(()) if !probe => match Assets::locate().ok().and_then(|a| accel::cached(&a)) {
            Some(v) if v.kvm_usable => Ok(v.reason),
            Some(v) => Err(format!(
                "{} (cached probe); VMs run under TCG emulation (slow)",
                v.reason
            )),
            None => Ok("/dev/kvm answers; run `agentvm check --probe` to test a boot".into()),
        },
        Ok(()) => match Assets::locate() {
            Err(e) => Err(format!("cannot probe: {e}")),
            Ok(a) => match accel::probe(&a).await {
                Ok(v) if v.kvm_usable => Ok(v.reason),
                Ok(v) => Err(format!("{}; VMs run under TCG emulation (slow)", v.reason)),
                Err(e) => Err(format!("probe failed: {e}")),
            },
        },
    };
    out.push(finding("kvm", false, kvm));
    let tcg = match crate::config::HostConfig::load() {
        Ok(c) if c.allow_tcg => Ok(format!(
            "allowed ({}): containers run under TCG where KVM is not usable (test and \
             development only)",
            crate::config::path().display()
        )),
        Ok(_) => Err(format!(
            "containers need KVM: the shim refuses TCG emulation unless allow_tcg = true is in \
             {} (`agentvm install --allow-tcg`, for test and development hosts); `agentvm run` \
             still uses TCG",
            crate::config::path().display()
        )),
        Err(e) => Err(e.to_string()),
    };
    out.push(finding("tcg", false, tcg));
    out.push(finding(
        "egress",
        false,
        match crate::egress::nft_program() {
            Some(p) => Ok(format!(
                "nftables ({}): egress policies can be enforced (docs/security.md)",
                p.display()
            )),
            None => Err(
                "no nft: only the open egress policy is possible, and a container that names \
                 another fails to start (apt-get install nftables)"
                    .into(),
            ),
        },
    ));
    out.push(finding(
        "sandbox-uids",
        false,
        crate::config::HostConfig::load()
            .map(|c| sandbox_uids_line(c.sandbox_uid_base(), &crate::sandbox::state_root()))
            .map_err(|e| e.to_string()),
    ));
    out
}

/// The sandboxes' uid range and how many are claimed now.
fn sandbox_uids_line(base: u32, state_root: &Path) -> String {
    let claimed = crate::sandboxuser::live_claims(&state_root.join(".uids"));
    format!(
        "QEMU and its vsock helper run as uids {base}..{} (sandbox_uid_base in {}; keep \
         them free of other users), {claimed} in use",
        u64::from(base) + u64::from(crate::config::SANDBOX_UID_COUNT) - 1,
        crate::config::path().display()
    )
}

fn describe_file(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => format!("{} ({} KiB)", p.display(), m.len() / 1024),
        Err(_) => p.display().to_string(),
    }
}

fn qemu_version(p: &Path) -> Result<String, String> {
    let out = std::process::Command::new(p)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", p.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("").trim().to_string();
    let ok = std::process::Command::new(p)
        .args(["-M", "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("microvm"))
        .unwrap_or(false);
    if ok {
        Ok(first)
    } else {
        Err(format!(
            "{first}: this QEMU lacks the microvm machine type; install Debian's qemu-system-x86"
        ))
    }
}

/// The static syscall probe (`agentvm-syscall-probe`, from the `probe/` crate):
/// `$AGENTVM_SYSCALL_PROBE`, or the one hack/setup.sh installs.
pub fn syscall_probe_path() -> Result<PathBuf> {
    let p = std::env::var_os("AGENTVM_SYSCALL_PROBE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(assets::SHARE_DIR).join("agentvm-syscall-probe"));
    if p.is_file() {
        Ok(p)
    } else {
        Err(Error::Missing {
            what: "agentvm-syscall-probe".into(),
            hint: format!(
                "looked for {} (hack/setup.sh builds and installs it, or set \
                 $AGENTVM_SYSCALL_PROBE)",
                p.display()
            ),
        })
    }
}

/// A tiny ext4 root holding only the probe (as `/agentvm-syscall-probe`) and the directories
/// the agent mounts on, cached by the probe's hash under the cache dir.
pub fn probe_rootfs(probe: &Path) -> Result<PathBuf> {
    let bytes = std::fs::read(probe).map_err(|e| Error::io("read", probe, e))?;
    if !assets::elf_is_static(&bytes) {
        return Err(Error::Invalid(format!(
            "{} is not a static binary (build it with RUSTFLAGS=\"-C target-feature=+crt-static\")",
            probe.display()
        )));
    }
    let key = assets::hex(&Sha256::digest(&bytes)[..8]);
    let dir = assets::cache_dir().join("guest-check");
    let out = dir.join(format!("probe-{key}.ext4"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let stage = tempfile_dir(&dir)?;
    let build = || -> std::io::Result<()> {
        for d in ["proc", "sys", "dev", "run", "tmp", "etc"] {
            std::fs::create_dir(stage.join(d))?;
        }
        // The landlock workload reads /etc/passwd before and after restricting itself.
        std::fs::write(
            stage.join("etc/passwd"),
            "root:x:0:0:root:/:/agentvm-syscall-probe\n",
        )?;
        let dst = stage.join("agentvm-syscall-probe");
        std::fs::write(&dst, &bytes)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    };
    let tmp = out.with_extension("ext4.tmp");
    let result = build()
        .map_err(|e| Error::io("stage", &stage, e))
        .and_then(|()| {
            let mkfs = assets::find_program("mkfs.ext4")
                .or_else(|| {
                    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.is_file())
                })
                .ok_or_else(|| Error::Missing {
                    what: "mkfs.ext4".into(),
                    hint: "apt-get install e2fsprogs".into(),
                })?;
            let size_mib = bytes.len() / (1 << 20) + 8;
            let status = std::process::Command::new(&mkfs)
                .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-d"])
                .arg(&stage)
                .arg(&tmp)
                .arg(format!("{size_mib}M"))
                .stdout(std::process::Stdio::null())
                .status()
                .map_err(|e| Error::Spawn {
                    program: mkfs.display().to_string(),
                    source: e,
                })?;
            if !status.success() {
                return Err(Error::Invalid(format!("mkfs.ext4 failed ({status})")));
            }
            std::fs::rename(&tmp, &out).map_err(|e| Error::io("rename", &tmp, e))
        });
    let _ = std::fs::remove_dir_all(&stage);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| out)
}

fn tempfile_dir(parent: &Path) -> Result<PathBuf> {
    let p = parent.join(format!(".stage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir(&p).map_err(|e| Error::io("create", &p, e))?;
    Ok(p)
}

/// `agentvm check --guest`: boots a VM from [`probe_rootfs`] and runs `agentvm-syscall-probe
/// all` in it (every syscall Docker's default seccomp profile allows, then the timer, madvise,
/// process_vm_readv and Landlock workloads). Its report goes to stdout; returns its exit status.
pub async fn guest(accel: AccelChoice) -> Result<i32> {
    let probe = syscall_probe_path()?;
    let rootfs = probe_rootfs(&probe)?;
    let opts = crate::run::RunOptions {
        rootfs,
        process: agentvm_protocol::ProcessSpec {
            args: vec!["/agentvm-syscall-probe".into(), "all".into()],
            cwd: "/".into(),
            ..Default::default()
        },
        interactive: false,
        memory_mib: crate::run::DEFAULT_MEMORY_MIB,
        vcpus: crate::run::DEFAULT_VCPUS,
        accel,
        boot_timeout: Duration::from_secs(120),
        icount: false,
        debug: false,
        secrets: Vec::new(),
    };
    crate::run::run(opts).await
}

/// Formats the report; returns it and whether everything required is present.
pub fn render(findings: &[Finding]) -> (String, bool) {
    let mut text = String::new();
    let mut ready = true;
    for f in findings {
        let mark = match (f.ok, f.required) {
            (true, _) => "ok     ",
            (false, true) => "MISSING",
            (false, false) => "note   ",
        };
        if !f.ok && f.required {
            ready = false;
        }
        text.push_str(&format!("{mark} {:<19} {}\n", f.item, f.detail));
    }
    text.push_str(if ready {
        "agentvm can run VMs on this host.\n"
    } else {
        "agentvm cannot run VMs yet: fix the MISSING lines (hack/setup.sh installs everything).\n"
    });
    (text, ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sandbox_uid_range_and_its_claims_are_reported() {
        let t = tempfile::tempdir().unwrap();
        let line = sandbox_uids_line(5000, t.path());
        assert!(
            line.contains("uids 5000..70535") && line.ends_with("0 in use"),
            "{line}"
        );
        std::fs::create_dir(t.path().join(".uids")).unwrap();
        let live = t.path().join("live");
        std::fs::create_dir(&live).unwrap();
        std::fs::write(
            t.path().join(".uids/7"),
            live.as_os_str().as_encoded_bytes(),
        )
        .unwrap();
        // A claim whose sandbox is gone counts for nothing.
        std::fs::write(t.path().join(".uids/8"), "/run/agentvm/gone").unwrap();
        assert!(sandbox_uids_line(5000, t.path()).ends_with("1 in use"));
    }

    #[test]
    fn render_marks_required_gaps() {
        let f = vec![
            finding("qemu", true, Ok("QEMU 7.2".into())),
            finding("kvm", false, Err("no kvm".into())),
        ];
        let (text, ready) = render(&f);
        assert!(ready);
        assert!(text.contains("ok      qemu"));
        assert!(text.contains("note    kvm"));
        let f = vec![finding("kernel", true, Err("not found".into()))];
        let (text, ready) = render(&f);
        assert!(!ready);
        assert!(text.contains("MISSING kernel"));
    }
}
