//! Resource usage of the whole guest for `docker stats`: CPU from the root cgroup's
//! `cpu.stat` (or `/proc/stat`), memory from `/proc/meminfo`, processes from `/proc`, OOM
//! kills from `/proc/vmstat`. The VM is the container, so the guest's totals are its figures.

use agentvm_protocol::GuestStats;

/// Reads the guest's figures; missing sources leave zeros.
pub fn collect() -> GuestStats {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mut s = GuestStats::default();
    let cpu = read("/sys/fs/cgroup/cpu.stat");
    if cpu.is_empty() {
        apply_proc_stat(&mut s, &read("/proc/stat"), clock_ticks());
    } else {
        apply_cpu_stat(&mut s, &cpu);
    }
    apply_meminfo(&mut s, &read("/proc/meminfo"));
    s.oom_kills = oom_kills();
    s.pids = count_processes();
    s
}

/// Whether the kernel log says the OOM killer killed `pid` (`Killed process <pid> (`): the
/// guest kernel has no VM event counters, so the log is the record. Reads the whole ring
/// buffer with syslog(2), which needs no device node.
pub fn oom_killed(pid: i32) -> bool {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer and returns the ring buffer's size.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let Ok(size) = usize::try_from(size) else {
        return false;
    };
    let mut buf = vec![0u8; size.clamp(4096, 1 << 22)];
    let len = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: READ_ALL writes at most `len` bytes into `buf`, which is that long.
    let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), len) };
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    kmsg_says(&buf[..n.min(buf.len())], &format!("Killed process {pid} ("))
}

fn kmsg_says(record: &[u8], needle: &str) -> bool {
    record.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// OOM kills since boot (`/proc/vmstat`; zero when the kernel keeps no event counters).
pub fn oom_kills() -> u64 {
    field(
        &std::fs::read_to_string("/proc/vmstat").unwrap_or_default(),
        "oom_kill",
    )
    .unwrap_or(0)
}

/// `key value` lines (`cpu.stat`, `vmstat`) or `Key: value kB` lines (`meminfo`).
fn field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        let k = w.next()?.trim_end_matches(':');
        (k == key).then(|| w.next()?.parse().ok())?
    })
}

fn apply_cpu_stat(s: &mut GuestStats, text: &str) {
    s.cpu_usage_usec = field(text, "usage_usec").unwrap_or(0);
    s.cpu_user_usec = field(text, "user_usec").unwrap_or(0);
    s.cpu_system_usec = field(text, "system_usec").unwrap_or(0);
}

/// The `cpu` line of `/proc/stat` in clock ticks: user nice system idle iowait irq softirq
/// steal ...
fn apply_proc_stat(s: &mut GuestStats, text: &str, hz: u64) {
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let usec = |ticks: u64| ticks.saturating_mul(1_000_000) / hz.max(1);
    let user = get(0) + get(1);
    let system = get(2) + get(5) + get(6);
    s.cpu_user_usec = usec(user);
    s.cpu_system_usec = usec(system);
    s.cpu_usage_usec = usec(user + system + get(7));
}

fn apply_meminfo(s: &mut GuestStats, text: &str) {
    let kib = |k: &str| field(text, k).unwrap_or(0).saturating_mul(1024);
    s.memory_limit = kib("MemTotal");
    s.memory_usage = s.memory_limit.saturating_sub(kib("MemFree"));
    s.memory_anon = kib("AnonPages");
    s.memory_file = kib("Cached");
    s.memory_active_file = kib("Active(file)");
    s.memory_inactive_file = kib("Inactive(file)");
}

/// Memory of the container's cgroup (`memory.max`, `memory.current`, `memory.stat`) in
/// place of the guest's, when `memory.max` is a number below the guest's size: after
/// `docker update --memory` the figures are the container's against its limit, as under
/// runc. `max` (no limit) or unreadable files leave the guest's figures.
pub fn apply_cgroup_memory(s: &mut GuestStats, max: &str, current: &str, stat: &str) {
    let (Ok(max), Ok(current)) = (max.trim().parse::<u64>(), current.trim().parse::<u64>()) else {
        return;
    };
    if max >= s.memory_limit {
        return;
    }
    s.memory_limit = max;
    s.memory_usage = current;
    s.memory_anon = field(stat, "anon").unwrap_or(0);
    s.memory_file = field(stat, "file").unwrap_or(0);
    s.memory_active_file = field(stat, "active_file").unwrap_or(0);
    s.memory_inactive_file = field(stat, "inactive_file").unwrap_or(0);
}

/// The text of a cgroup's files that [`cgroup_usage`] reads.
#[derive(Debug, Default)]
pub struct CgroupFiles {
    pub cpu_stat: String,
    pub memory_current: String,
    pub memory_max: String,
    pub memory_stat: String,
    pub memory_events: String,
    pub pids_current: String,
}

/// The usage of one container's cgroup (a pod's later container, as runc reports each
/// container's own cgroup): CPU from its `cpu.stat`, memory from `memory.current` and
/// `memory.stat` against `memory.max` (the guest's memory, `guest_memory` bytes, when it has
/// no limit or one above it), processes from `pids.current`, OOM kills from `memory.events`.
/// Unreadable or malformed files leave zeros.
pub fn cgroup_usage(files: &CgroupFiles, guest_memory: u64) -> GuestStats {
    let mut s = GuestStats::default();
    apply_cpu_stat(&mut s, &files.cpu_stat);
    s.memory_limit = files
        .memory_max
        .trim()
        .parse::<u64>()
        .map_or(guest_memory, |max| max.min(guest_memory));
    s.memory_anon = field(&files.memory_stat, "anon").unwrap_or(0);
    s.memory_file = field(&files.memory_stat, "file").unwrap_or(0);
    s.memory_active_file = field(&files.memory_stat, "active_file").unwrap_or(0);
    s.memory_inactive_file = field(&files.memory_stat, "inactive_file").unwrap_or(0);
    // `memory.current` and `memory.stat` are read at different moments: a small container
    // whose page cache grew in between would show less usage than inactive file pages, and
    // a working set (usage - inactive_file, as containerd computes it) of 0. Usage covers
    // at least the pages `memory.stat` counts.
    let current: u64 = files.memory_current.trim().parse().unwrap_or(0);
    s.memory_usage = current.max(s.memory_anon.saturating_add(s.memory_file));
    s.pids = files.pids_current.trim().parse().unwrap_or(0);
    s.oom_kills = field(&files.memory_events, "oom_kill").unwrap_or(0);
    s
}

/// The guest's memory (`MemTotal`), bytes.
pub fn guest_memory() -> u64 {
    let mut s = GuestStats::default();
    apply_meminfo(
        &mut s,
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
    );
    s.memory_limit
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).unwrap_or(100).max(1)
}

/// User processes: numeric `/proc` entries with a command line, the agent (pid 1) excluded.
/// Kernel threads have an empty command line.
fn count_processes() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != 1)
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_cpu_stat_and_meminfo_are_parsed() {
        let mut s = GuestStats::default();
        apply_cpu_stat(
            &mut s,
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 0\n",
        );
        apply_meminfo(
            &mut s,
            "MemTotal:         500000 kB\nMemFree:          300000 kB\nMemAvailable:     400000 kB\n\
             Cached:            50000 kB\nActive(file):      20000 kB\nInactive(file):    30000 kB\n\
             AnonPages:         10000 kB\n",
        );
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (2_500_000, 2_000_000, 500_000)
        );
        assert_eq!(s.memory_limit, 500_000 * 1024);
        assert_eq!(s.memory_usage, 200_000 * 1024);
        assert_eq!(s.memory_inactive_file, 30_000 * 1024);
        assert_eq!(s.memory_anon, 10_000 * 1024);
        assert_eq!(field("oom_kill 3\npgfault 9\n", "oom_kill"), Some(3));
    }

    #[test]
    fn a_cgroup_limit_below_the_guest_replaces_its_memory_figures() {
        let guest = GuestStats {
            memory_limit: 512 << 20,
            memory_usage: 100 << 20,
            ..Default::default()
        };
        let stat = "anon 1000\nfile 2000\nkernel 5\nactive_file 300\ninactive_file 1700\n";
        let mut s = guest;
        apply_cgroup_memory(&mut s, "67108864\n", "4096\n", stat);
        assert_eq!((s.memory_limit, s.memory_usage), (64 << 20, 4096));
        assert_eq!((s.memory_anon, s.memory_file), (1000, 2000));
        assert_eq!((s.memory_active_file, s.memory_inactive_file), (300, 1700));
        for (max, current) in [
            ("max\n", "4096"),
            ("1073741824", "4096"),
            ("", ""),
            ("1", "x"),
        ] {
            let mut s = guest;
            apply_cgroup_memory(&mut s, max, current, stat);
            assert_eq!(s, guest, "{max:?} {current:?}");
        }
    }

    #[test]
    fn a_containers_cgroup_files_become_its_own_figures() {
        let files = CgroupFiles {
            cpu_stat: "usage_usec 700\nuser_usec 500\nsystem_usec 200\n".into(),
            memory_current: "1048576\n".into(),
            memory_max: "67108864\n".into(),
            memory_stat: "anon 4096\nfile 8192\nactive_file 1000\ninactive_file 7192\n".into(),
            memory_events: "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n".into(),
            pids_current: "2\n".into(),
        };
        let s = cgroup_usage(&files, 512 << 20);
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (700, 500, 200)
        );
        assert_eq!((s.memory_usage, s.memory_limit), (1 << 20, 64 << 20));
        assert_eq!((s.memory_anon, s.memory_file), (4096, 8192));
        assert_eq!((s.memory_active_file, s.memory_inactive_file), (1000, 7192));
        assert_eq!((s.pids, s.oom_kills), (2, 1));
        // No limit, or one above the VM: the VM's memory is the limit.
        for max in ["max\n", "4294967296", ""] {
            let f = CgroupFiles {
                memory_max: max.into(),
                ..Default::default()
            };
            assert_eq!(
                cgroup_usage(&f, 512 << 20).memory_limit,
                512 << 20,
                "{max:?}"
            );
        }
        // Garbage is zeros, not a panic.
        let junk = CgroupFiles {
            cpu_stat: "usage_usec x\n".into(),
            memory_current: "-1".into(),
            pids_current: "many".into(),
            ..Default::default()
        };
        let s = cgroup_usage(&junk, 1);
        assert_eq!((s.cpu_usage_usec, s.memory_usage, s.pids), (0, 0, 0));
        // memory.current read before the page cache grew: usage still covers the pages.
        let skewed = CgroupFiles {
            memory_current: "999424\n".into(),
            memory_stat: "anon 90112\nfile 1003520\nactive_file 0\ninactive_file 1003520\n".into(),
            ..Default::default()
        };
        let s = cgroup_usage(&skewed, 512 << 20);
        assert_eq!(s.memory_usage, 90112 + 1003520);
        assert!(s.memory_usage - s.memory_inactive_file > 0, "a working set");
    }

    #[test]
    fn kernel_oom_records_name_the_pid() {
        let rec = b"3,613,1234567,-;Out of memory: Killed process 42 (sh) total-vm:1000kB";
        assert!(kmsg_says(rec, "Killed process 42 ("));
        assert!(!kmsg_says(rec, "Killed process 4 ("));
    }

    #[test]
    fn proc_stat_fallback_counts_busy_ticks() {
        let mut s = GuestStats::default();
        apply_proc_stat(
            &mut s,
            "cpu  100 0 50 1000 0 0 0 0 0 0\ncpu0 100 0 50 1000\n",
            100,
        );
        assert_eq!(s.cpu_user_usec, 1_000_000);
        assert_eq!(s.cpu_system_usec, 500_000);
        assert_eq!(s.cpu_usage_usec, 1_500_000);
    }

    #[test]
    fn live_figures_are_plausible() {
        let s = collect();
        assert!(s.memory_limit > 0 && s.memory_usage <= s.memory_limit);
        assert!(s.pids >= 1, "at least the test process");
    }
}
