#!/usr/bin/env bash
# A containerd of the CRI tests' own (integration/tests/cri.rs), next to and independent of the
# system's (/run/containerd, used by dockerd and the Docker tests):
#   - config, CNI config and socket under $AGENTVM_CRI_STATE (default /run/agentvm-cri-test),
#     images and snapshots under $AGENTVM_CRI_ROOT (default /var/lib/agentvm-cri-test),
#     log in $AGENTVM_CRI_LOGS (default /tmp/agentvm-cri-logs),
#   - the CRI plugin with the handlers `runc` (the reference) and `agentvm`
#     (io.containerd.agentvm.v1), Debian's CNI plugins (bridge `avmcri0` + host-local in
#     10.231.0.0/24, no masquerading: pods talk to this host only; $AGENTVM_CRI_IP_RANGE
#     (`FIRST-LAST`, e.g. 10.231.0.200-10.231.0.250) confines this instance's pod addresses,
#     so a second instance with its own state and root can share the bridge),
#   - the pod sandbox image built locally (hack/make-pause-image.py) and the busybox test image
#     (hack/make-test-image.py), imported into containerd's `k8s.io` namespace.
# Usage: hack/cri-up.sh [SHIM [AGENT]] (default: the installed containerd-shim-agentvm-v1 and
# guest agent). Copies both into a directory of this containerd's own ($AGENTVM_CRI_ROOT/bin),
# which is first on its PATH and holds the AGENTVM_AGENT it passes to the shims, so other
# checkouts' installs do not change what it runs. Starts containerd when its socket does not
# answer (or its config changed). Idempotent. Prints the socket path.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '==> %s\n' "$*" >&2; }
shim=${1:-/usr/local/bin/containerd-shim-agentvm-v1}
agent=${2:-${AGENTVM_SHARE:-/usr/local/share/agentvm}/agentvm-agent}
state=${AGENTVM_CRI_STATE:-/run/agentvm-cri-test}
root=${AGENTVM_CRI_ROOT:-/var/lib/agentvm-cri-test}
logs=${AGENTVM_CRI_LOGS:-/tmp/agentvm-cri-logs}
sock="$state/containerd.sock"
ip_range=${AGENTVM_CRI_IP_RANGE:-}
range_limits=
if [ -n "$ip_range" ]; then
  range_limits=", \"rangeStart\": \"${ip_range%-*}\", \"rangeEnd\": \"${ip_range#*-}\""
fi
cni_bin=/usr/lib/cni
pause_ref=docker.io/agentvm-test/pause:3.9
busybox_ref=docker.io/agentvm-test/busybox:latest

for b in containerd ctr runc; do
  command -v "$b" >/dev/null || { echo "hack/cri-up.sh: $b missing: run hack/install-deps.sh" >&2; exit 1; }
done
for p in bridge host-local loopback; do
  [ -x "$cni_bin/$p" ] || { echo "hack/cri-up.sh: $cni_bin/$p missing: run hack/install-deps.sh (containernetworking-plugins)" >&2; exit 1; }
done
mkdir -p "$state/net.d" "$root/bin" "$logs"
chmod 0711 "$state" "$root"
# Replaced by rename: running shims keep their binary.
for f in "$shim" "$agent"; do
  [ -f "$f" ] || { echo "hack/cri-up.sh: $f missing (build it, or run hack/setup.sh)" >&2; exit 1; }
  install -m 0755 "$f" "$root/bin/.new.${f##*/}"
  mv -f "$root/bin/.new.${f##*/}" "$root/bin/${f##*/}"
done

cat >"$state/net.d/10-agentvm-cri-test.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "agentvm-cri-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "avmcri0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.231.0.0/24"$range_limits}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$state/cni-ipam"
      }
    },
    {
      "type": "firewall"
    }
  ]
}
CNI

config="$state/config.toml"
new_config=$(cat <<TOML
# Written by hack/cri-up.sh: the CRI tests' own containerd.
# Its shim and guest agent: $root/bin (PATH and AGENTVM_AGENT of the daemon).
version = 2
root = "$root"
state = "$state/containerd"
disabled_plugins = ["io.containerd.nri.v1.nri"]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$sock.ttrpc"

[debug]
  address = "$state/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$root/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  # These hosts do not let a process lower its OOM score (/work/shared/DESIGN.md).
  restrict_oom_score_adj = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # Pod network namespaces under this instance's state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true

[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  Root = "$state/runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.agentvm]
  runtime_type = "io.containerd.agentvm.v1"
  # Pod annotations agentvm reads (io.agentvm.egress, share and root choices).
  pod_annotations = ["io.agentvm.*"]

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "$cni_bin"
  conf_dir = "$state/net.d"
  max_conf_num = 1
TOML
)

answers() { ctr --address "$sock" version >/dev/null 2>&1; }
# A containerd started with another config (an older checkout of this script) is replaced.
if answers && [ "$(cat "$config" 2>/dev/null)" != "$new_config" ]; then
  pid=$(cat "$state/containerd.pid" 2>/dev/null || true)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    log "restarting the CRI test containerd (its config changed)"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
fi
printf '%s\n' "$new_config" >"$config"

# shellcheck source=hack/daemon-env.sh
. hack/daemon-env.sh
if ! answers; then
  log "starting the CRI test containerd (socket $sock, log $logs/containerd.log)"
  (close_fds; exec "${clean_env[@]}" PATH="$root/bin:$PATH" AGENTVM_AGENT="$root/bin/${agent##*/}" \
    setsid nohup containerd \
    --config "$config" >"$logs/containerd.log" 2>&1 </dev/null) &
  echo $! >"$state/containerd.pid"
  for _ in $(seq 1 300); do answers && break; sleep 0.1; done
  if ! answers; then
    echo "hack/cri-up.sh: containerd did not come up; its log:" >&2
    tail -n 30 "$logs/containerd.log" >&2 || true
    exit 1
  fi
fi

# Images, into the CRI plugin's namespace. An OCI layout becomes an archive for ctr.
import() { # ref, layout dir
  local ref=$1 dir=$2 name=${1%:*}
  if ctr --address "$sock" -n k8s.io image ls -q | grep -qxF "$ref" \
    && [ "$(cat "$state/imported-${name##*/}" 2>/dev/null)" = "$dir" ]; then
    return 0
  fi
  log "importing $ref from $dir"
  tar -C "$dir" -cf - . | ctr --address "$sock" -n k8s.io image import --base-name "$name" - >/dev/null
  echo "$dir" >"$state/imported-${name##*/}"
}
import "$pause_ref" "$(hack/make-pause-image.py)"
import "$busybox_ref" "${AGENTVM_TEST_IMAGE:-$(hack/make-test-image.py)}"
echo "$sock"
