#!/usr/bin/env python3
"""Pod benchmark through containerd's CRI plugin (issue 12): RunPodSandbox, then CreateContainer
+ StartContainer of three containers one after the other (a pod with one container, a pod with
three), StopPodSandbox + removal, and the host RSS per pod (its shim and every process under it:
QEMU, virtiofsd, vhost-device-vsock and the namespace holder under agentvm; pause and the
containers' processes under runc), handler agentvm against runc in the same run, medians of N
rounds (the handlers' order alternating; a warm-up round first, not counted).

The CRI calls are made by the ignored test `pod_bench` of integration/tests/cri.rs (the CRI
test suite's client), which prints one `BENCH {json}` line per round and handler; this script
runs it and aggregates. Needs the CRI tests' containerd (hack/cri-up.sh), e.g.:

    flock /tmp/agentvm-cri.lock bash -c 'export AGENTVM_CRI_SOCKET=$(hack/cri-up.sh \\
        target/debug/containerd-shim-agentvm-v1 \\
        target/x86_64-unknown-linux-gnu/release/agentvm-agent); hack/bench-pod.py -n 5'

Usage: hack/bench-pod.py [-n 5] [--json FILE]
"""
import argparse, json, os, statistics, subprocess, sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import md_table  # noqa: E402

HANDLERS = ("runc", "agentvm")


def run_rounds(n):
    """The BENCH records of `n` rounds (plus the warm-up) from the ignored CRI test."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, AGENTVM_BENCH_ROUNDS=str(n), AGENTVM_REQUIRE_VM="1")
    p = subprocess.run(
        ["cargo", "test", "-q", "-p", "agentvm-integration", "--test", "cri", "--",
         "--ignored", "--exact", "pod_bench", "--nocapture"],
        cwd=root, env=env, capture_output=True, text=True)
    records = [json.loads(line[len("BENCH "):]) for line in p.stdout.splitlines()
               if line.startswith("BENCH ")]
    if p.returncode != 0 or not records:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"pod_bench failed ({p.returncode})")
    return records


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=5, help="rounds (after one warm-up round)")
    ap.add_argument("--json", help="also write the raw records to this file")
    a = ap.parse_args()
    records = run_rounds(a.n)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    counted = [r for r in records if not r["warmup"]]
    by = {h: [r for r in counted if r["handler"] == h] for h in HANDLERS}

    def med(h, f):
        return statistics.median(f(r) for r in by[h])

    cols = [
        ("RunPodSandbox", lambda r: r["run_pod_ms"]),
        ("1st container", lambda r: r["create_ms"][0] + r["start_ms"][0]),
        ("2nd container", lambda r: r["create_ms"][1] + r["start_ms"][1]),
        ("3rd container", lambda r: r["create_ms"][2] + r["start_ms"][2]),
        ("pod + 1 container", lambda r: r["run_pod_ms"] + r["create_ms"][0] + r["start_ms"][0]),
        ("pod + 3 containers", lambda r: r["run_pod_ms"] + sum(r["create_ms"]) + sum(r["start_ms"])),
        ("stop + remove pod", lambda r: r["remove_pod_ms"]),
    ]
    m = {h: [med(h, f) for _, f in cols] for h in HANDLERS}
    print(f"median of {a.n} rounds (ms; a container is CreateContainer + StartContainer of "
          f"busybox `sleep`, the later ones added to the running pod)\n")
    rows = [[h] + [f"{v:.0f}" for v in m[h]] for h in HANDLERS]
    rows.append(["agentvm / runc"] + [f"{x / y:.2f}x" for x, y in zip(m["agentvm"], m["runc"])])
    print(md_table(["handler"] + [c for c, _ in cols], rows))

    # A container added to a running pod must not boot anything: < 2x runc's.
    later = [(med("agentvm", f) / med("runc", f)) for _, f in cols[1:3]]
    verdict = "met" if max(later) < 2 else "NOT met"
    print(f"\ntarget (a container added to a running pod < 2x runc's): {verdict} "
          f"(1st {later[0]:.2f}x, 2nd {later[1]:.2f}x)")

    print("\nhost RSS per pod (MiB, median; the shim and every process under it)\n")
    rss_rows = []
    for h in HANDLERS:
        one = med(h, lambda r: r["rss_kib_one"]) / 1024
        three = med(h, lambda r: r["rss_kib_three"]) / 1024
        progs = sorted({p for r in by[h] for p in r["rss_kib_parts"]})
        parts = ", ".join(
            f"{p} {statistics.median(r['rss_kib_parts'].get(p, 0) for r in by[h]) / 1024:.1f}"
            for p in progs)
        rss_rows.append([h, f"{one:.1f}", f"{three:.1f}", parts])
    print(md_table(["handler", "1 container", "3 containers", "with 3 containers, by program"],
                   rss_rows))


if __name__ == "__main__":
    main()
