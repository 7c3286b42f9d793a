#!/usr/bin/env python3
"""Writes the CRI tests' pod sandbox ("pause") image as an OCI image layout: one layer holding
a static /pause built from hack/cri/pause.c with the host's C compiler (no registry, no
internet). Cached by this script's, the source's and the compiler's hash under
$AGENTVM_CACHE/test-images; prints the layout directory. Its index names the tag `3.9`."""
import gzip, hashlib, io, json, os, shutil, subprocess, sys, tarfile, tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cri", "pause.c")
CACHE = os.path.join(os.environ.get("AGENTVM_CACHE", "/var/cache/agentvm"), "test-images")
CC = os.environ.get("CC", "cc")
TAG = "3.9"


def sha(b):
    return hashlib.sha256(b).hexdigest()


def main():
    cc_version = subprocess.run([CC, "--version"], capture_output=True, check=True).stdout
    key = sha(open(__file__, "rb").read() + open(SOURCE, "rb").read() + cc_version)[:16]
    out = os.path.join(CACHE, f"pause-oci-{key}")
    if os.path.isdir(out):
        print(out)
        return
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pause.", dir=CACHE)
    try:
        binary = os.path.join(tmp, "pause")
        subprocess.run([CC, "-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror", "-o", binary,
                        SOURCE], check=True)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
            ti = t.gettarinfo(binary, arcname="pause")
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mtime = 1700000000
            ti.mode = 0o755
            with open(binary, "rb") as f:
                t.addfile(ti, f)
        os.unlink(binary)
        plain = raw.getvalue()
        gz = gzip.compress(plain, mtime=0)
        blobs = os.path.join(tmp, "blobs", "sha256")
        os.makedirs(blobs)

        def put(b):
            d = sha(b)
            with open(os.path.join(blobs, d), "wb") as f:
                f.write(b)
            return "sha256:" + d, len(b)

        ldigest, lsize = put(gz)
        config = {
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + sha(plain)]},
        }
        cdigest, csize = put(json.dumps(config).encode())
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": cdigest, "size": csize},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                "digest": ldigest, "size": lsize}]}
        mdigest, msize = put(json.dumps(manifest).encode())
        with open(os.path.join(tmp, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest,
                 "size": msize, "annotations": {"org.opencontainers.image.ref.name": TAG}}]}, f)
        with open(os.path.join(tmp, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(out)


if __name__ == "__main__":
    sys.exit(main())
