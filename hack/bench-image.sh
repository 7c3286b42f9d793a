#!/usr/bin/env bash
# Image build benchmark (issue 3): a Debian bookworm minbase image (debootstrap, made into an
# OCI layout with two gzip layers by umoci; cached under /var/cache/agentvm/bench, keyed by
# the hash of the script code that makes it) converted to ext4, each figure the median of N runs:
#   cold    `agentvm-image build oci:LAYOUT` into an empty cache dir
#   cached  the same build again (cache hit)
#   umoci   `umoci unpack` + `mkfs.ext4 -q -d BUNDLE/rootfs out.ext4 SIZE` (same SIZE)
# once with every output on the host's disk (/var/tmp), once on tmpfs (/dev/shm).
# Usage: hack/bench-image.sh [-n 3] [--bin target/release/agentvm-image] [--keep]
# Prints a Markdown table for docs/benchmarks.md. Needs root (debootstrap, umoci unpack).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

N=3
BIN=${AGENTVM_IMAGE_BIN:-$ROOT/target/release/agentvm-image}
KEEP=0
while [ $# -gt 0 ]; do
  case $1 in
    -n) N=$2; shift 2 ;;
    --bin) BIN=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'bench-image: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and umoci unpack need it)"

missing=()
for t in debootstrap:debootstrap umoci:umoci mkfs.ext4:e2fsprogs; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/dev/null
fi

# --- the image: cached by the hash of the code that makes it (make_layout below) -------------
CACHE=${AGENTVM_BENCH_CACHE:-/var/cache/agentvm/bench}
TAG=bench
EXTRA=gcc,libc6-dev,make,python3,git,curl,ca-certificates

# The bookworm mirror apt is configured with (deb822 or one-line sources), else Debian's CDN.
mirror() {
  local m
  m=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$m" ] || m=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

# Writes the OCI layout to $1: debootstrap's minbase tree plus a C toolchain, Python, git and
# curl (minbase alone is ~100 MiB), without apt's caches as in Debian's own container images;
# as two gzip layers (everything but /usr/share, then /usr/share); Cmd /bin/bash.
make_layout() {
  local dest=$1 tmp m
  tmp=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  m=$(mirror)
  log "debootstrap --variant=minbase bookworm ($m), once: cached in $dest"
  debootstrap --variant=minbase --include="$EXTRA" bookworm "$tmp/rootfs" "$m" \
    >"$tmp/debootstrap.log" 2>&1 || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
  rm -rf "$tmp/rootfs/var/cache/apt/archives/"*.deb "$tmp/rootfs/var/lib/apt/lists/"*
  log "umoci: two gzip layers (everything but /usr/share, then /usr/share)"
  umoci init --layout "$tmp/oci"
  umoci new --image "$tmp/oci:$TAG"
  umoci config --image "$tmp/oci:$TAG" --config.cmd /bin/bash \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  umoci unpack --image "$tmp/oci:$TAG" "$tmp/bundle" >/dev/null
  rmdir "$tmp/bundle/rootfs"
  mv "$tmp/rootfs" "$tmp/bundle/rootfs"
  mv "$tmp/bundle/rootfs/usr/share" "$tmp/usr-share"
  umoci repack --refresh-bundle --image "$tmp/oci:$TAG" "$tmp/bundle"
  mv "$tmp/usr-share" "$tmp/bundle/rootfs/usr/share"
  umoci repack --image "$tmp/oci:$TAG" "$tmp/bundle"
  umoci gc --layout "$tmp/oci"
  mv "$tmp/oci" "$dest"
  rm -rf "$tmp"
  trap - EXIT
}

KEY=$({ declare -f mirror make_layout; echo "$TAG $EXTRA"; } | sha256sum | cut -c1-16)
LAYOUT=$CACHE/debian-bookworm-minbase-$KEY
if [ ! -f "$LAYOUT/index.json" ]; then
  mkdir -p "$CACHE"
  make_layout "$LAYOUT"
fi

# --- timing ----------------------------------------------------------------------------------
[ -x "$BIN" ] || die "$BIN not built (cargo build --release -p agentvm-image, or --bin PATH)"
WORKS=()
cleanup() {
  local w
  for w in "${WORKS[@]}"; do
    if [ "$KEEP" = 1 ]; then echo "kept $w" >&2; else rm -rf "$w"; fi
  done
}
trap cleanup EXIT

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# bench WORK: N rounds of the three builds with every output under WORK; sets the medians
# C (cold), H (cached), P (umoci + mkfs), U (of which umoci unpack) and SIZE (ext4 bytes).
# Each timed step starts after `sync`, so no step pays for the previous one's writeback.
bench() {
  local work=$1 i t0 t1 tu out again cold=() cached=() pipe=() unpack=()
  for i in $(seq "$N"); do
    # agentvm-image, cold: an empty cache dir each time.
    rm -rf "$work/cache"
    sync
    t0=$(now_ms)
    out=$("$BIN" --quiet build --cache "$work/cache" "oci:$LAYOUT:$TAG")
    t1=$(now_ms)
    cold+=($((t1 - t0)))
    SIZE=$(stat -c %s "$out")
    # agentvm-image, cached: the same build again.
    sync
    t0=$(now_ms)
    again=$("$BIN" --quiet build --cache "$work/cache" "oci:$LAYOUT:$TAG")
    t1=$(now_ms)
    [ "$again" = "$out" ] || die "cached build returned $again, not $out"
    cached+=($((t1 - t0)))
    rm -rf "$work/cache"
    # The two-tool pipeline, same ext4 size.
    rm -rf "$work/bundle" "$work/out.ext4"
    sync
    t0=$(now_ms)
    umoci unpack --image "$LAYOUT:$TAG" "$work/bundle" >/dev/null
    tu=$(now_ms)
    mkfs.ext4 -q -d "$work/bundle/rootfs" "$work/out.ext4" "$((SIZE / 1024))k" \
      >"$work/mkfs.log" 2>&1 || { cat "$work/mkfs.log" >&2; die "mkfs.ext4 failed"; }
    t1=$(now_ms)
    pipe+=($((t1 - t0)))
    unpack+=($((tu - t0)))
    rm -rf "$work/bundle" "$work/out.ext4"
    log "$work run $i/$N: agentvm-image cold ${cold[-1]} ms, cached ${cached[-1]} ms;" \
      "umoci+mkfs ${pipe[-1]} ms (unpack ${unpack[-1]} ms)"
  done
  C=$(median "${cold[@]}") H=$(median "${cached[@]}") P=$(median "${pipe[@]}")
  U=$(median "${unpack[@]}")
}

# On the host's disk, then (when there is room) on tmpfs, which takes the host filesystem's
# inode allocation and writeback out of the figures.
WORKS+=("$(mktemp -d /var/tmp/agentvm-bench-image.XXXXXX)")
bench "${WORKS[0]}"
dC=$C dH=$H dP=$P dU=$U
tC=- tH=- tP=- tU=-
shm_free=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
if [ "${shm_free:-0}" -gt $((SIZE / 1024 * 3)) ]; then
  WORKS+=("$(mktemp -d /dev/shm/agentvm-bench-image.XXXXXX)")
  bench "${WORKS[1]}"
  tC=$C tH=$H tP=$P tU=$U
else
  log "skipping the tmpfs round: /dev/shm has too little room"
fi

read -r nlayers gz files raw < <(python3 - "$LAYOUT" "$TAG" <<'PY'
import json, os, sys, tarfile
lay, tag = sys.argv[1], sys.argv[2]
blob = lambda d: os.path.join(lay, "blobs", "sha256", d.split(":")[1])
idx = json.load(open(os.path.join(lay, "index.json")))
m = next(x for x in idx["manifests"]
         if x.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
man = json.load(open(blob(m["digest"])))
files = raw = 0
for l in man["layers"]:
    with tarfile.open(blob(l["digest"]), "r:gz") as t:
        for e in t:
            files += 1
            raw += e.size if e.isreg() else 0
print(len(man["layers"]), sum(l["size"] for l in man["layers"]), files, raw)
PY
)
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a == "-" || b == "-") { print "-"; exit }
    r = a / b; printf (r < 0.01 ? "%.4fx" : "%.2fx"), r }'
}
mib() { awk -v a="$1" 'BEGIN { printf "%.0f MiB", a / 1048576 }'; }

cat <<EOF

Image: \`debootstrap --variant=minbase --include=$EXTRA bookworm\`, $nlayers gzip layers,
$(mib "$gz") compressed, $files tar entries, $(mib "$raw") of file content; ext4 $(mib "$SIZE")
(agentvm-image's size, given to mkfs.ext4 too). Median of $N runs, each step after \`sync\`, the
layout's blobs in the page cache.

| build | work dirs on disk: ms | vs baseline | on tmpfs: ms | vs baseline |
|---|---|---|---|---|
| \`umoci unpack\` + \`mkfs.ext4 -d\` (baseline) | $dP | 1.00x | $tP | 1.00x |
| (of which \`umoci unpack\`) | $dU | $(ratio "$dU" "$dP") | $tU | $(ratio "$tU" "$tP") |
| \`agentvm-image build\`, cold (empty cache) | $dC | $(ratio "$dC" "$dP") | $tC | $(ratio "$tC" "$tP") |
| \`agentvm-image build\`, cached | $dH | $(ratio "$dH" "$dP") | $tH | $(ratio "$tH" "$tP") |
EOF
