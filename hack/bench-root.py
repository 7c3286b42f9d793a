#!/usr/bin/env python3
"""Container root benchmark (issue 4): the image's files read from a cached ext4 disk
(`layers`, the default) against the whole root shared over virtio-9p or virtio-fs (`share`),
with runc as the baseline, all configurations interleaved in one run.

The layered root's writable layer is shared with virtiofsd `--cache auto` unless annotated;
one configuration shows `never`.

The workload, inside the container (times from /proc/uptime, 10 ms resolution):
  walk    ls -lR /usr (metadata of every file of the image's /usr)
  read    cat of up to 4,000 small files (< 32 KiB) of /usr/lib and /usr/share
  exec    20 x `bash -c true` (binary and shared libraries from the image)
  write   untar 2,000 small files into /rootw (the writable layer), then rm -rf them

Then `docker run --rm IMG true`: runc, share, layers warm (cached image), and layers cold
(the image's ext4 built first: the cache entry is moved aside for the run, then restored).

Needs dockerd with the agentvm runtime (hack/docker-up.sh), virtiofsd and a Debian-based image
(default: the nested-Docker test image, hack/make-nested-image.sh).
Usage: hack/bench-root.py [-n 3] [--start-runs 5] [--image IMG] [--only NAME,NAME]
"""
import argparse, glob, io, json, os, random, shutil, statistics, subprocess, sys, tarfile, time

PHASES = ["walk", "read", "exec", "write"]
AVM = ["--runtime=agentvm"]
CONFIGS = {
    "runc (overlay2)": ["--runtime=runc"],
    "agentvm layers (default: upper cache=auto)": AVM + ["--annotation", "io.agentvm.rootfs=layers"],
    "agentvm layers (upper cache=never)": AVM + ["--annotation", "io.agentvm.rootfs=layers",
                                                "--annotation", "io.agentvm.virtiofs-cache=never"],
    "agentvm share 9p": AVM + ["--annotation", "io.agentvm.rootfs=share",
                               "--annotation", "io.agentvm.root-share=9p"],
    "agentvm share virtio-fs": AVM + ["--annotation", "io.agentvm.rootfs=share",
                                      "--annotation", "io.agentvm.root-share=virtiofs"],
}
WORKLOAD = r"""
t() { echo "T $1 $(cut -d' ' -f1 /proc/uptime)"; }
t start
ls -lR /usr > /dev/null 2>&1
t walk
find /usr/lib /usr/share -type f -size -32k 2>/dev/null | head -n 4000 | xargs cat > /dev/null 2>&1
t read
i=0; while [ $i -lt 20 ]; do bash -c true; i=$((i+1)); done
t exec
mkdir -p /rootw && tar -C /rootw -xf /src/files.tar && rm -rf /rootw
t write
"""


def make_tar(path, n=2000):
    rng = random.Random(7)
    with tarfile.open(path, "w") as tf:
        for i in range(n):
            data = rng.randbytes(rng.randint(100, 4096))
            ti = tarfile.TarInfo(f"d{i % 20}/f{i}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def run_workload(image, flags, src):
    p = subprocess.run(["docker", "run", "--rm", *flags, "-v", f"{src}:/src:ro",
                        "--entrypoint", "sh", image, "-c", WORKLOAD],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise SystemExit(f"workload failed ({flags}): {p.stdout}\n{p.stderr}")
    out, prev = {}, None
    for line in p.stdout.splitlines():
        if line.startswith("T "):
            _, name, up = line.split()
            up = float(up) * 1000
            if prev is not None:
                out[name] = up - prev
            prev = up
    return out


def timed_true(image, flags):
    t0 = time.monotonic()
    subprocess.run(["docker", "run", "--rm", *flags, "--entrypoint", "true", image],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return (time.monotonic() - t0) * 1000


def cached_image_dirs(image):
    """The layers-image cache entries built from `image`'s layer dirs."""
    lower = subprocess.run(["docker", "image", "inspect", "-f",
                            "{{.GraphDriver.Data.UpperDir}}:{{.GraphDriver.Data.LowerDir}}",
                            image], capture_output=True, text=True, check=True).stdout.strip()
    layers = {os.path.realpath(p) for p in lower.split(":") if p and p != "<no value>"}
    root = os.environ.get("AGENTVM_IMAGE_CACHE") or "/var/cache/agentvm/images"
    found = []
    for rec in glob.glob(os.path.join(root, "images", "*", "image.json")):
        with open(rec) as f:
            ids = json.load(f).get("diff_ids", [])
        paths = {i.split(":", 4)[4] for i in ids if i.startswith("dir:")}
        if paths and paths <= layers:
            found.append(os.path.dirname(rec))
    return found


def cold_start(image, flags):
    """`docker run --rm IMG true` with the image's cached ext4 moved aside (built again)."""
    moved = []
    for d in cached_image_dirs(image):
        aside = d + ".bench-aside"
        os.rename(d, aside)
        moved.append((aside, d))
    try:
        return timed_true(image, flags)
    finally:
        for aside, d in moved:
            shutil.rmtree(d, ignore_errors=True)
            os.rename(aside, d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=3)
    ap.add_argument("--start-runs", type=int, default=5)
    ap.add_argument("--image", default="agentvm-test/dind:latest")
    ap.add_argument("--only", help="comma-separated configuration names (runc always runs)")
    ap.add_argument("--no-start", action="store_true", help="skip the docker run true timings")
    a = ap.parse_args()
    if a.only:
        keep = {n.strip() for n in a.only.split(",")} | {"runc (overlay2)"}
        for name in list(CONFIGS):
            if name not in keep:
                del CONFIGS[name]
    src = "/var/tmp/agentvm-bench-root"
    os.makedirs(src, exist_ok=True)
    make_tar(os.path.join(src, "files.tar"))
    try:
        timed_true(a.image, AVM + ["--annotation", "io.agentvm.rootfs=layers"])  # build once
        results = {k: [] for k in CONFIGS}
        for i in range(a.n):
            for name, flags in CONFIGS.items():
                r = run_workload(a.image, flags, src)
                results[name].append(r)
                print(f"  [{i + 1}/{a.n}] {name}: " + " ".join(f"{k}={v:.0f}" for k, v in r.items()),
                      file=sys.stderr)
        base = "runc (overlay2)"
        print(f"\nContainer root, image {a.image}: median of {a.n} runs, ms (x runc)\n")
        print("| configuration | " + " | ".join(PHASES) + " |")
        print("|---|" + "---|" * len(PHASES))
        for name in CONFIGS:
            cells = []
            for c in PHASES:
                m = statistics.median(r[c] for r in results[name])
                b = statistics.median(r[c] for r in results[base])
                cells.append(f"{m:.0f}" if name == base else f"{m:.0f} ({m / b:.1f}x)" if b else f"{m:.0f}")
            print(f"| {name} | " + " | ".join(cells) + " |")

        if a.no_start:
            return
        starts = {"runc": ["--runtime=runc"],
                  "agentvm share 9p": AVM + ["--annotation", "io.agentvm.rootfs=share"],
                  "agentvm layers (cached)": AVM + ["--annotation", "io.agentvm.rootfs=layers"]}
        runs = {k: [] for k in starts}
        cold = []
        for _ in range(a.start_runs):
            for name, flags in starts.items():
                runs[name].append(timed_true(a.image, flags))
            cold.append(cold_start(a.image, starts["agentvm layers (cached)"]))
        runs["agentvm layers (first start: ext4 built)"] = cold
        print(f"\n`docker run --rm IMG true`, median of {a.start_runs} (ms)\n")
        print("| configuration | ms | vs runc |")
        print("|---|---|---|")
        b = statistics.median(runs["runc"])
        for name, v in runs.items():
            m = statistics.median(v)
            print(f"| {name} | {m:.0f} | {m / b:.2f}x |")
    finally:
        shutil.rmtree(src, ignore_errors=True)


if __name__ == "__main__":
    main()
