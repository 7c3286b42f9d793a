#!/bin/sh
# Entrypoint of the images with Docker Engine inside (Dockerfile.rootfs, and the test image of
# hack/make-nested-image.sh): starts dockerd in the VM, waits until it answers, then runs the
# command. A failure to start dockerd is reported on stderr and the command still runs.
#
#   AGENTVM_DOCKERD=0                 do not start dockerd
#   AGENTVM_DOCKERD_TIMEOUT=SECONDS   how long to wait for dockerd (default 180: TCG is slow)
#   AGENTVM_DOCKERD_ARGS="..."        extra dockerd arguments
#
# /var/lib/docker must be on a filesystem overlay2 can use as its upper layer: tmpfs or a
# block-device filesystem inside the VM. The container root (virtio-9p under agentvm, overlayfs
# under runc) and volumes shared from the host (virtio-9p, virtio-fs) cannot be; when
# /var/lib/docker is on one of those, a tmpfs is mounted over it (size: half the VM's memory
# unless AGENTVM_DOCKER_TMPFS_SIZE says otherwise, e.g. 2g).
#
# dockerd and containerd listen on unix sockets under /run (/var/run/docker.sock,
# /run/containerd/s/...). A virtio-9p root cannot hold a bound unix socket (bind fails with
# ENXIO), so when /run is on 9p or virtio-fs and nothing is mounted below it, a tmpfs is
# mounted on /run with the image's /run copied into it, as an init system would.
set -eu

say() { printf 'agentvm-entrypoint: %s\n' "$*" >&2; }

# The filesystem type holding $1: the last-mounted longest mount point prefix in
# /proc/self/mounts (the kernel's own view; no util-linux needed).
fstype_of() {
  _best=-1 _type=unknown
  while read -r _dev _mnt _fs _rest; do
    case $_mnt in /) _p=/ ;; *) _p=$_mnt/ ;; esac
    case "$1/" in
      "$_p"*) if [ ${#_mnt} -ge "$_best" ]; then _best=${#_mnt} _type=$_fs; fi ;;
    esac
  done </proc/self/mounts
  echo "$_type"
}

docker_storage() {
  mkdir -p /var/lib/docker
  fs=$(fstype_of /var/lib/docker)
  case $fs in
    tmpfs | ext4 | ext3 | ext2 | xfs | btrfs) return 0 ;;
  esac
  opts=mode=0711
  [ -n "${AGENTVM_DOCKER_TMPFS_SIZE:-}" ] && opts="$opts,size=$AGENTVM_DOCKER_TMPFS_SIZE"
  mount -t tmpfs -o "$opts" tmpfs /var/lib/docker || {
    say "cannot mount a tmpfs on /var/lib/docker (it is on $fs); mounting needs CAP_SYS_ADMIN"
    return 1
  }
}

run_tmpfs() {
  case $(fstype_of /run) in 9p | virtiofs | fuse) ;; *) return 0 ;; esac
  if grep -q '^[^ ]* /run/' /proc/self/mounts; then
    say "/run is on a shared filesystem and has mounts below it: not mounting a tmpfs there"
    return 0
  fi
  mkdir -p /run
  tmp=$(mktemp -d /dev/shm/agentvm-run.XXXXXX 2>/dev/null || mktemp -d)
  cp -a /run/. "$tmp"/ 2>/dev/null || true
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run || {
    say "cannot mount a tmpfs on /run; mounting needs CAP_SYS_ADMIN"
    rm -rf "$tmp"
    return 1
  }
  cp -a "$tmp"/. /run/ 2>/dev/null || true
  rm -rf "$tmp"
}

start_dockerd() {
  command -v dockerd >/dev/null 2>&1 || return 0
  [ "${AGENTVM_DOCKERD:-1}" = 0 ] && return 0
  if [ -S /var/run/docker.sock ] && docker version >/dev/null 2>&1; then
    return 0
  fi
  docker_storage && run_tmpfs || { say "dockerd not started"; return 0; }
  mkdir -p /var/log
  # shellcheck disable=SC2086 # AGENTVM_DOCKERD_ARGS is a list of arguments
  dockerd ${AGENTVM_DOCKERD_ARGS:-} >/var/log/dockerd.log 2>&1 &
  pid=$!
  # Poll for the socket (cheap), then for an answer (the API serves once the daemon is up).
  deadline=$(($(date +%s) + ${AGENTVM_DOCKERD_TIMEOUT:-180}))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
      say "dockerd exited; the end of /var/log/dockerd.log:"
      tail -n 20 /var/log/dockerd.log >&2 || true
      return 0
    fi
    if [ -S /var/run/docker.sock ]; then
      if ! command -v docker >/dev/null 2>&1 || docker version >/dev/null 2>&1; then
        return 0
      fi
    fi
    sleep 0.1
  done
  say "dockerd did not answer within ${AGENTVM_DOCKERD_TIMEOUT:-180} s; see /var/log/dockerd.log"
}

start_dockerd
[ $# -gt 0 ] || set -- sh
exec "$@"
