//! Locating what a sandbox boots from: the guest kernel, the agent, QEMU, the vsock daemon
//! and virtiofsd, and building the agent's initramfs.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Where `hack/setup.sh` and `kernel/build.sh` install shared artifacts.
pub const SHARE_DIR: &str = "/usr/local/share/agentvm";
/// Cache for derived artifacts (initramfs images, probe results).
pub const CACHE_DIR: &str = "/var/cache/agentvm";

const SETUP_HINT: &str = "run hack/setup.sh from the agentvm checkout";

/// The host files one VM boot needs.
#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: PathBuf,
    pub agent: PathBuf,
    pub qemu: PathBuf,
}

impl Assets {
    /// Finds every asset, or says which one is missing and how to get it.
    pub fn locate() -> Result<Self> {
        Ok(Self {
            kernel: kernel_path()?,
            agent: agent_path()?,
            qemu: qemu_path()?,
        })
    }
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn existing(var: &str, default: PathBuf, what: &str, hint: &str) -> Result<PathBuf> {
    let (path, from_env) = match env_path(var) {
        Some(p) => (p, true),
        None => (default, false),
    };
    if path.is_file() {
        return Ok(path);
    }
    let hint = if from_env {
        format!("${var} points to {}, which is not a file", path.display())
    } else {
        format!("looked for {} ({hint}, or set ${var})", path.display())
    };
    Err(Error::Missing {
        what: what.into(),
        hint,
    })
}

/// The guest kernel: `$AGENTVM_KERNEL`, or the one `kernel/build.sh` installed. The
/// uncompressed `vmlinux` (entered through PVH) is preferred: it skips the decompressor, which
/// is slow under emulation.
pub fn kernel_path() -> Result<PathBuf> {
    let share = Path::new(SHARE_DIR);
    let default = if share.join("vmlinux").is_file() || !share.join("bzImage").is_file() {
        share.join("vmlinux")
    } else {
        share.join("bzImage")
    };
    existing(
        "AGENTVM_KERNEL",
        default,
        "guest kernel",
        "build it with kernel/build.sh or hack/setup.sh",
    )
}

/// The static guest agent: `$AGENTVM_AGENT` or the installed one.
pub fn agent_path() -> Result<PathBuf> {
    existing(
        "AGENTVM_AGENT",
        Path::new(SHARE_DIR).join("agentvm-agent"),
        "guest agent (agentvm-agent)",
        SETUP_HINT,
    )
}

/// Searches `$PATH` (and cargo's install dir, where `cargo install` puts helpers).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env_path("CARGO_HOME") {
        dirs.push(home.join("bin"));
    }
    if let Some(home) = env_path("HOME") {
        dirs.push(home.join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// QEMU: `$AGENTVM_QEMU` or `qemu-system-x86_64` on `$PATH`.
pub fn qemu_path() -> Result<PathBuf> {
    if let Some(p) = env_path("AGENTVM_QEMU") {
        return existing("AGENTVM_QEMU", p, "QEMU", "");
    }
    find_program("qemu-system-x86_64").ok_or_else(|| Error::Missing {
        what: "qemu-system-x86_64".into(),
        hint: "apt-get install qemu-system-x86 (or run hack/install-deps.sh)".into(),
    })
}

/// The vhost-user vsock daemon, needed when the host has no `/dev/vhost-vsock`.
pub fn vhost_vsock_daemon() -> Result<PathBuf> {
    if let Some(p) = env_path("AGENTVM_VHOST_VSOCK") {
        return existing("AGENTVM_VHOST_VSOCK", p, "vhost-device-vsock", "");
    }
    find_program("vhost-device-vsock").ok_or_else(|| Error::Missing {
        what: "vhost-device-vsock".into(),
        hint: "this host has no /dev/vhost-vsock, so agentvm needs the vhost-user vsock daemon: \
               cargo install vhost-device-vsock (or run hack/install-deps.sh)"
            .into(),
    })
}

/// virtiofsd, the daemon behind virtio-fs shares: `$AGENTVM_VIRTIOFSD`, or `virtiofsd` on
/// `$PATH` or in cargo's install dir (hack/install-deps.sh), or Debian's
/// `/usr/libexec/virtiofsd`. Without it shares use virtio-9p.
pub fn virtiofsd() -> Result<PathBuf> {
    if let Some(p) = env_path("AGENTVM_VIRTIOFSD") {
        return existing("AGENTVM_VIRTIOFSD", p, "virtiofsd", "");
    }
    find_program("virtiofsd")
        .or_else(|| {
            let debian = PathBuf::from("/usr/libexec/virtiofsd");
            debian.is_file().then_some(debian)
        })
        .ok_or_else(|| Error::Missing {
            what: "virtiofsd".into(),
            hint: "volumes and bind mounts fall back to virtio-9p (slower on small files): \
                   cargo install virtiofsd (or run hack/install-deps.sh)"
                .into(),
        })
}

/// True when an ELF image runs without a dynamic loader and shared libraries: no program
/// interpreter, and no `DT_NEEDED` library (a static-pie linked against a shared library, as
/// libseccomp-sys makes unless told to link statically, has the first without the second).
/// The agent is PID 1 of an initramfs that holds nothing else, so it must be static.
pub fn elf_is_static(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    const PT_DYNAMIC: u32 = 2;
    const DT_NEEDED: u64 = 1;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
        return false; // not a little-endian ELF64: certainly not a usable agent
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u64_at = |o: usize| {
        elf.get(o..o.saturating_add(8))
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let phoff = u64::from_le_bytes(elf[32..40].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(b) = elf.get(off..off.saturating_add(4)) else {
            return false;
        };
        match u32::from_le_bytes(b.try_into().expect("4 bytes")) {
            PT_INTERP => false,
            PT_DYNAMIC => {
                // p_offset and p_filesz; the entries are (d_tag, d_val) pairs up to DT_NULL.
                let (Some(start), Some(size)) = (u64_at(off + 8), u64_at(off + 32)) else {
                    return false;
                };
                let (start, end) = (start as usize, start.saturating_add(size) as usize);
                (start..end)
                    .step_by(16)
                    .map_while(|e| u64_at(e).filter(|&tag| tag != 0))
                    .all(|tag| tag != DT_NEEDED)
            }
            _ => true,
        }
    })
}

/// The `lib/modules/<release>/` trees kernel/build.sh puts beside the kernel (`modules/`):
/// modules.builtin and depmod's indexes, so that `modprobe` in the guest finds what is built
/// in. Empty when the kernel has none (an older kernel, or one built without CONFIG_MODULES).
pub fn kernel_modules(kernel: &Path) -> Vec<(String, Vec<u8>)> {
    let Some(base) = kernel.parent().map(|d| d.join("modules/lib/modules")) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    let Ok(releases) = std::fs::read_dir(&base) else {
        return files;
    };
    for rel in releases.filter_map(|e| e.ok()) {
        let name = rel.file_name().to_string_lossy().into_owned();
        let Ok(entries) = std::fs::read_dir(rel.path()) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            if !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            if let Ok(bytes) = std::fs::read(e.path()) {
                let file = e.file_name().to_string_lossy().into_owned();
                files.push((format!("lib/modules/{name}/{file}"), bytes));
            }
        }
    }
    files.sort();
    files
}

/// Returns the initramfs holding the agent as `/init` and the kernel's `lib/modules` files
/// ([`kernel_modules`]), building and caching it (keyed by their hash) on first use.
pub fn initramfs_for(agent: &Path, modules: &[(String, Vec<u8>)]) -> Result<PathBuf> {
    let bytes = std::fs::read(agent).map_err(|e| Error::io("read agent", agent, e))?;
    if !elf_is_static(&bytes) {
        return Err(Error::Invalid(format!(
            "{} is not a static ELF binary; the guest has no dynamic loader. Build it with \
             RUSTFLAGS='-C target-feature=+crt-static' (hack/setup.sh does)",
            agent.display()
        )));
    }
    let mut h = Sha256::new();
    h.update(&bytes);
    for (name, data) in modules {
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    let hash = hex(&h.finalize()[..8]);
    let dir = cache_dir().join("initramfs");
    let out = dir.join(format!("agent-{hash}.cpio"));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
    let archive =
        initramfs_archive(&bytes, modules).map_err(|e| Error::io("build initramfs", &out, e))?;
    let tmp = dir.join(format!(".agent-{hash}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&archive)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &out)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("write", &out, e)
    })?;
    Ok(out)
}

/// A newc archive with the directories the agent mounts on, `/dev/console` (the kernel opens
/// it for init's stdio before anything is mounted), the agent as `/init` and the kernel's
/// `lib/modules` files (read-only, 0644).
fn initramfs_archive(agent: &[u8], modules: &[(String, Vec<u8>)]) -> std::io::Result<Vec<u8>> {
    use cpio::newc::ModeFileType;
    use cpio::NewcBuilder;
    let dir = |name: &str| {
        NewcBuilder::new(name)
            .mode(0o755)
            .set_mode_file_type(ModeFileType::Directory)
            .nlink(2)
    };
    let mut entries: Vec<(NewcBuilder, Cursor<Vec<u8>>)> = vec![
        (dir("dev"), Cursor::new(Vec::new())),
        (dir("proc"), Cursor::new(Vec::new())),
        (dir("sys"), Cursor::new(Vec::new())),
        (dir("run"), Cursor::new(Vec::new())),
        (dir("tmp"), Cursor::new(Vec::new())),
        (
            NewcBuilder::new("dev/console")
                .mode(0o600)
                .set_mode_file_type(ModeFileType::Char)
                .rdev_major(5)
                .rdev_minor(1)
                .nlink(1),
            Cursor::new(Vec::new()),
        ),
        (
            NewcBuilder::new("init")
                .mode(0o755)
                .set_mode_file_type(ModeFileType::Regular)
                .nlink(1),
            Cursor::new(agent.to_vec()),
        ),
    ];
    let mut dirs: Vec<String> = Vec::new();
    for (name, data) in modules {
        // Parents first: lib, lib/modules, lib/modules/<release>.
        let mut parent = String::new();
        for part in name
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, d)| d)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if !dirs.contains(&parent) {
                dirs.push(parent.clone());
                entries.push((dir(&parent), Cursor::new(Vec::new())));
            }
        }
        entries.push((
            NewcBuilder::new(name)
                .mode(0o644)
                .set_mode_file_type(ModeFileType::Regular)
                .nlink(1),
            Cursor::new(data.clone()),
        ));
    }
    cpio::write_cpio(entries.into_iter(), Vec::new())
}

/// The cache directory (`$AGENTVM_CACHE` or [`CACHE_DIR`]).
pub fn cache_dir() -> PathBuf {
    env_path("AGENTVM_CACHE").unwrap_or_else(|| PathBuf::from(CACHE_DIR))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads the last `lines` lines of a (console) log, from its last 64 KiB (both halves of a
/// capped log, [`crate::ringlog`]); empty if it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    let buf = crate::ringlog::read_tail(path, 64 << 10);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_elves_are_told_apart() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries are dynamically linked unless built with crt-static.
        let dynamic = !elf_is_static(&me);
        let interp = me.windows(b"ld-linux".len()).any(|w| w == b"ld-linux");
        assert_eq!(dynamic, interp);
        assert!(!elf_is_static(b"#!/bin/sh\necho not an elf\n"));
        assert!(!elf_is_static(&[0x7f, b'E', b'L', b'F']));
    }

    /// An ELF64 header, one PT_DYNAMIC program header and its dynamic entries.
    fn elf_with_dynamic(entries: &[(u64, u64)]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&2u32.to_le_bytes()); // PT_DYNAMIC
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        let size = 16 * (entries.len() as u64 + 1);
        ph[32..40].copy_from_slice(&size.to_le_bytes()); // p_filesz
        elf.extend(ph);
        for &(tag, val) in entries.iter().chain([&(0, 0)]) {
            elf.extend(tag.to_le_bytes());
            elf.extend(val.to_le_bytes());
        }
        elf
    }

    #[test]
    fn a_static_pie_that_needs_a_shared_library_is_not_static() {
        // DT_FLAGS (30) and DT_FLAGS_1 only: a static-pie.
        assert!(elf_is_static(&elf_with_dynamic(&[
            (30, 8),
            (0x6fff_fffb, 1)
        ])));
        // DT_NEEDED (1): libseccomp.so.2 linked into an otherwise static agent.
        assert!(!elf_is_static(&elf_with_dynamic(&[(30, 8), (1, 17)])));
    }

    #[test]
    fn initramfs_holds_init_and_console() {
        let modules = vec![(
            "lib/modules/6.12.0/modules.builtin".to_string(),
            b"kernel/fs/overlayfs/overlay.ko\n".to_vec(),
        )];
        let archive = initramfs_archive(b"\x7fELFagent", &modules).unwrap();
        let mut names = Vec::new();
        let mut rest: &[u8] = &archive;
        loop {
            let r = cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            names.push((
                r.entry().name().to_string(),
                r.entry().mode(),
                r.entry().rdev_major(),
            ));
            rest = r.finish().unwrap();
        }
        assert!(names.contains(&("init".into(), 0o100755, 0)));
        assert!(names.contains(&("dev/console".into(), 0o020600, 5)));
        assert!(names
            .iter()
            .any(|(n, m, _)| n == "proc" && m & 0o170000 == 0o040000));
        let at = |want: &str| names.iter().position(|(n, _, _)| n == want).unwrap();
        assert!(at("lib") < at("lib/modules"));
        assert!(at("lib/modules/6.12.0") < at("lib/modules/6.12.0/modules.builtin"));
        assert!(names.contains(&("lib/modules/6.12.0/modules.builtin".into(), 0o100644, 0)));
    }

    #[test]
    fn tail_returns_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), "c\nd");
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }
}
