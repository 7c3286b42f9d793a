#!/usr/bin/env bash
# Builds the nested-Docker test image agentvm-test/dind:<key> (also tagged :latest) without
# internet: a Debian bookworm root made by debootstrap from the mirror apt uses, with Debian's
# docker.io (20.10), containerd, runc, iptables, ca-certificates, busybox, git and make (for the
# agent-workspace test), the agentvm entrypoint (hack/rootfs/agentvm-entrypoint.sh: starts
# dockerd, /var/lib/docker on tmpfs), and
# /opt/agentvm/nested-images.tar: a `docker save` of busybox:latest (imported from the host's
# busybox-static) for `docker load` inside, since nothing can be pulled.
#
# The root filesystem tarball is cached in $AGENTVM_CACHE/nested-image/<key>/rootfs.tar, keyed
# by the hash of this script, the entrypoint and the busybox binary; the image is re-imported
# from it when Docker lacks it. Idempotent. Prints the image name on stdout, progress on stderr.
# Needs root and a running dockerd (hack/docker-up.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '==> nested-image: %s\n' "$*" >&2; }
die() { printf 'make-nested-image.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap needs it)"
command -v docker >/dev/null 2>&1 || die "docker missing (hack/install-deps.sh)"
docker version >/dev/null 2>&1 || die "dockerd is not answering (hack/docker-up.sh)"

entrypoint=$here/rootfs/agentvm-entrypoint.sh
bb=/bin/busybox
file -L "$bb" 2>/dev/null | grep -q 'statically linked' \
  || die "$bb is not busybox-static (apt-get install busybox-static)"
PKGS=docker.io,containerd,runc,iptables,ca-certificates,busybox,procps,git,make
REPO=agentvm-test/dind
key=$(sha256sum "$0" "$entrypoint" "$bb" | cut -d' ' -f1 | sha256sum | cut -c1-16)
image=$REPO:$key
cache=${AGENTVM_CACHE:-/var/cache/agentvm}/nested-image
out=$cache/$key

if docker image inspect "$image" >/dev/null 2>&1; then
  docker tag "$image" "$REPO:latest"
  echo "$image"
  exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# The bookworm mirror apt is configured with (deb822 or one-line sources), else Debian's CDN.
mirror() {
  local m
  m=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$m" ] || m=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# busybox:latest as `docker save` writes it, from the host's busybox-static.
nested_images_tar() {
  local dest=$1 stage tmpimg=agentvm-nested-build/busybox:$key
  stage=$(mktemp -d)
  mkdir -p "$stage"/{bin,etc,tmp,root,var/www}
  cp "$bb" "$stage/bin/busybox"
  for a in $("$stage/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -s busybox "$stage/bin/$a"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$stage/etc/passwd"
  echo 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >>"$stage/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/etc/group"
  chmod 1777 "$stage/tmp"
  tar -C "$stage" -c . | docker import -c 'CMD ["sh"]' -c 'ENV PATH=/bin' - "$tmpimg" >/dev/null
  rm -rf "$stage"
  # Saved under the name the nested tests use; the host never gets a busybox:latest tag.
  docker tag "$tmpimg" busybox:latest-agentvm-nested-$key
  docker save "busybox:latest-agentvm-nested-$key" | python3 -c '
import io, json, sys, tarfile
# Rename the saved tag to busybox:latest (docker save names what it was given).
src = tarfile.open(fileobj=io.BytesIO(sys.stdin.buffer.read()))
dst = tarfile.open(sys.argv[1], "w")
for m in src.getmembers():
    data = src.extractfile(m).read() if m.isfile() else None
    if m.name in ("manifest.json", "repositories", "index.json"):
        txt = data.decode().replace("busybox:latest-agentvm-nested-" + sys.argv[2], "busybox:latest")
        txt = txt.replace("latest-agentvm-nested-" + sys.argv[2], "latest")
        data = txt.encode()
        m.size = len(data)
    dst.addfile(m, io.BytesIO(data) if data is not None else None)
dst.close()
' "$dest" "$key"
  docker rmi "busybox:latest-agentvm-nested-$key" "$tmpimg" >/dev/null
}

if [ ! -f "$out/rootfs.tar" ]; then
  m=$(mirror)
  tmp=$(mktemp -d "$cache/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  log "debootstrap bookworm with $PKGS ($m), a few minutes once; cached in $out"
  debootstrap --variant=minbase --include="$PKGS" bookworm "$tmp/rootfs" "$m" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  r=$tmp/rootfs
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/* "$r"/var/log/*.log \
    "$r"/var/cache/debconf/*-old
  # What a container runtime provides; debootstrap leaves the host's or build-time ones.
  : >"$r/etc/hostname"
  : >"$r/etc/resolv.conf"
  install -D -m 0755 "$entrypoint" "$r/usr/local/bin/agentvm-entrypoint"
  mkdir -p "$r/opt/agentvm"
  log "busybox:latest for the nested Docker (/opt/agentvm/nested-images.tar)"
  nested_images_tar "$r/opt/agentvm/nested-images.tar"
  log "packing the root filesystem"
  tar -C "$r" --numeric-owner --xattrs --xattrs-include='*' -cf "$tmp/rootfs.tar" .
  mkdir -p "$out"
  mv "$tmp/rootfs.tar" "$out/rootfs.tar.part"
  mv "$out/rootfs.tar.part" "$out/rootfs.tar"
  rm -rf "$tmp"
  trap - EXIT
  # Older builds of this image are superseded by this one.
  for old in "$cache"/*/; do
    [ "${old%/}" = "$out" ] || rm -rf "${old:?}"
  done
fi

log "docker import $image ($(du -h "$out/rootfs.tar" | cut -f1))"
docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENTRYPOINT ["/usr/local/bin/agentvm-entrypoint"]' \
  -c 'CMD ["bash"]' \
  -c 'LABEL org.opencontainers.image.description="agentvm nested Docker test image"' \
  "$out/rootfs.tar" "$image" >/dev/null
docker tag "$image" "$REPO:latest"
# Builds from older inputs are superseded: drop their tags (and so their images).
docker image ls --format '{{.Repository}}:{{.Tag}}' "$REPO" | while read -r old; do
  case $old in "$image" | "$REPO:latest") ;; *) docker rmi "$old" >/dev/null 2>&1 || true ;; esac
done
echo "$image"
