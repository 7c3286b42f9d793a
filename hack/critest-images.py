#!/usr/bin/env python3
"""Stand-ins for the images Kubernetes' CRI validation suite (critest) pulls, built locally
from busybox (no internet here), and pushed to the registry at argv[1] (HOST:PORT, plain
HTTP) under the names critest asks for, minus their registry host:

  e2e-test-images/busybox:1.29-2            busybox (critest's default test image)
  e2e-test-images/nginx:1.14-2, httpd:2.4.39-4, k8s-staging-cri-tools/hostnet-nginx-amd64
                                            a small static web server (hack/cri/critest-nginx.c)
  e2e-test-images/nonewprivs:1.3            a setuid-root program printing its effective uid
  k8s-staging-cri-tools/test-image-*        busybox with the users and tags the image specs check

hack/critest.sh points containerd's registry.k8s.io and gcr.io hosts at that registry.
The digest-pinned test-image-digest@sha256:9700f9... cannot be reproduced (its spec fails).
"""
import gzip, hashlib, io, json, os, subprocess, sys, tarfile, tempfile

BUSYBOX = "/bin/busybox"
HERE = os.path.dirname(os.path.abspath(__file__))


def sha(b):
    return hashlib.sha256(b).hexdigest()


def add(t, name, kind=tarfile.REGTYPE, data=b"", mode=0o644, uid=0, gid=0, link=""):
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime, ti.linkname = kind, mode, uid, gid, 1700000000, link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    t.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def layer(build):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        build(t)
    plain = raw.getvalue()
    return plain, gzip.compress(plain, mtime=0)


PASSWD = (b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
          b"www-data:x:33:33:www-data:/var/www:/bin/false\n"
          b"default-user:x:1000:1000::/home/default-user:/bin/sh\n")
GROUP = (b"root:x:0:\nwww-data:x:33:\nusers:x:100:\nnogroup:x:65534:\n"
         b"default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n")


def base(t):
    for d in ["bin", "etc", "root", "tmp", "home", "var", "var/run", "var/www", "www", "usr",
              "usr/sbin", "usr/local", "usr/local/bin", "proc", "sys", "dev"]:
        add(t, d, tarfile.DIRTYPE, mode=0o1777 if d in ("tmp", "var/run") else 0o755)
    add(t, "bin/busybox", data=open(BUSYBOX, "rb").read(), mode=0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if a not in ("busybox", "pgrep", "ipcs"):
            # Hard links, as in the busybox image: masking /bin/ls must not mask the shell.
            add(t, f"bin/{a}", tarfile.LNKTYPE, link="bin/busybox", mode=0o755)
    # Applets Debian's busybox lacks and critest's commands use.
    add(t, "bin/pgrep", data=b'#!/bin/sh\nps -o pid,comm | awk -v n="$1" \'NR > 1 && $2 == n { print $1 }\'\n',
        mode=0o755)
    add(t, "bin/ipcs", data=b"#!/bin/sh\ncat /proc/sysvipc/shm\n", mode=0o755)
    add(t, "etc/passwd", data=PASSWD)
    add(t, "etc/group", data=GROUP)
    add(t, "www/index.html", data=b"Welcome to nginx!\n")


def static(name):
    out = os.path.join(tempfile.gettempdir(), f"agentvm-critest-{name}")
    subprocess.run(["gcc", "-static", "-O2", "-o", out, os.path.join(HERE, "cri", f"critest-{name}.c")],
                   check=True)
    return open(out, "rb").read()


def image(out, extra=None, config=None):
    """An OCI layout at `out`: busybox + an optional extra layer, with image config `config`."""
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)

    def put(b):
        d = sha(b)
        with open(os.path.join(out, "blobs", "sha256", d), "wb") as f:
            f.write(b)
        return {"digest": "sha256:" + d, "size": len(b)}

    layers, diff_ids = [], []
    for build in [base] + ([extra] if extra else []):
        plain, gz = layer(build)
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **put(gz)})
        diff_ids.append("sha256:" + sha(plain))
    cfg = {"Env": ["PATH=/usr/local/bin:/usr/sbin:/bin"], "Cmd": ["sh"]}
    cfg.update(config or {})
    c = put(json.dumps({"architecture": "amd64", "os": "linux", "config": cfg,
                        "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode())
    m = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **c},
                        "layers": layers}).encode())
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", **m}]}, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')


def main():
    registry = sys.argv[1]
    nginx, nnp = static("nginx"), static("nnp")

    def server(port):
        return (lambda t: add(t, "usr/sbin/nginx", data=nginx, mode=0o755),
                {"Cmd": ["nginx", "-g", "daemon off;"], "Env": [f"PORT={port}", "PATH=/usr/sbin:/bin"],
                 "ExposedPorts": {f"{port}/tcp": {}}})

    def tagged(name):
        return (lambda t: add(t, name, data=name.encode() + b"\n"), {})

    e2e, staging = "e2e-test-images", "k8s-staging-cri-tools"
    images = {
        f"{e2e}/busybox:1.29-2": (None, {}),
        f"{e2e}/nginx:1.14-2": server(80),
        f"{e2e}/httpd:2.4.39-4": server(80),
        f"{staging}/hostnet-nginx-amd64:latest": server(12003),
        f"{e2e}/nonewprivs:1.3": (lambda t: add(t, "usr/local/bin/nnp", data=nnp, mode=0o4755),
                                  {"Cmd": ["/usr/local/bin/nnp"]}),
        f"{staging}/test-image-user-uid:latest": (None, {"User": "1002"}),
        f"{staging}/test-image-user-username:latest": (None, {"User": "www-data"}),
        f"{staging}/test-image-user-uid-group:latest": (None, {"User": "1003:users"}),
        f"{staging}/test-image-user-username-group:latest": (None, {"User": "www-data:www-data"}),
        f"{staging}/test-image-predefined-group:latest": (None, {"User": "1000"}),
        f"{staging}/test-image-latest:latest": tagged("test-image-latest"),
        f"{staging}/test-image-tag:test": tagged("test-image-tag-test"),
        f"{staging}/test-image-tag:all": tagged("test-image-tag-all"),
        f"{staging}/test-image-digest:latest": tagged("test-image-digest"),
        f"{staging}/test-image-1:latest": tagged("test-image-1"),
        f"{staging}/test-image-2:latest": tagged("test-image-2"),
        f"{staging}/test-image-3:latest": tagged("test-image-3"),
    }
    for t in ("1", "2", "3"):
        images[f"{staging}/test-image-tags:{t}"] = tagged("test-image-tags")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ref, (extra, config)) in enumerate(images.items()):
            out = os.path.join(tmp, str(i))
            image(out, extra, config)
            subprocess.run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{out}",
                            f"docker://{registry}/{ref}"], check=True)
            print(f"{registry}/{ref}")


if __name__ == "__main__":
    main()
