//! `agentvm check`: what this host has and lacks, and what to do about each.

use std::path::Path;

use crate::accel;
use crate::assets::{self, Assets};

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
    out
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
