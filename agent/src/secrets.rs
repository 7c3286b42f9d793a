//! The container's secrets, as the host decrypted and sent them in the init's start request:
//! files on a tmpfs of their own at [`SECRETS_DIR`] in the container root (never on the
//! container's writable layer, which the host's engine stores), and environment variables
//! added to every process of the container.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use agentvm_protocol::{MountSource, MountSpec, ProcessSpec, SecretSpec, SECRETS_DIR};
use nix::mount::{mount, MsFlags};
use zeroize::Zeroize;

use crate::mounts;

/// Why the secrets could not be put in place.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets: {0}")]
    Mount(#[from] mounts::MountError),
    #[error("secret {name}: {action}: {source}")]
    Io {
        name: String,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("secret {0:?}: not a valid file name")]
    BadName(String),
}

/// The tmpfs holding the files: small (the host caps the values at 256 KiB together), no
/// devices, set-uid or executables.
const TMPFS_OPTIONS: &str = "nosuid,nodev,noexec,size=1m,mode=0755";

/// Mounts a tmpfs on [`SECRETS_DIR`] in `root` (through `mounts`, which resolves the path
/// inside the root and makes the mount point), writes each file secret there with mode 0400
/// owned by `uid`:`gid`, then makes the tmpfs read-only. Nothing is mounted when no secret is
/// a file. `files` is where the mount helpers keep copied files (unused by a tmpfs).
pub fn install(
    secrets: &[SecretSpec],
    root: &str,
    files: &str,
    uid: u32,
    gid: u32,
) -> Result<(), SecretsError> {
    let wanted: Vec<&SecretSpec> = secrets.iter().filter(|s| s.file).collect();
    if wanted.is_empty() {
        return Ok(());
    }
    for s in &wanted {
        if !valid_name(&s.name) {
            return Err(SecretsError::BadName(s.name.clone()));
        }
    }
    let spec = MountSpec {
        destination: SECRETS_DIR.into(),
        source: MountSource::Tmpfs {
            options: Some(TMPFS_OPTIONS.into()),
        },
        readonly: false,
    };
    mounts::apply_with_files(std::slice::from_ref(&spec), root, files)?;
    let dir = mounts::resolve_in_root(Path::new(root), SECRETS_DIR).map_err(|source| {
        SecretsError::Io {
            name: SECRETS_DIR.into(),
            action: "resolve",
            source,
        }
    })?;
    for s in wanted {
        write_one(&dir.join(&s.name), s, uid, gid)?;
    }
    let ro = MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount(None::<&str>, &dir, None::<&str>, ro, None::<&str>).map_err(|e| SecretsError::Io {
        name: SECRETS_DIR.into(),
        action: "make read-only",
        source: std::io::Error::from_raw_os_error(e as i32),
    })
}

fn write_one(path: &Path, s: &SecretSpec, uid: u32, gid: u32) -> Result<(), SecretsError> {
    let err = |action, source| SecretsError::Io {
        name: s.name.clone(),
        action,
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| err("create", e))?;
    f.write_all(s.value.as_bytes())
        .map_err(|e| err("write", e))?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(|e| err("chown", e))
}

/// A file name the host could have sent (it checks names the same way).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The secrets a process of the container gets as environment variables.
pub fn env_only(secrets: &[SecretSpec]) -> Vec<SecretSpec> {
    secrets.iter().filter(|s| s.env).cloned().collect()
}

/// `process` with the env secrets set (replacing a variable of the same name). The caller
/// zeroes the copy with [`scrub`] once the process is planned.
pub fn with_env(process: &ProcessSpec, secrets: &[SecretSpec]) -> ProcessSpec {
    let mut p = process.clone();
    if secrets.is_empty() {
        return p;
    }
    p.env.retain(|e| {
        let name = e.split_once('=').map_or(e.as_str(), |(n, _)| n);
        !secrets.iter().any(|s| s.name == name)
    });
    for s in secrets {
        // The host sends env secrets as UTF-8 without NUL; anything else is dropped here.
        if let Ok(v) = std::str::from_utf8(s.value.as_bytes()) {
            p.env.push(format!("{}={v}", s.name));
        }
    }
    p
}

/// Zeroes the environment of a copy made by [`with_env`].
pub fn scrub(mut process: ProcessSpec) {
    for e in &mut process.env {
        e.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentvm_protocol::SecretValue;
    use std::os::unix::fs::MetadataExt;

    fn secret(name: &str, value: &str, file: bool, env: bool) -> SecretSpec {
        SecretSpec {
            name: name.into(),
            value: SecretValue::new(value.as_bytes().to_vec()),
            file,
            env,
        }
    }

    #[test]
    fn env_secrets_replace_variables_of_their_name() {
        let mut p = ProcessSpec {
            args: vec!["true".into()],
            env: vec![
                "PATH=/bin".into(),
                "TOKEN=from-image".into(),
                "TOKENX=1".into(),
            ],
            ..Default::default()
        };
        let all = [
            secret("TOKEN", "s3cret", false, true),
            secret("FILE_ONLY", "f", true, false),
        ];
        let env = env_only(&all);
        assert_eq!(env.len(), 1);
        let with = with_env(&p, &env);
        assert_eq!(with.env, ["PATH=/bin", "TOKENX=1", "TOKEN=s3cret"]);
        scrub(with);
        p.env.clear();
        assert_eq!(with_env(&p, &[]).env, Vec::<String>::new());
    }

    #[test]
    fn hostile_names_are_refused_before_anything_is_mounted() {
        for bad in ["../x", "a/b", ".", "..", "", "-x"] {
            let e = install(&[secret(bad, "v", true, false)], "/nonexistent", "/f", 0, 0);
            assert!(matches!(e, Err(SecretsError::BadName(_))), "{bad:?}: {e:?}");
        }
        // No file secret: nothing to do, nothing touched.
        install(&[secret("E", "v", false, true)], "/nonexistent", "/f", 0, 0).unwrap();
    }

    /// A real tmpfs in a scratch root: files 0400 of the given owner, the tmpfs read-only,
    /// nothing written to the root's own directory. Needs root for mount(2).
    #[test]
    fn files_land_on_a_read_only_tmpfs_in_the_root() {
        if !crate::testutil::as_root("files_land_on_a_read_only_tmpfs_in_the_root", "mount(2)") {
            return;
        }
        let tmp = std::env::temp_dir().join(format!("agentvm-secrets-{}", std::process::id()));
        let root = tmp.join("root");
        std::fs::create_dir_all(root.join("run")).unwrap();
        let r = root.to_str().unwrap();
        let result = install(
            &[
                secret("API_KEY", "sk-123", true, false),
                secret("ENV_ONLY", "e", false, true),
            ],
            r,
            tmp.join("files").to_str().unwrap(),
            1000,
            1001,
        );
        let dir = root.join("run/secrets");
        let checks = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            result.unwrap();
            let f = dir.join("API_KEY");
            assert_eq!(std::fs::read_to_string(&f).unwrap(), "sk-123");
            let m = std::fs::metadata(&f).unwrap();
            assert_eq!((m.mode() & 0o7777, m.uid(), m.gid()), (0o400, 1000, 1001));
            assert!(!dir.join("ENV_ONLY").exists());
            let e = std::fs::write(dir.join("new"), "x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS));
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            let needle = format!(" {} ", dir.display());
            let line = mountinfo.lines().find(|l| l.contains(&needle)).unwrap();
            assert!(line.contains("tmpfs") && line.contains("ro,"), "{line}");
        }));
        let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
        // Under the tmpfs, the root's own directory holds nothing.
        let under: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        let _ = std::fs::remove_dir_all(&tmp);
        if let Err(p) = checks {
            std::panic::resume_unwind(p);
        }
        assert!(under.is_empty(), "{under:?}");
    }
}
