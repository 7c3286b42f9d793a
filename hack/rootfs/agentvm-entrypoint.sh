#!/bin/sh
# Entrypoint of the reference agent image (Dockerfile.rootfs): starts dockerd in the VM, then
# runs the command. AGENTVM_DOCKERD=0 skips dockerd.
set -eu

start_dockerd() {
  command -v dockerd >/dev/null 2>&1 || return 0
  [ "${AGENTVM_DOCKERD:-1}" = 0 ] && return 0
  # overlay2 needs a real filesystem under /var/lib/docker, not the container's overlay root.
  if ! mountpoint -q /var/lib/docker 2>/dev/null; then
    mkdir -p /var/lib/docker
    mount -t tmpfs -o mode=0711 tmpfs /var/lib/docker
  fi
  mkdir -p /var/log
  dockerd >/var/log/dockerd.log 2>&1 &
  i=0
  while [ ! -S /var/run/docker.sock ] && [ $i -lt 300 ]; do
    sleep 0.1
    i=$((i + 1))
  done
  [ -S /var/run/docker.sock ] || echo "agentvm-entrypoint: dockerd did not start; see /var/log/dockerd.log" >&2
}

start_dockerd
exec "$@"
