#!/usr/bin/env python3
"""Boot benchmark for `agentvm run` (issue 2): phase breakdown under TCG and under TCG with
-icount (deterministic guest clock), each the median of N runs, against a bare-QEMU baseline
measured in the same run (same kernel, a one-file initramfs that reboots at once), plus the
host RSS of the VMM and its helpers for an idle VM.

Usage: hack/bench-boot.py [-n 5] [--agentvm target/release/agentvm]
Prints a Markdown table for docs/benchmarks.md.
"""
import argparse, os, re, statistics, subprocess, sys, tempfile, time, shutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import procs_mentioning, rss_kib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARE = "/usr/local/share/agentvm"


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout.strip()


def kernel():
    return os.environ.get("AGENTVM_KERNEL") or next(
        p for p in (f"{SHARE}/vmlinux", f"{SHARE}/bzImage") if os.path.isfile(p))


def agentvm_run(agentvm, rootfs, extra, state_root):
    env = dict(os.environ, AGENTVM_STATE_ROOT=state_root)
    t0 = time.monotonic()
    p = subprocess.run([agentvm, "run", "--accel", "tcg", "--debug", "--rootfs", rootfs, *extra,
                        "--", "true"], capture_output=True, text=True, env=env)
    wall = (time.monotonic() - t0) * 1000
    if p.returncode != 0:
        sys.exit(f"agentvm run failed ({p.returncode}): {p.stderr}")
    m = re.search(r"timing: (.*)", p.stderr)
    phases = {k: float(v) for k, v in re.findall(r"([\w-]+)=(\d+)ms", m.group(1))}
    phases["wall"] = wall
    return phases


def bare_qemu(initrd):
    """QEMU + the same kernel + an initramfs whose /init reboots at once: the floor."""
    t0 = time.monotonic()
    subprocess.run(["qemu-system-x86_64", "-M", "microvm,acpi=off,x-option-roms=off", "-accel", "tcg",
                    "-cpu", "max", "-m", "512M", "-nodefaults", "-no-user-config", "-no-reboot",
                    "-display", "none", "-monitor", "none", "-serial", "null",
                    "-kernel", kernel(), "-initrd", initrd,
                    "-append", "console=ttyS0 reboot=t panic=-1 quiet rdinit=/init"],
                   check=True, timeout=120)
    return (time.monotonic() - t0) * 1000


def reboot_initrd(tmp):
    """A static busybox as /init running `reboot -f`."""
    d = os.path.join(tmp, "initrd")
    os.makedirs(os.path.join(d, "bin"))
    shutil.copy("/bin/busybox", os.path.join(d, "bin/busybox"))
    with open(os.path.join(d, "init"), "w") as f:
        f.write("#!/bin/busybox sh\n/bin/busybox reboot -f\n")
    os.chmod(os.path.join(d, "init"), 0o755)
    out = os.path.join(tmp, "reboot.cpio")
    files = sh("sh", "-c", f"cd {d} && find . | cpio -o -H newc 2>/dev/null > {out} && echo ok")
    assert files == "ok"
    return out


def idle_rss(agentvm, rootfs, state_root):
    env = dict(os.environ, AGENTVM_STATE_ROOT=state_root)
    p = subprocess.Popen([agentvm, "run", "--accel", "tcg", "--rootfs", rootfs, "--", "sh", "-c",
                          "echo ready; exec sleep 60"], stdout=subprocess.PIPE, env=env)
    assert p.stdout.readline().strip() == b"ready"
    time.sleep(3)  # let the guest settle
    found = {}
    for pid, cmd in procs_mentioning(state_root).items():
        name = "qemu" if "qemu-system" in cmd else "vhost-device-vsock"
        found[name] = rss_kib(pid)
    found["agentvm run"] = rss_kib(p.pid)
    p.terminate()
    p.wait(timeout=30)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5)
    ap.add_argument("--agentvm", default=os.path.join(ROOT, "target/release/agentvm"))
    a = ap.parse_args()
    rootfs = sh(os.path.join(HERE, "make-test-rootfs.sh"))
    with tempfile.TemporaryDirectory(prefix="agentvm-bench.") as tmp:
        initrd = reboot_initrd(tmp)
        agentvm_run(a.agentvm, rootfs, [], tmp)  # warm caches (initramfs, page cache)
        rows = {"tcg": [], "icount": []}
        bare = []
        for _ in range(a.n):
            bare.append(bare_qemu(initrd))
            rows["tcg"].append(agentvm_run(a.agentvm, rootfs, [], tmp))
            rows["icount"].append(agentvm_run(a.agentvm, rootfs, ["--icount"], tmp))
        rss = idle_rss(a.agentvm, rootfs, tmp)
    med = lambda xs: statistics.median(xs)
    keys = ["vmm-spawn", "guest-uptime-at-agent", "agent-ready", "exec", "run", "teardown", "wall"]
    print(f"median of {a.n} runs, ms; kernel {kernel()}\n")
    print("| phase | TCG | TCG -icount |")
    print("|---|---|---|")
    for k in keys:
        print(f"| {k} | {med([r[k] for r in rows['tcg']]):.0f} | {med([r[k] for r in rows['icount']]):.0f} |")
    b = med(bare)
    print(f"| bare QEMU boot-to-reboot (baseline) | {b:.0f} | |")
    print(f"| agentvm wall / baseline | {med([r['wall'] for r in rows['tcg']]) / b:.2f}x | |")
    print("\nidle VM host RSS (KiB): " + ", ".join(f"{k} {v}" for k, v in rss.items())
          + f", total {sum(rss.values())}")


if __name__ == "__main__":
    main()
