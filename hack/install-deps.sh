#!/usr/bin/env bash
# Installs every host dependency agentvm needs on Debian bookworm: QEMU, e2fsprogs, the kernel
# build toolchain and Debian's linux-source-6.12, busybox-static (test rootfs), Docker 26 and
# containerd 1.7 from Debian trixie (pinned low, installed by name), the CRI tests' CNI plugins
# and protoc (the CRI client's protos are compiled at build time), the vhost-device-vsock
# and virtiofsd daemons from crates.io, and the MCP Python SDK (PyPI `mcp`, in a venv: the
# client of the `agentvm mcp` tests). Idempotent; safe to re-run.
set -euo pipefail

log() { printf '==> %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "hack/install-deps.sh installs Debian packages: run it as root (or with sudo)." >&2
  exit 1
fi

PKGS=(
  qemu-system-x86 qemu-utils e2fsprogs busybox-static cpio
  build-essential bc bison flex libelf-dev libssl-dev dwarves kmod xz-utils
  linux-source-6.12
  iproute2 nftables procps psmisc docker-registry skopeo debootstrap umoci
  libseccomp-dev libcap-ng-dev
  protobuf-compiler containernetworking-plugins
  python3 python3-venv
)

export DEBIAN_FRONTEND=noninteractive
# Sets `missing` to those of the named packages that are not installed.
find_missing() {
  missing=()
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
}

find_missing "${PKGS[@]}"
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# vhost-device-vsock: the vsock backend when the host has no /dev/vhost-vsock.
VSOCK_VERSION=0.3.0
if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  log "cargo install vhost-device-vsock@${VSOCK_VERSION}"
  cargo install --locked --quiet "vhost-device-vsock@${VSOCK_VERSION}"
fi
# virtiofsd: serves volumes and bind mounts over virtio-fs (docs/decisions.md); without it they
# fall back to virtio-9p. From crates.io: trixie's package would upgrade libc. Builds against
# libseccomp and libcap-ng (their -dev packages are in PKGS).
VIRTIOFSD_VERSION=1.14.0
if ! command -v virtiofsd >/dev/null 2>&1; then
  log "cargo install virtiofsd@${VIRTIOFSD_VERSION}"
  cargo install --locked --quiet "virtiofsd@${VIRTIOFSD_VERSION}"
fi
# Docker and containerd for the shim's integration tests: bookworm's docker.io (20.10) predates
# daemon.json `runtimeType`, so take trixie's docker.io 26 + containerd 1.7. Trixie is pinned at
# priority 100 so that nothing else is ever upgraded from it; only the packages named here are.
# (runc and tini come from bookworm: trixie's builds would pull trixie's libc.)
TRIXIE_PKGS=(docker.io docker-cli containerd docker-compose)
if [ ! -f /etc/apt/sources.list.d/agentvm-trixie.sources ]; then
  log "adding the Debian trixie apt source (pinned at priority 100)"
  cat > /etc/apt/sources.list.d/agentvm-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > /etc/apt/preferences.d/agentvm-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
fi
find_missing "${TRIXIE_PKGS[@]}"
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install -t trixie ${missing[*]}"
  apt-get update -q >/dev/null
  # Explicit trixie versions for exactly these packages; their dependencies come from bookworm
  # where bookworm satisfies them.
  apt-get install -y -q --no-install-recommends \
    $(printf '%s/trixie ' "${missing[@]}") >/dev/null
fi

# The official MCP Python SDK, the client of integration/tests/mcp.rs and hack/bench-mcp.py
# (a venv under /var/cache/agentvm; PyPI is reachable from CI).
log "MCP Python SDK: $("$(dirname "$0")/mcp-client.sh")"

log "dependencies ready"
