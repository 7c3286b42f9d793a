"""Helpers shared by the benchmark scripts in hack/: host RSS of processes found by their
command line."""
import os


def rss_kib(pid):
    """VmRSS of `pid` in KiB, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def procs_mentioning(needle):
    """{pid: command line} of every process whose command line contains `needle`."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in cmd:
            out[int(pid)] = cmd
    return out
