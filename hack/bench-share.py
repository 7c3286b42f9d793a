#!/usr/bin/env python3
"""File-sharing benchmark (issue 5): a small-file workload and large sequential I/O on a bind
mount and on the container root, for runc and for agentvm over virtio-9p and virtio-fs, all in
one run with the configurations interleaved so they see the same machine load; plus
`docker run --rm IMG true` with the container root over 9p and over virtio-fs.

The workload, inside the container (times from /proc/uptime, 10 ms resolution):
  untar   tar -xf of a tarball of 10,000 small files (100 dirs x 100 files, 100 B - 4 KiB,
          made on the host; copied to the guest's /dev/shm first, untimed)
  stat    find -type f | xargs stat over them
  ls-lR   ls -lR over them
  cat     find -type f | xargs cat over them (reading every small file)
  rm      rm -rf of them
  write   dd 128 MiB from /dev/zero to a new file, conv=fsync
  read    dd a 128 MiB file made on the host (in its page cache) to /dev/null, from the
          read-only volume /src (over the same transport as the row's root or bind mount)

Configurations (agentvm ones choose the transport with the runtime's annotations):
  bind mount (-v HOSTDIR:/w): runc; agentvm 9p; agentvm virtio-fs --cache=never (the default);
                              agentvm virtio-fs --cache=auto
  container root (/rootw in the image's root): runc (overlay2); agentvm root over 9p; root over
                              virtio-fs --cache=never; root over virtio-fs --cache=auto

Needs dockerd with the agentvm runtime (hack/docker-up.sh) and virtiofsd (hack/install-deps.sh).
Usage: hack/bench-share.py [-n 3] [--start-runs 10] [--only bind,root,start] [--image IMG]
"""
import argparse, os, random, shutil, statistics, subprocess, sys, tarfile, tempfile, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import procs_mentioning, rss_kib  # noqa: E402

PHASES = ["untar", "stat", "ls-lR", "cat", "rm", "write", "read"]
FILES, DIRS = 10_000, 100
BIG_MIB = 128

AVM = ["--runtime=agentvm"]


def ann(**kv):
    out = []
    for k, v in kv.items():
        out += ["--annotation", f"io.agentvm.{k.replace('_', '-')}={v}"]
    return out


BIND = {
    "runc": ["--runtime=runc"],
    "agentvm 9p": AVM + ann(shares="9p"),
    "agentvm virtio-fs (cache=never)": AVM + ann(shares="virtiofs", virtiofs_cache="never"),
    "agentvm virtio-fs (cache=auto)": AVM + ann(shares="virtiofs", virtiofs_cache="auto"),
}
ROOT = {
    "runc (overlay2)": ["--runtime=runc"],
    "agentvm root 9p": AVM + ann(root_share="9p", shares="9p"),
    "agentvm root virtio-fs (cache=never)": AVM + ann(root_share="virtiofs", shares="virtiofs",
                                                      virtiofs_cache="never"),
    "agentvm root virtio-fs (cache=auto)": AVM + ann(root_share="virtiofs", shares="virtiofs",
                                                     virtiofs_cache="auto"),
}
START = {
    "runc": ["--runtime=runc"],
    "agentvm root 9p": AVM + ann(root_share="9p"),
    "agentvm root virtio-fs (cache=never)": AVM + ann(root_share="virtiofs"),
}

WORKLOAD = r"""
set -e
t() { read u _ < /proc/uptime; echo "T $1 $u"; }
W=$1
mkdir -p $W
cp /src/files.tar /dev/shm/files.tar
t start
tar -xf /dev/shm/files.tar -C $W
t untar
find $W/files -type f | xargs stat -c %s > /dev/null
t stat
ls -lR $W/files > /dev/null
t ls-lR
find $W/files -type f | xargs cat > /dev/null
t cat
rm -rf $W/files
t rm
dd if=/dev/zero of=$W/big bs=1M count=BIG conv=fsync 2>/dev/null
t write
dd if=/src/big of=/dev/null bs=1M 2>/dev/null
t read
rm -f $W/big
""".replace("BIG", str(BIG_MIB))


def make_inputs(src):
    """The tarball of small files and the big file, in `src` (shared read-only)."""
    rng = random.Random(5)
    tree = os.path.join(src, "tree")
    for d in range(DIRS):
        dd = os.path.join(tree, "files", f"d{d:03}")
        os.makedirs(dd)
        for f in range(FILES // DIRS):
            with open(os.path.join(dd, f"f{f:03}.txt"), "wb") as fh:
                fh.write(rng.randbytes(rng.randint(100, 4096)))
    with tarfile.open(os.path.join(src, "files.tar"), "w") as tf:
        tf.add(os.path.join(tree, "files"), arcname="files")
    shutil.rmtree(tree)
    with open(os.path.join(src, "big"), "wb") as fh:
        block = rng.randbytes(1 << 20)
        for _ in range(BIG_MIB):
            fh.write(block)


def run_workload(image, flags, src, where):
    """One container running the workload in `where` ("bind" or "root"); phase times in ms."""
    work = tempfile.mkdtemp(prefix="agentvm-bench-share-", dir="/var/tmp")
    try:
        vols = ["-v", f"{src}:/src:ro", "--shm-size", "256m"]
        if where == "bind":
            vols += ["-v", f"{work}:/w"]
        target = "/w" if where == "bind" else "/rootw"
        t0 = time.monotonic()
        p = subprocess.run(["docker", "run", "--rm", *flags, *vols, image,
                            "sh", "-c", WORKLOAD, "sh", target],
                           capture_output=True, text=True, timeout=1800)
        wall = (time.monotonic() - t0) * 1000
        if p.returncode != 0:
            raise SystemExit(f"workload failed ({flags}): {p.stdout}\n{p.stderr}")
        marks = [line.split() for line in p.stdout.splitlines() if line.startswith("T ")]
        out, prev = {}, None
        for _, name, up in marks:  # phases missing from the output stay missing
            up = float(up) * 1000
            if prev is not None:
                out[name] = up - prev
            prev = up
        out["wall"] = wall
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed_true(image, flags):
    t0 = time.monotonic()
    subprocess.run(["docker", "run", "--rm", *flags, image, "true"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return (time.monotonic() - t0) * 1000


def table(title, configs, results, base):
    cols = [c for c in PHASES + ["wall"] if all(c in r for v in results.values() for r in v)]
    print(f"\n{title}: median ms (x runc)\n")
    print("| configuration | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in configs:
        med = {c: statistics.median(r[c] for r in results[name]) for c in cols}
        bmed = {c: statistics.median(r[c] for r in results[base]) for c in cols}
        cells = []
        for c in cols:
            if name == base:
                cells.append(f"{med[c]:.0f}")
            else:
                ratio = med[c] / bmed[c] if bmed[c] > 0 else float("inf")
                cells.append(f"{med[c]:.0f} ({ratio:.1f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    mbs = {name: BIG_MIB * 1000 / statistics.median(r["read"] for r in results[name])
           for name in configs if statistics.median(r["read"] for r in results[name]) > 0}
    print("\nsequential read MiB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in mbs.items()))
    mbs = {name: BIG_MIB * 1000 / statistics.median(r["write"] for r in results[name])
           for name in configs}
    print("sequential write MiB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in mbs.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--start-runs", type=int, default=10)
    ap.add_argument("--only", default="bind,root,start")
    ap.add_argument("--image", default="agentvm-test/busybox:latest")
    a = ap.parse_args()
    only = set(a.only.split(","))
    src = tempfile.mkdtemp(prefix="agentvm-bench-src-", dir="/var/tmp")
    try:
        make_inputs(src)
        tar_mib = os.path.getsize(os.path.join(src, "files.tar")) / (1 << 20)
        print(f"{FILES} files in {DIRS} dirs, tarball {tar_mib:.1f} MiB; {BIG_MIB} MiB big file; "
              f"median of {a.n} runs, image {a.image}")
        for where, configs, base in (("bind", BIND, "runc"), ("root", ROOT, "runc (overlay2)")):
            if where not in only:
                continue
            results = {k: [] for k in configs}
            for i in range(a.n):
                for name, flags in configs.items():
                    r = run_workload(a.image, flags, src, where)
                    results[name].append(r)
                    print(f"  [{where} {i + 1}/{a.n}] {name}: "
                          + " ".join(f"{k}={v:.0f}" for k, v in r.items()), file=sys.stderr)
            title = ("Small files and sequential I/O on a bind mount (-v HOSTDIR:/w)"
                     if where == "bind" else
                     "The same workload in the container root (/rootw)")
            table(title, configs, results, base)
        if "start" in only:
            runs = {k: [] for k in START}
            timed_true(a.image, AVM)  # warm up
            for _ in range(a.start_runs):
                for name, flags in START.items():
                    runs[name].append(timed_true(a.image, flags))
            print(f"\n`docker run --rm IMG true`, median of {a.start_runs} (ms)\n")
            print("| configuration | ms | vs runc |")
            print("|---|---|---|")
            base = statistics.median(runs["runc"])
            for name, v in runs.items():
                m = statistics.median(v)
                print(f"| {name} | {m:.0f} | {m / base:.2f}x |")
            print_helper_rss(a.image, src)
    finally:
        shutil.rmtree(src, ignore_errors=True)


def print_helper_rss(image, src):
    """Host RSS of the virtiofsd processes of an idle container with its root and one volume
    on virtio-fs (each share has a parent waiting in its sandbox and the serving child)."""
    cid = subprocess.run(["docker", "run", "-d", *AVM, *ann(root_share="virtiofs"),
                          "-v", f"{src}:/src:ro", image, "sh", "-c",
                          "ls -lR / > /dev/null 2>&1; sleep 60"],
                         check=True, capture_output=True, text=True).stdout.strip()
    try:
        time.sleep(8)
        rss = {}
        for pid, cmd in procs_mentioning(cid).items():
            for name in ("virtiofsd", "qemu-system", "vhost-device-vsock"):
                if name in cmd:
                    rss[name] = rss.get(name, 0) + rss_kib(pid)
        print("\nidle container, root + 1 volume on virtio-fs, host RSS (KiB): "
              + ", ".join(f"{k} {v}" for k, v in rss.items()))
    finally:
        subprocess.run(["docker", "rm", "-f", cid], stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
