//! File tools through the guest: every read, write and listing runs as a process *inside* the
//! sandbox (a small `/bin/sh` script using `cat`, `stat` and `mkdir`, which busybox and
//! coreutils both have), so the path is resolved by the guest's kernel in the guest's root.
//! The host never opens a path the guest controls, a symlink in the guest cannot lead to a
//! host file, and the workspace share is written only through its file server.
//!
//! The path is passed as an argument (`$1`), never spliced into the script.

use serde::Serialize;

use super::McpError;

/// Reads a regular file of at most `$2` bytes. Exit 2: missing; 3: not a regular file;
/// 5: too large (its size on stderr).
const READ: &str = r#"p=$1
if [ -d "$p" ]; then echo "$p is a directory: use file_list" >&2; exit 3; fi
if [ ! -e "$p" ]; then echo "$p does not exist" >&2; exit 2; fi
if [ ! -f "$p" ]; then echo "$p is not a regular file" >&2; exit 3; fi
s=$(stat -L -c %s -- "$p") || exit 4
if [ "$s" -gt "$2" ]; then echo "$s" >&2; exit 5; fi
exec cat -- "$p""#;

/// Writes stdin to `$1` (appends when `$3` is 1), creating its directory first when `$2` is
/// 1; prints the file's size. Exit 3: a directory is in the way.
const WRITE: &str = r#"p=$1
if [ -d "$p" ]; then echo "$p is a directory" >&2; exit 3; fi
d=${p%/*}
if [ "$2" = 1 ] && [ -n "$d" ]; then mkdir -p -- "$d" || exit 4; fi
if [ "$3" = 1 ]; then cat >> "$p" || exit 4; else cat > "$p" || exit 4; fi
stat -c %s -- "$p""#;

/// Lists a directory: `TYPE SIZE\0NAME\0` per entry (symlinks not followed). Exit 2: missing;
/// 3: not a directory.
const LIST: &str = r#"if ! cd -- "$1" 2>/dev/null; then
  if [ -e "$1" ]; then echo "$1 is not a directory (or not searchable): use file_read" >&2; exit 3; fi
  echo "$1 does not exist" >&2; exit 2
fi
for f in .* *; do
  case $f in .|..) continue;; esac
  [ -e "$f" ] || [ -L "$f" ] || continue
  if [ -L "$f" ]; then t=symlink; elif [ -d "$f" ]; then t=directory; elif [ -f "$f" ]; then t=file; else t=other; fi
  s=$(stat -c %s -- "$f" 2>/dev/null) || s=0
  printf '%s %s\0%s\0' "$t" "$s" "$f"
done"#;

fn script(name: &str, body: &str, args: &[&str]) -> Vec<String> {
    let mut v = vec!["/bin/sh".to_string(), "-c".into(), body.into(), name.into()];
    v.extend(args.iter().map(|a| a.to_string()));
    v
}

/// The command reading `path` (resolved, absolute) if it has at most `max` bytes.
pub fn read_command(path: &str, max: u64) -> Vec<String> {
    script("agentvm-file-read", READ, &[path, &max.to_string()])
}

/// The command writing its stdin to `path`.
pub fn write_command(path: &str, create_dirs: bool, append: bool) -> Vec<String> {
    let flag = |b: bool| if b { "1" } else { "0" };
    script(
        "agentvm-file-write",
        WRITE,
        &[path, flag(create_dirs), flag(append)],
    )
}

/// The command listing `path`.
pub fn list_command(path: &str) -> Vec<String> {
    script("agentvm-file-list", LIST, &[path])
}

/// What a failed helper's exit code and stderr mean.
pub fn failure(code: i32, stderr: &str, path: &str, limit: u64) -> McpError {
    let msg = stderr.trim();
    match code {
        5 => McpError::TooLarge {
            what: format!("file {path}"),
            size: msg.parse().unwrap_or(0),
            limit,
        },
        126 | 127 => McpError::Unsupported(
            format!(
                "the sandbox's image lacks what the file tools need (/bin/sh, cat, stat, \
                 mkdir): {msg}"
            )
            .into(),
        ),
        _ if msg.is_empty() => McpError::File(format!("{path}: failed (exit code {code})")),
        _ => McpError::File(crate::guest::text(msg)),
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Entry {
    pub name: String,
    /// `file`, `directory`, `symlink` or `other` (devices, fifos, sockets).
    #[serde(rename = "type")]
    pub kind: String,
    /// Size in bytes (of the link itself for a symlink).
    pub size: u64,
}

/// Parses [`LIST`]'s output; at most `max` entries, and whether there were more.
pub fn parse_list(out: &[u8], max: usize) -> (Vec<Entry>, bool) {
    let mut fields = out.split(|b| *b == 0);
    let mut entries = Vec::new();
    while let (Some(meta), Some(name)) = (fields.next(), fields.next()) {
        if entries.len() == max {
            return (entries, true);
        }
        let meta = String::from_utf8_lossy(meta);
        let mut m = meta.split(' ');
        let kind = match m.next() {
            Some(k @ ("file" | "directory" | "symlink")) => k.to_string(),
            _ => "other".to_string(),
        };
        let size = m.next().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        entries.push(Entry {
            name: String::from_utf8_lossy(name).into_owned(),
            kind,
            size,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    (entries, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_arguments_not_script_text() {
        let evil = "/tmp/x\"; rm -rf / #";
        let c = read_command(evil, 10);
        assert_eq!(c[..2], ["/bin/sh", "-c"]);
        assert!(!c[2].contains(evil));
        assert_eq!(c[4], evil);
        assert_eq!(c[5], "10");
        let w = write_command("/a b", true, false);
        assert_eq!(&w[4..], ["/a b", "1", "0"]);
        assert_eq!(list_command("/")[4], "/");
    }

    #[test]
    fn listings_parse_and_are_capped() {
        let out = b"file 12\0b.txt\0directory 4096\0a dir\0symlink 7\0l\0fifo 0\0p\0";
        let (e, more) = parse_list(out, 10);
        assert!(!more);
        let names: Vec<_> = e
            .iter()
            .map(|e| (e.name.as_str(), e.kind.as_str(), e.size))
            .collect();
        assert_eq!(
            names,
            [
                ("a dir", "directory", 4096),
                ("b.txt", "file", 12),
                ("l", "symlink", 7),
                ("p", "other", 0)
            ]
        );
        let (e, more) = parse_list(out, 2);
        assert!(more);
        assert_eq!(e.len(), 2);
        // Garbage from a hostile guest does not panic.
        let (e, _) = parse_list(b"\0\0\0\xff\0x", 10);
        assert_eq!(e.len(), 2);
    }

    #[test]
    fn failures_say_what_happened() {
        let e = failure(5, "2000000\n", "/big", 1 << 20);
        assert_eq!(e.code(), "too_large");
        assert!(
            e.to_string()
                .contains("2000000 bytes, over the limit of 1048576"),
            "{e}"
        );
        assert_eq!(
            failure(2, "/x does not exist\n", "/x", 1).to_string(),
            "/x does not exist"
        );
        assert_eq!(failure(127, "sh: not found", "/x", 1).code(), "unsupported");
        assert!(failure(1, "", "/x", 1).to_string().contains("exit code 1"));
    }
}
