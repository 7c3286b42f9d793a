#!/usr/bin/env bash
# Makes containerd and dockerd available for the shim's integration tests, with the agentvm
# runtime registered and a local test image, without internet and without systemd:
#   - registers `agentvm` with Docker (/etc/docker/daemon.json) and containerd's CRI
#     (/etc/containerd/config.toml) (`agentvm install`),
#   - starts containerd and dockerd as background processes when they are not running
#     (logs in $AGENTVM_DOCKER_LOGS, default /tmp/agentvm-docker-logs), containerd with the
#     directory of the shim binary given as $1 first on its PATH,
#   - imports agentvm-test/busybox:latest from busybox-static (`docker import`).
# Idempotent. Prints nothing on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '==> %s\n' "$*" >&2; }
shim_dir=${1:-/usr/local/bin}
logs=${AGENTVM_DOCKER_LOGS:-/tmp/agentvm-docker-logs}
mkdir -p "$logs"
agentvm=${AGENTVM_BIN:-$(command -v agentvm || echo target/debug/agentvm)}

for b in containerd dockerd docker; do
  command -v "$b" >/dev/null || { echo "hack/docker-up.sh: $b missing: run hack/install-deps.sh" >&2; exit 1; }
done
# A test machine: containers may run under TCG where KVM cannot boot our guest.
"$agentvm" install --allow-tcg >&2

wait_for() { # what, seconds, command...
  local what=$1 n=$2; shift 2
  for _ in $(seq 1 $((n * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "hack/docker-up.sh: $what did not come up; its log:" >&2
  tail -n 30 "$logs/$what.log" >&2 || true
  exit 1
}

# shellcheck source=hack/daemon-env.sh
. hack/daemon-env.sh

if ! ctr version >/dev/null 2>&1; then
  log "starting containerd (log: $logs/containerd.log)"
  (close_fds; exec "${clean_env[@]}" PATH="$shim_dir:$PATH" setsid nohup containerd \
    >"$logs/containerd.log" 2>&1 </dev/null) &
  wait_for containerd 30 ctr version
fi
if ! docker version >/dev/null 2>&1; then
  log "starting dockerd (log: $logs/dockerd.log)"
  (close_fds; exec "${clean_env[@]}" setsid nohup dockerd --containerd=/run/containerd/containerd.sock \
    >"$logs/dockerd.log" 2>&1 </dev/null) &
  wait_for dockerd 60 docker version
elif ! docker info --format '{{json .Runtimes}}' | grep -q '"agentvm"'; then
  log "dockerd runs without the agentvm runtime: reloading its configuration"
  kill -HUP "$(pidof dockerd)"
  wait_for dockerd 30 sh -c "docker info --format '{{json .Runtimes}}' | grep -q agentvm"
fi

image=agentvm-test/busybox:latest
if ! docker image inspect "$image" >/dev/null 2>&1; then
  log "importing $image from busybox-static"
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage"/{bin,etc,tmp,root}
  cp /bin/busybox "$stage/bin/busybox"
  for a in $("$stage/bin/busybox" --list); do
    [ "$a" = busybox ] || ln -s busybox "$stage/bin/$a"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$stage/etc/passwd"
  echo 'root:x:0:' >"$stage/etc/group"
  chmod 1777 "$stage/tmp"
  tar -C "$stage" -c . | docker import -c 'CMD ["sh"]' -c 'ENV PATH=/bin' - "$image" >/dev/null
fi
