//! Linux capability names, as OCI spells them (`CAP_CHOWN`).

/// Capability names indexed by their number (`linux/capability.h`, Linux 6.12).
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The highest capability number this table knows.
pub const MAX_KNOWN: u8 = (NAMES.len() - 1) as u8;

/// The number of a capability named as in OCI (`CAP_NET_ADMIN`), case-insensitively.
pub fn from_name(name: &str) -> Option<u8> {
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .and_then(|i| u8::try_from(i).ok())
}

/// The OCI name of capability number `cap`.
pub fn name(cap: u8) -> Option<&'static str> {
    NAMES.get(usize::from(cap)).copied()
}

/// Reads the highest capability the running kernel knows (`/proc/sys/kernel/cap_last_cap`),
/// falling back to the table's when the file cannot be read.
pub fn kernel_last_cap() -> u8 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u8>().ok())
        .map_or(MAX_KNOWN, |n| n.min(63))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        assert_eq!(from_name("CAP_CHOWN"), Some(0));
        assert_eq!(from_name("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(from_name("cap_net_raw"), Some(13));
        assert_eq!(from_name("CAP_CHECKPOINT_RESTORE"), Some(40));
        assert_eq!(name(24), Some("CAP_SYS_RESOURCE"));
    }

    #[test]
    fn unknown_names_rejected() {
        assert_eq!(from_name("CAP_NOPE"), None);
        assert_eq!(from_name("CHOWN"), None);
        assert_eq!(from_name(""), None);
        assert_eq!(name(MAX_KNOWN + 1), None);
    }
}
