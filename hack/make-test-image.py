#!/usr/bin/env python3
"""Writes a small busybox OCI image layout for the tests (no registry, no internet needed):
two gzip layers (busybox + a second layer that adds a file and whites one out), and a config
with Entrypoint/Cmd/Env/WorkingDir, so `agentvm run oci:DIR` exercises the image defaults.
Cached by this script's and busybox's hash; prints the layout directory."""
import gzip, hashlib, io, json, os, shutil, subprocess, sys, tarfile, tempfile

BUSYBOX = "/bin/busybox"
CACHE = os.path.join(os.environ.get("AGENTVM_CACHE", "/var/cache/agentvm"), "test-images")


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


def base(t):
    for d in ["bin", "etc", "root", "tmp", "home", "home/user", "srv", "proc", "sys", "dev"]:
        mode = 0o1777 if d == "tmp" else 0o700 if d == "root" else 0o755
        add(t, d, tarfile.DIRTYPE, mode=mode, uid=1000 if d == "home/user" else 0,
            gid=1000 if d == "home/user" else 0)
    add(t, "bin/busybox", data=open(BUSYBOX, "rb").read(), mode=0o755)
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True).stdout.split()
    for a in applets:
        if a != "busybox":
            add(t, f"bin/{a}", tarfile.SYMTYPE, link="busybox", mode=0o777)
    add(t, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    add(t, "etc/group", data=b"root:x:0:\nuser:x:1000:\n")
    add(t, "etc/obsolete", data=b"removed by the upper layer\n")


def upper(t):
    add(t, "etc/.wh.obsolete")
    add(t, "srv/message", data=b"hello from an OCI image\n")
    add(t, "srv/message-link", tarfile.LNKTYPE, link="srv/message")


def main():
    key = sha(open(__file__, "rb").read() + open(BUSYBOX, "rb").read())[:16]
    out = os.path.join(CACHE, f"busybox-oci-{key}")
    if os.path.isdir(out):
        print(out)
        return
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".oci.", dir=CACHE)
    try:
        blobs = os.path.join(tmp, "blobs", "sha256")
        os.makedirs(blobs)

        def put(b):
            d = sha(b)
            with open(os.path.join(blobs, d), "wb") as f:
                f.write(b)
            return "sha256:" + d, len(b)

        layers, diff_ids = [], []
        for build in (base, upper):
            plain, gz = layer(build)
            digest, size = put(gz)
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                           "digest": digest, "size": size})
            diff_ids.append("sha256:" + sha(plain))
        config = {
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat message; pwd; echo $GREETING"],
                       "Env": ["PATH=/bin", "GREETING=image-env"], "WorkingDir": "/srv"},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        cdigest, csize = put(json.dumps(config).encode())
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cdigest, "size": csize},
                    "layers": layers}
        mdigest, msize = put(json.dumps(manifest).encode())
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
                 "size": msize, "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}, f)
        with open(os.path.join(tmp, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(out)


if __name__ == "__main__":
    sys.exit(main())
