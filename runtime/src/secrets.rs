//! Secrets: values kept encrypted on the host and handed to a container's VM only when its
//! annotations ask for them by name.
//!
//! The store is a directory ([`DEFAULT_DIR`], mode 0700) with one file per secret, named as
//! the secret: [`MAGIC`], a random 96-bit nonce, then the AES-256-GCM ciphertext and tag of
//! the value. The secret's name is the associated data, so a file renamed or copied to
//! another name fails to decrypt instead of handing one secret's value out under the other's
//! name. The key is 32 random bytes in a file of its own ([`DEFAULT_KEY`]), made on the first
//! `set`, owned by the user running agentvm (root) with mode 0600; a key file that others
//! could read or that someone else owns is refused. Files are written to a temporary name
//! and renamed into place, so a reader never sees half a secret.
//!
//! A container asks with annotations ([`ANNOTATION`], [`ENV_ANNOTATION`]); [`Store::resolve`]
//! turns them into the protocol's [`SecretSpec`]s (decrypted, in memory only) when the
//! container is created. Plaintext is held in zeroed-on-drop buffers as far as this module
//! controls them.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use agentvm_protocol::{SecretSpec, SecretValue};
use zeroize::{Zeroize, Zeroizing};

/// Where secrets are stored unless `AGENTVM_SECRETS_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/agentvm/secrets";
/// The key file unless `AGENTVM_SECRETS_KEY` says otherwise.
pub const DEFAULT_KEY: &str = "/etc/agentvm/secrets.key";
/// The annotation naming the secrets a container gets as files under `/run/secrets`
/// (`docker run --annotation io.agentvm.secrets=NAME[,NAME...]`).
pub const ANNOTATION: &str = "io.agentvm.secrets";
/// The annotation naming the secrets a container gets as environment variables.
pub const ENV_ANNOTATION: &str = "io.agentvm.secrets-env";
/// The first bytes of every secret file (format version 1).
pub const MAGIC: &[u8; 8] = b"AVMSEC1\n";
/// Associated data prefix; the secret's name follows.
const AAD_PREFIX: &[u8] = b"agentvm secret v1\0";
/// Largest value `set` accepts.
pub const MAX_VALUE: usize = 64 * 1024;
/// Largest sum of the values a container may get (they travel in one protocol frame, hex).
pub const MAX_TOTAL: usize = 256 * 1024;
/// Most secrets a container may get.
pub const MAX_COUNT: usize = 64;
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;

/// What can go wrong with secrets; every message names the secret or file concerned.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "invalid secret name {0:?}: use 1 to 128 letters, digits, '_', '.' or '-', starting \
         with a letter, digit or '_'"
    )]
    BadName(String),
    #[error(
        "secret {0:?} cannot be an environment variable: its name must be letters, digits \
         and '_', not starting with a digit"
    )]
    NotAnEnvName(String),
    #[error(
        "secret {name:?} is not set in {} (agentvm secret set {name}, value on stdin)",
        dir.display()
    )]
    Missing { name: String, dir: PathBuf },
    #[error(
        "secret {name:?}: {} does not decrypt with the key {}: the key is not the one it was \
         stored with, or the file was altered or renamed; set the secret again",
        path.display(),
        key.display()
    )]
    Decrypt {
        name: String,
        path: PathBuf,
        key: PathBuf,
    },
    #[error("secret {name:?}: {} is not an agentvm secret file", path.display())]
    Malformed { name: String, path: PathBuf },
    #[error(
        "secret {name:?} cannot be an environment variable: it holds a NUL byte or is not \
         UTF-8 text (deliver it as a file: {ANNOTATION})"
    )]
    NulInEnv { name: String },
    #[error("key file {}: {problem}", path.display())]
    KeyFile { path: PathBuf, problem: String },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret's value is empty")]
    Empty,
    #[error("the secret's value has {0} bytes, more than the limit of {MAX_VALUE}")]
    TooLarge(usize),
    #[error("annotation {key}: {problem}")]
    BadAnnotation { key: &'static str, problem: String },
}

impl SecretError {
    fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        SecretError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = SecretError> = std::result::Result<T, E>;

/// Checks a secret's name: it becomes a file name in the store and in the guest, so no `/`,
/// no leading `.` (temporary files) or `-` (options), nothing outside `[A-Za-z0-9_.-]`.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SecretError::BadName(name.to_string()))
    }
}

/// Whether `name` can be an environment variable's name (portable shell syntax).
fn is_env_name(name: &str) -> bool {
    name.bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A secret a container asks for, and how it wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub name: String,
    /// As `/run/secrets/<name>`.
    pub file: bool,
    /// As the environment variable `<name>`.
    pub env: bool,
}

/// The secrets `annotations` ask for, in the order first named: [`ANNOTATION`] as files,
/// [`ENV_ANNOTATION`] as environment variables (a name in both gets both).
pub fn wanted(annotations: &HashMap<String, String>) -> Result<Vec<Wanted>> {
    let mut out: Vec<Wanted> = Vec::new();
    for (key, env) in [(ANNOTATION, false), (ENV_ANNOTATION, true)] {
        let Some(list) = annotations.get(key) else {
            continue;
        };
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            validate_name(name).map_err(|e| SecretError::BadAnnotation {
                key,
                problem: e.to_string(),
            })?;
            if env && !is_env_name(name) {
                return Err(SecretError::BadAnnotation {
                    key,
                    problem: SecretError::NotAnEnvName(name.into()).to_string(),
                });
            }
            match out.iter_mut().find(|w| w.name == name) {
                Some(w) => {
                    w.file |= !env;
                    w.env |= env;
                }
                None => out.push(Wanted {
                    name: name.into(),
                    file: !env,
                    env,
                }),
            }
        }
    }
    if out.len() > MAX_COUNT {
        return Err(SecretError::BadAnnotation {
            key: ANNOTATION,
            problem: format!("{} secrets asked for, at most {MAX_COUNT}", out.len()),
        });
    }
    Ok(out)
}

/// A secret as `list` shows it: no value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    /// When it was last set.
    pub updated: SystemTime,
}

/// The store of secrets: a directory of encrypted files and the key file.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    key_path: PathBuf,
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            key_path: key_path.into(),
        }
    }

    /// The host's store: [`DEFAULT_DIR`] and [`DEFAULT_KEY`], or `AGENTVM_SECRETS_DIR` and
    /// `AGENTVM_SECRETS_KEY` (tests; the shim runs with containerd's environment, so the
    /// defaults are what containers get).
    pub fn host() -> Self {
        let var = |k: &str, d: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map_or_else(|| PathBuf::from(d), PathBuf::from)
        };
        Self::new(
            var("AGENTVM_SECRETS_DIR", DEFAULT_DIR),
            var("AGENTVM_SECRETS_KEY", DEFAULT_KEY),
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Encrypts `value` and stores it as `name`, replacing an older value atomically. Makes
    /// the store directory and the key on first use.
    pub fn set(&self, name: &str, value: &[u8]) -> Result<()> {
        validate_name(name)?;
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        if value.len() > MAX_VALUE {
            return Err(SecretError::TooLarge(value.len()));
        }
        let key = self.load_or_create_key()?;
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..]));
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let aad = aad(name);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .map_err(|_| SecretError::KeyFile {
                path: self.key_path.clone(),
                problem: "encryption failed".into(),
            })?;
        let mut file = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&nonce);
        file.extend_from_slice(&sealed);
        make_private_dir(&self.dir)?;
        write_atomic(&self.path_of(name), &file)
    }

    /// Decrypts secret `name`.
    pub fn get(&self, name: &str) -> Result<SecretValue> {
        validate_name(name)?;
        let path = self.path_of(name);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SecretError::Missing {
                    name: name.into(),
                    dir: self.dir.clone(),
                })
            }
            Err(e) => return Err(SecretError::io("read secret", &path, e)),
        };
        let malformed = || SecretError::Malformed {
            name: name.into(),
            path: path.clone(),
        };
        let rest = data.strip_prefix(&MAGIC[..]).ok_or_else(malformed)?;
        if rest.len() < NONCE_LEN + 16 {
            return Err(malformed());
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let key = self.load_key()?;
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key[..]));
        let aad = aad(name);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map(SecretValue::new)
            .map_err(|_| SecretError::Decrypt {
                name: name.into(),
                path: path.clone(),
                key: self.key_path.clone(),
            })
    }

    /// Removes secret `name`; false if there was none.
    pub fn remove(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        let path = self.path_of(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(SecretError::io("remove secret", &path, e)),
        }
    }

    /// The stored secrets, by name: names and dates only (nothing is decrypted).
    pub fn list(&self) -> Result<Vec<Listed>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SecretError::io("read secrets directory", &self.dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| SecretError::io("read secrets directory", &self.dir, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Temporary files start with '.', which no secret's name does.
            if validate_name(&name).is_err() {
                continue;
            }
            let meta = entry
                .metadata()
                .map_err(|e| SecretError::io("stat secret", &entry.path(), e))?;
            if !meta.is_file() {
                continue;
            }
            out.push(Listed {
                name,
                updated: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Decrypts what a container asks for. The first secret missing or failing to decrypt
    /// fails the whole lot, naming it.
    pub fn resolve(&self, wanted: &[Wanted]) -> Result<Vec<SecretSpec>> {
        let mut out = Vec::with_capacity(wanted.len());
        let mut total = 0;
        for w in wanted {
            let value = self.get(&w.name)?;
            let text = std::str::from_utf8(value.as_bytes()).is_ok();
            if w.env && (!text || value.as_bytes().contains(&0)) {
                return Err(SecretError::NulInEnv {
                    name: w.name.clone(),
                });
            }
            total += value.len();
            if total > MAX_TOTAL {
                return Err(SecretError::BadAnnotation {
                    key: ANNOTATION,
                    problem: format!(
                        "the secrets asked for hold more than {MAX_TOTAL} bytes together"
                    ),
                });
            }
            out.push(SecretSpec {
                name: w.name.clone(),
                value,
                file: w.file,
                env: w.env,
            });
        }
        Ok(out)
    }

    /// Reads the key, refusing a key file that is not a regular file of the right size,
    /// owned by this user and closed to everyone else.
    fn load_key(&self) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        let path = &self.key_path;
        let bad = |problem: String| SecretError::KeyFile {
            path: path.clone(),
            problem,
        };
        let mut file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(
                    "missing: secrets were stored with a key that is gone; set them again".into(),
                ))
            }
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(bad("is a symbolic link: refused".into()))
            }
            Err(e) => return Err(SecretError::io("open key file", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| SecretError::io("stat key file", path, e))?;
        check_key_meta(&meta).map_err(bad)?;
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        let mut extra = [0u8; 1];
        file.read_exact(&mut key[..])
            .map_err(|_| bad(format!("shorter than {KEY_LEN} bytes: not an agentvm key")))?;
        if file
            .read(&mut extra)
            .map_err(|e| SecretError::io("read key file", path, e))?
            != 0
        {
            return Err(bad(format!(
                "longer than {KEY_LEN} bytes: not an agentvm key"
            )));
        }
        Ok(key)
    }

    /// [`Store::load_key`], making a new key first when there is none. A new key is written
    /// to a temporary file and linked into place, so two first `set`s race safely (the
    /// loser reads the winner's key).
    fn load_or_create_key(&self) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        if std::fs::symlink_metadata(&self.key_path).is_ok() {
            return self.load_key();
        }
        let parent = self
            .key_path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| SecretError::io("create key directory", parent, e))?;
        let key = Zeroizing::new(<[u8; KEY_LEN]>::from(Aes256Gcm::generate_key(&mut OsRng)));
        let tmp = temp_name(&self.key_path);
        let written = (|| {
            let mut f = create_private(&tmp)?;
            f.write_all(&key[..])?;
            f.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(SecretError::io("write key file", &tmp, e));
        }
        let linked = std::fs::hard_link(&tmp, &self.key_path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(parent);
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.load_key(),
            Err(e) => Err(SecretError::io("create key file", &self.key_path, e)),
        }
    }
}

/// The key file's owner and mode: ours, nobody else's.
fn check_key_meta(meta: &std::fs::Metadata) -> Result<(), String> {
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "owned by uid {}, not {euid} (root): refused; chown {euid} it",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {mode:04o} lets others read it: refused; chmod 600 it (and consider the key \
             leaked: set the secrets again with a new key)"
        ));
    }
    Ok(())
}

fn aad(name: &str) -> Vec<u8> {
    let mut v = AAD_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| SecretError::io("create secrets directory", dir, e))
}

/// A sibling of `path` starting with '.', unique to this process and moment.
fn temp_name(path: &Path) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let base = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{base}.tmp-{}-{nanos}", std::process::id()))
}

/// A new file only this user can read, failing if the name exists (no symlink followed).
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `data` to a temporary sibling of `path`, syncs it and renames it over `path`.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = temp_name(path);
    let written = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(SecretError::io("write secret", path, e));
    }
    if let Some(parent) = path.parent() {
        sync_dir(parent);
    }
    Ok(())
}

/// Makes a rename or link in `dir` durable (best effort).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Reads a secret's value from `input` (the CLI's stdin), at most [`MAX_VALUE`] bytes.
pub fn read_value(input: &mut impl Read) -> Result<SecretValue> {
    let mut buf = Zeroizing::new(Vec::new());
    let stdin = Path::new("<stdin>");
    input
        .take(MAX_VALUE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| SecretError::io("read", stdin, e))?;
    if buf.len() > MAX_VALUE {
        return Err(SecretError::TooLarge(buf.len()));
    }
    if buf.is_empty() {
        return Err(SecretError::Empty);
    }
    let value = SecretValue::new(buf.to_vec());
    buf.zeroize();
    Ok(value)
}

/// `2026-01-31 12:00:00 UTC`, for `list`.
pub fn format_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn store() -> (tempfile::TempDir, Store) {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::new(
            tmp.path().join("secrets"),
            tmp.path().join("etc/secrets.key"),
        );
        (tmp, s)
    }

    #[test]
    fn a_secret_round_trips_and_the_key_is_made_private() {
        let (_tmp, s) = store();
        assert!(!s.key_path().exists());
        s.set("API_KEY", b"sk-test-\x00\xff value").unwrap();
        assert_eq!(
            s.get("API_KEY").unwrap().as_bytes(),
            b"sk-test-\x00\xff value"
        );
        let key = std::fs::metadata(s.key_path()).unwrap();
        assert_eq!(key.mode() & 0o7777, 0o600);
        assert_eq!(key.len(), KEY_LEN as u64);
        let dir = std::fs::metadata(s.dir()).unwrap();
        assert_eq!(dir.mode() & 0o7777, 0o700);
        let file = std::fs::metadata(s.dir().join("API_KEY")).unwrap();
        assert_eq!(file.mode() & 0o7777, 0o600);
        // Stored encrypted: the value is nowhere in the file.
        let raw = std::fs::read(s.dir().join("API_KEY")).unwrap();
        assert!(raw.starts_with(MAGIC));
        assert!(!raw.windows(7).any(|w| w == b"sk-test"));
        // A second set replaces it, with the same key, and leaves no temporary file.
        s.set("API_KEY", b"second").unwrap();
        assert_eq!(s.get("API_KEY").unwrap().as_bytes(), b"second");
        let names: Vec<_> = std::fs::read_dir(s.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["API_KEY"]);
        // Two encryptions of one value differ (fresh nonce).
        s.set("B", b"same").unwrap();
        let first = std::fs::read(s.dir().join("B")).unwrap();
        s.set("B", b"same").unwrap();
        assert_ne!(first, std::fs::read(s.dir().join("B")).unwrap());
    }

    #[test]
    fn a_wrong_key_fails_naming_the_secret() {
        let (tmp, s) = store();
        s.set("TOKEN", b"v").unwrap();
        // Another store's key, put in place of this one's.
        let other = Store::new(tmp.path().join("o"), tmp.path().join("o.key"));
        other.set("X", b"x").unwrap();
        std::fs::copy(other.key_path(), s.key_path()).unwrap();
        let e = s.get("TOKEN").unwrap_err();
        assert!(matches!(e, SecretError::Decrypt { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("\"TOKEN\"") && msg.contains("key"), "{msg}");
    }

    #[test]
    fn a_tampered_file_fails_and_a_foreign_one_is_malformed() {
        let (_tmp, s) = store();
        s.set("TOKEN", b"value").unwrap();
        let path = s.dir().join("TOKEN");
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert!(matches!(
            s.get("TOKEN").unwrap_err(),
            SecretError::Decrypt { .. }
        ));
        std::fs::write(&path, b"plain text").unwrap();
        let e = s.get("TOKEN").unwrap_err();
        assert!(matches!(e, SecretError::Malformed { .. }), "{e:?}");
        std::fs::write(&path, MAGIC).unwrap();
        assert!(matches!(
            s.get("TOKEN").unwrap_err(),
            SecretError::Malformed { .. }
        ));
    }

    #[test]
    fn a_file_swapped_to_another_name_does_not_decrypt() {
        let (_tmp, s) = store();
        s.set("PROD_TOKEN", b"prod").unwrap();
        s.set("TEST_TOKEN", b"test").unwrap();
        std::fs::copy(s.dir().join("PROD_TOKEN"), s.dir().join("TEST_TOKEN")).unwrap();
        let e = s.get("TEST_TOKEN").unwrap_err();
        assert!(matches!(e, SecretError::Decrypt { ref name, .. } if name == "TEST_TOKEN"));
    }

    #[test]
    fn bad_names_are_refused_everywhere() {
        let (_tmp, s) = store();
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-rf",
            "a/b",
            "../etc/passwd",
            "a b",
            "é",
            "a\0b",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(s.set(bad, b"v"), Err(SecretError::BadName(_))),
                "{bad:?}"
            );
            assert!(
                matches!(s.get(bad), Err(SecretError::BadName(_))),
                "{bad:?}"
            );
            assert!(
                matches!(s.remove(bad), Err(SecretError::BadName(_))),
                "{bad:?}"
            );
        }
        for good in [
            "A",
            "api_key",
            "github-token",
            "a.b",
            "_x",
            "9lives",
            &"x".repeat(128),
        ] {
            validate_name(good).unwrap();
        }
        assert!(!s.dir().exists(), "nothing was written for a bad name");
    }

    #[test]
    fn key_files_others_could_read_or_someone_else_owns_are_refused() {
        let (_tmp, s) = store();
        s.set("T", b"v").unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(s.key_path(), std::fs::Permissions::from_mode(mode)).unwrap();
            let e = s.get("T").unwrap_err();
            assert!(
                matches!(e, SecretError::KeyFile { .. }) && e.to_string().contains("chmod 600"),
                "{mode:o}: {e}"
            );
            assert!(s.set("U", b"v").is_err(), "set with a key of mode {mode:o}");
        }
        std::fs::set_permissions(s.key_path(), std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(s.get("T").unwrap().as_bytes(), b"v");
        std::fs::set_permissions(s.key_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
        // A symlink to a good key is refused too.
        let link = s.key_path().with_file_name("link.key");
        std::os::unix::fs::symlink(s.key_path(), &link).unwrap();
        let via_link = Store::new(s.dir(), &link);
        assert!(matches!(
            via_link.get("T").unwrap_err(),
            SecretError::KeyFile { .. }
        ));
        // Owned by someone else (needs root to chown).
        if nix::unistd::Uid::effective().is_root() {
            nix::unistd::chown(s.key_path(), Some(nix::unistd::Uid::from_raw(1234)), None).unwrap();
            let e = s.get("T").unwrap_err();
            assert!(e.to_string().contains("owned by uid 1234"), "{e}");
        }
    }

    #[test]
    fn a_missing_key_or_secret_says_what_to_do() {
        let (_tmp, s) = store();
        let e = s.get("NOPE").unwrap_err();
        assert!(
            matches!(e, SecretError::Missing { .. })
                && e.to_string().contains("agentvm secret set NOPE"),
            "{e}"
        );
        s.set("T", b"v").unwrap();
        std::fs::remove_file(s.key_path()).unwrap();
        assert!(matches!(
            s.get("T").unwrap_err(),
            SecretError::KeyFile { .. }
        ));
    }

    #[test]
    fn list_shows_names_and_dates_only_and_rm_removes() {
        let (_tmp, s) = store();
        assert!(s.list().unwrap().is_empty(), "no store yet: empty");
        s.set("B_TOKEN", b"bbbb-secret-value").unwrap();
        s.set("A_TOKEN", b"aaaa-secret-value").unwrap();
        std::fs::write(s.dir().join(".B_TOKEN.tmp-1-2"), b"junk").unwrap();
        let listed = s.list().unwrap();
        let names: Vec<_> = listed.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["A_TOKEN", "B_TOKEN"]);
        let shown = format!("{listed:?}");
        assert!(!shown.contains("secret-value"), "{shown}");
        let age = SystemTime::now().duration_since(listed[0].updated).unwrap();
        assert!(age.as_secs() < 60);
        assert!(s.remove("A_TOKEN").unwrap());
        assert!(!s.remove("A_TOKEN").unwrap());
        assert_eq!(s.list().unwrap().len(), 1);
    }

    #[test]
    fn values_are_checked_and_read_from_a_stream() {
        let (_tmp, s) = store();
        assert!(matches!(s.set("T", b""), Err(SecretError::Empty)));
        assert!(matches!(
            s.set("T", &vec![1; MAX_VALUE + 1]),
            Err(SecretError::TooLarge(_))
        ));
        s.set("T", &vec![1; MAX_VALUE]).unwrap();
        let v = read_value(&mut &b"line\n"[..]).unwrap();
        assert_eq!(v.as_bytes(), b"line\n", "kept byte for byte");
        assert!(matches!(read_value(&mut &b""[..]), Err(SecretError::Empty)));
        let big = vec![b'x'; MAX_VALUE + 1];
        assert!(matches!(
            read_value(&mut big.as_slice()),
            Err(SecretError::TooLarge(_))
        ));
    }

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_name_files_and_environment_variables() {
        assert!(wanted(&HashMap::new()).unwrap().is_empty());
        let w = wanted(&ann(&[
            (ANNOTATION, "API_KEY, gh-token,,API_KEY"),
            (ENV_ANNOTATION, "API_KEY,DB_PASS"),
        ]))
        .unwrap();
        let w = |n: &str| w.iter().find(|w| w.name == n).cloned().unwrap();
        assert_eq!((w("API_KEY").file, w("API_KEY").env), (true, true));
        assert_eq!((w("gh-token").file, w("gh-token").env), (true, false));
        assert_eq!((w("DB_PASS").file, w("DB_PASS").env), (false, true));
        let e = wanted(&ann(&[(ENV_ANNOTATION, "gh-token")])).unwrap_err();
        assert!(e.to_string().contains(ENV_ANNOTATION), "{e}");
        let e = wanted(&ann(&[(ANNOTATION, "../x")])).unwrap_err();
        assert!(e.to_string().contains("invalid secret name"), "{e}");
        let many = (0..=MAX_COUNT).map(|i| format!("S{i}")).collect::<Vec<_>>();
        assert!(wanted(&ann(&[(ANNOTATION, &many.join(","))])).is_err());
    }

    #[test]
    fn resolve_decrypts_or_names_what_is_missing() {
        let (_tmp, s) = store();
        s.set("A", b"alpha").unwrap();
        s.set("NUL", b"a\0b").unwrap();
        s.set("BIN", b"\xff\xfe").unwrap();
        let got = s
            .resolve(&wanted(&ann(&[(ANNOTATION, "A"), (ENV_ANNOTATION, "A")])).unwrap())
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].value.as_bytes(), b"alpha");
        assert!(got[0].file && got[0].env);
        assert!(!format!("{got:?}").contains("alpha"));
        let e = s
            .resolve(&wanted(&ann(&[(ANNOTATION, "A,GONE")])).unwrap())
            .unwrap_err();
        assert!(e.to_string().contains("\"GONE\" is not set"), "{e}");
        // A NUL byte is fine in a file, not in an environment variable.
        s.resolve(&wanted(&ann(&[(ANNOTATION, "NUL")])).unwrap())
            .unwrap();
        let e = s
            .resolve(&wanted(&ann(&[(ENV_ANNOTATION, "NUL")])).unwrap())
            .unwrap_err();
        assert!(matches!(e, SecretError::NulInEnv { .. }));
        let e = s
            .resolve(&wanted(&ann(&[(ENV_ANNOTATION, "BIN")])).unwrap())
            .unwrap_err();
        assert!(matches!(e, SecretError::NulInEnv { .. }));
    }

    #[test]
    fn dates_are_formatted_in_utc() {
        let t = |s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s);
        assert_eq!(format_time(t(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_time(t(951_782_400)), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_time(t(1_798_761_599)), "2026-12-31 23:59:59 UTC");
    }
}
