#!/usr/bin/env bash
# Nested Docker benchmark (issue 6): in R fresh VMs of the image from hack/make-nested-image.sh,
#   boot        guest uptime when the outer command starts (kernel + agent + rootfs + exec)
#   dockerd     the entrypoint's dockerd start: /var/lib/docker tmpfs, spawn, until
#               `docker version` answers
#   load        `docker load` of the busybox tarball
#   run, cold   the first nested `docker run --rm busybox true`
#   run, warm   N more of them (median over all VMs)
#   outer wall  the whole outer `docker run` as the host sees it
# through Docker (`docker run --runtime=agentvm`, the container root on virtio-9p) and with
# `agentvm run docker-daemon:IMAGE` (the image as a read-only ext4 disk + tmpfs overlay), next
# to the host's runc (`docker run --rm agentvm-test/busybox true`, N runs) as the baseline.
# Usage: hack/bench-nested.sh [-n 5] [-r 3] [--no-agentvm-run]
# Prints a Markdown table for docs/benchmarks.md; progress on stderr. Needs root and
# hack/docker-up.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

N=5
R=3
BARE=1
while [ $# -gt 0 ]; do
  case $1 in
    -n) N=$2; shift 2 ;;
    -r) R=$2; shift 2 ;;
    --no-agentvm-run) BARE=0; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench-nested: %s\n' "$*" >&2; exit 1; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

image=$(hack/make-nested-image.sh)
agentvm=${AGENTVM_BIN:-$(command -v agentvm || echo target/debug/agentvm)}
# Extra flags for the outer container: none are needed (root in the VM holds every
# capability, docs/decisions.md "Nested Docker"); kept as a hook for experiments.
CAPS=()

# Runs in the VM with AGENTVM_DOCKERD=0, so that dockerd starts (through the entrypoint) only
# once the clock runs.
INNER='
ms() { echo $(( $(date +%s%N) / 1000000 )); }
echo "RESULT boot $(awk "{printf \"%d\", \$1 * 1000}" /proc/uptime)"
t0=$(ms); AGENTVM_DOCKERD=1 agentvm-entrypoint true; t1=$(ms)
docker version >/dev/null 2>&1 || { echo "dockerd did not start"; tail -20 /var/log/dockerd.log; exit 1; }
echo "RESULT dockerd $((t1 - t0))"
t0=$(ms); docker load -q -i /opt/agentvm/nested-images.tar >/dev/null || exit 1; t1=$(ms)
echo "RESULT load $((t1 - t0))"
t0=$(ms); docker run --rm busybox true || exit 1; t1=$(ms)
echo "RESULT cold $((t1 - t0))"
for _ in $(seq 1 "$N"); do
  t0=$(ms); docker run --rm busybox true || exit 1; t1=$(ms)
  echo "RESULT warm $((t1 - t0))"
done
'

# bench LABEL COMMAND...: R outer runs; sets B D L C W O (medians) for LABEL.
bench() {
  local label=$1 i t0 t1 out boot=() dockerd=() load=() cold=() warm=() outer=()
  shift
  for i in $(seq "$R"); do
    t0=$(now_ms)
    out=$("$@" 2>&1) || { printf '%s\n' "$out" >&2; die "$label run $i failed"; }
    t1=$(now_ms)
    outer+=($((t1 - t0)))
    boot+=($(awk '$1=="RESULT" && $2=="boot" {print $3}' <<<"$out"))
    dockerd+=($(awk '$1=="RESULT" && $2=="dockerd" {print $3}' <<<"$out"))
    load+=($(awk '$1=="RESULT" && $2=="load" {print $3}' <<<"$out"))
    cold+=($(awk '$1=="RESULT" && $2=="cold" {print $3}' <<<"$out"))
    warm+=($(awk '$1=="RESULT" && $2=="warm" {print $3}' <<<"$out"))
    log "$label $i/$R: boot ${boot[-1]} ms, dockerd ${dockerd[-1]} ms, load ${load[-1]} ms," \
      "run cold ${cold[-1]} ms, warm $(median "${warm[@]: -$N}") ms, outer ${outer[-1]} ms"
  done
  B=$(median "${boot[@]}") D=$(median "${dockerd[@]}") L=$(median "${load[@]}")
  C=$(median "${cold[@]}") W=$(median "${warm[@]}") O=$(median "${outer[@]}")
}

log "runc baseline: docker run --rm agentvm-test/busybox true, $N runs"
docker run --rm agentvm-test/busybox true
base=()
for _ in $(seq "$N"); do
  t0=$(now_ms); docker run --rm agentvm-test/busybox true; t1=$(now_ms)
  base+=($((t1 - t0)))
done
RUNC=$(median "${base[@]}")

log "docker run --runtime=agentvm ${CAPS[*]} $image, $R VMs"
bench docker docker run --runtime=agentvm --rm "${CAPS[@]}" -e AGENTVM_DOCKERD=0 -e N="$N" \
  "$image" bash -c "$INNER"
dB=$B dD=$D dL=$L dC=$C dW=$W dO=$O
bB=- bD=- bL=- bC=- bW=- bO=-
if [ "$BARE" = 1 ]; then
  log "agentvm run docker-daemon:$image, $R VMs"
  "$agentvm" run "docker-daemon:$image" -- true >/dev/null 2>&1 || true # convert once, untimed
  bench agentvm-run "$agentvm" run -e AGENTVM_DOCKERD=0 -e N="$N" "docker-daemon:$image" \
    -- bash -c "$INNER"
  bB=$B bD=$D bL=$L bC=$C bW=$W bO=$O
fi

cat <<EOF

Image $image (Debian bookworm, docker.io $(docker run --rm --entrypoint dpkg-query "$image" \
  -W -f '${Version}' docker.io)), guest 512 MiB / 1 vCPU, TCG. Medians of $R VMs ($N warm
nested runs each); host runc \`docker run --rm busybox true\`: $RUNC ms (median of $N).

| ms | \`docker run --runtime=agentvm\` (root on 9p) | \`agentvm run\` (root on ext4) |
|---|---|---|
| guest uptime at the command | $dB | $bB |
| dockerd start (until it answers) | $dD | $bD |
| \`docker load\` busybox | $dL | $bL |
| nested \`docker run --rm busybox true\`, first | $dC | $bC |
| nested \`docker run --rm busybox true\`, warm | $dW | $bW |
| outer command, host wall | $dO | $bO |
EOF
