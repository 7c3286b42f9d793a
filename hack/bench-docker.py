#!/usr/bin/env python3
"""Docker benchmark for the shim (issue 4): `docker run --rm IMG true` and `docker exec C true`
latency with --runtime=agentvm vs runc (median of N, interleaved so both see the same machine
load), and the host RSS of the shim and of the whole sandbox (shim + QEMU + vhost-device-vsock) for an
idle container (virtiofsd included). Needs dockerd with the agentvm runtime (hack/docker-up.sh).

Usage: hack/bench-docker.py [-n 10] [--image agentvm-test/busybox:latest]
"""
import argparse, os, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import procs_mentioning, rss_kib  # noqa: E402


def timed(args):
    t0 = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return (time.monotonic() - t0) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--image", default="agentvm-test/busybox:latest")
    a = ap.parse_args()
    runs = {"runc": [], "agentvm": []}
    timed(["docker", "run", "--rm", "--runtime=agentvm", a.image, "true"])  # warm up
    for _ in range(a.n):
        for rt in ("runc", "agentvm"):
            runs[rt].append(timed(["docker", "run", "--rm", f"--runtime={rt}", a.image, "true"]))
    med = {k: statistics.median(v) for k, v in runs.items()}

    # docker exec into one running container per runtime.
    execs = {"runc": [], "agentvm": []}
    long_running = {}
    try:
        for rt in execs:
            long_running[rt] = subprocess.run(
                ["docker", "run", "-d", f"--runtime={rt}", a.image, "sleep", "600"],
                check=True, capture_output=True, text=True).stdout.strip()
        for rt, cid in long_running.items():  # the first exec waits for the VM to boot
            timed(["docker", "exec", cid, "true"])
        for _ in range(a.n):
            for rt, cid in long_running.items():
                execs[rt].append(timed(["docker", "exec", cid, "true"]))
    finally:
        for cid in long_running.values():
            subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)
    exec_med = {k: statistics.median(v) for k, v in execs.items()}

    cid = subprocess.run(["docker", "run", "-d", "--runtime=agentvm", a.image, "sleep", "120"],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        time.sleep(3)
        rss = {}
        for pid, cmd in procs_mentioning(cid).items():
            if "containerd-shim-agentvm-v1" in cmd:
                rss["shim"] = rss.get("shim", 0) + rss_kib(pid)
            elif "qemu-system" in cmd:
                rss["qemu"] = rss_kib(pid)
            elif "vhost-device-vsock" in cmd:
                rss["vhost-device-vsock"] = rss_kib(pid)
            elif "virtiofsd" in cmd:
                rss["virtiofsd"] = rss.get("virtiofsd", 0) + rss_kib(pid)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)

    print(f"median of {a.n} runs (ms), image {a.image}\n")
    print("| `docker run --rm IMG true` | ms | vs runc |")
    print("|---|---|---|")
    for rt in ("runc", "agentvm"):
        print(f"| {rt} | {med[rt]:.0f} | {med[rt] / med['runc']:.2f}x |")
    print("\n| `docker exec C true` | ms | vs runc |")
    print("|---|---|---|")
    for rt in ("runc", "agentvm"):
        print(f"| {rt} | {exec_med[rt]:.0f} | {exec_med[rt] / exec_med['runc']:.2f}x |")
    print("\nidle container host RSS (KiB): " + ", ".join(f"{k} {v}" for k, v in rss.items())
          + f", sandbox total {sum(rss.values())}")


if __name__ == "__main__":
    main()
