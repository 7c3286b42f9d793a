//! POSIX resource limits, as OCI names them (`RLIMIT_NOFILE`).

/// A resource number for `setrlimit(2)`.
pub type Resource = libc::__rlimit_resource_t;

const TABLE: [(&str, Resource); 16] = [
    ("RLIMIT_CPU", libc::RLIMIT_CPU),
    ("RLIMIT_FSIZE", libc::RLIMIT_FSIZE),
    ("RLIMIT_DATA", libc::RLIMIT_DATA),
    ("RLIMIT_STACK", libc::RLIMIT_STACK),
    ("RLIMIT_CORE", libc::RLIMIT_CORE),
    ("RLIMIT_RSS", libc::RLIMIT_RSS),
    ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
    ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
    ("RLIMIT_MEMLOCK", libc::RLIMIT_MEMLOCK),
    ("RLIMIT_AS", libc::RLIMIT_AS),
    ("RLIMIT_LOCKS", libc::RLIMIT_LOCKS),
    ("RLIMIT_SIGPENDING", libc::RLIMIT_SIGPENDING),
    ("RLIMIT_MSGQUEUE", libc::RLIMIT_MSGQUEUE),
    ("RLIMIT_NICE", libc::RLIMIT_NICE),
    ("RLIMIT_RTPRIO", libc::RLIMIT_RTPRIO),
    ("RLIMIT_RTTIME", libc::RLIMIT_RTTIME),
];

/// The resource number of an OCI rlimit name. Exact match, as runc does.
pub fn from_name(name: &str) -> Option<Resource> {
    TABLE.iter().find(|(n, _)| *n == name).map(|&(_, r)| r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names() {
        assert_eq!(from_name("RLIMIT_NOFILE"), Some(7));
        assert_eq!(from_name("RLIMIT_CPU"), Some(0));
        assert_eq!(from_name("RLIMIT_RTTIME"), Some(15));
        assert_eq!(from_name("RLIMIT_NPROC"), Some(libc::RLIMIT_NPROC));
    }

    #[test]
    fn unknown_names_rejected() {
        assert_eq!(from_name("RLIMIT_BOGUS"), None);
        assert_eq!(from_name("NOFILE"), None);
        assert_eq!(from_name("rlimit_nofile"), None);
        assert_eq!(from_name(""), None);
    }
}
