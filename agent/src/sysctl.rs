//! Kernel parameters from the OCI spec (`linux.sysctl`), written to `/proc/sys`.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The `/proc/sys` file of `key` (`net.ipv4.ip_forward` -> `net/ipv4/ip_forward`), or `None`
/// for a key that could escape `/proc/sys`.
pub fn path(key: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = key.split('.').collect();
    let safe = !key.is_empty()
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != ".." && !p.contains('/') && !p.contains('\0'));
    safe.then(|| PathBuf::from("/proc/sys").join(parts.join("/")))
}

/// Writes every parameter; returns one message per parameter that could not be set.
pub fn apply(sysctls: &BTreeMap<String, String>) -> Vec<String> {
    let mut errors = Vec::new();
    for (key, value) in sysctls {
        match path(key) {
            None => errors.push(format!("sysctl {key:?}: not a valid parameter name")),
            Some(p) => {
                if let Err(e) = std::fs::write(&p, value) {
                    errors.push(format!("sysctl {key}={value}: {e}"));
                }
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_proc_sys_and_cannot_escape() {
        assert_eq!(
            path("net.ipv4.ping_group_range"),
            Some(PathBuf::from("/proc/sys/net/ipv4/ping_group_range"))
        );
        for bad in ["", "net..x", "../etc/passwd", "net/ipv4", "a.\0"] {
            assert_eq!(path(bad), None, "{bad:?}");
        }
        let e = apply(&BTreeMap::from([(
            "no.such.knob".to_string(),
            "1".to_string(),
        )]));
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("sysctl no.such.knob=1:"), "{e:?}");
    }
}
