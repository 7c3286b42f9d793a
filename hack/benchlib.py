"""Helpers shared by the benchmark scripts in hack/: host RSS of processes found by their
command line, Docker calls and container cleanup, percentiles, Markdown tables."""
import math, os, subprocess, time


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


def docker(*args, check=True):
    """Runs `docker ARGS`, returns its stdout stripped; raises with docker's stderr on failure."""
    p = subprocess.run(["docker", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip()


def docker_rm(cids, label=None, timeout=15):
    """`docker rm -f` of `cids` and of every container carrying `label` (key=value), then
    waits up to `timeout` s for the processes naming them (shim, QEMU, helpers) to go.
    Returns a list of what is still there (empty when clean)."""
    cids = [c for c in cids if c]
    if label:
        cids += docker("ps", "-aq", "--no-trunc", "--filter", f"label={label}", check=False).split()
    cids = sorted(set(cids))
    if cids:
        subprocess.run(["docker", "rm", "-f", *cids], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    left = []
    if label and docker("ps", "-aq", "--filter", f"label={label}", check=False):
        left.append(f"containers with label {label}")
    deadline = time.monotonic() + timeout
    while True:
        procs = {pid: cmd for c in cids for pid, cmd in procs_mentioning(c).items()}
        if not procs or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    left += [f"process {pid}: {cmd[:160]}" for pid, cmd in sorted(procs.items())]
    return left


def percentile(values, p):
    """The `p`-th percentile (0-100) of `values`, linear between closest ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def md_table(header, rows):
    """A Markdown table: `header` and each row are lists of cells (str() is applied)."""
    out = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)
