#!/usr/bin/env bash
# The test command: formatting, lints, unit tests and the VM tests. Run hack/setup.sh first.
# Under CI (CI=true) a VM test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
log() { printf '==> %s\n' "$*" >&2; }

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "building the static guest agent, the syscall probe and the test rootfs"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p agentvm-agent -p agentvm-probe --target x86_64-unknown-linux-gnu
agent="$PWD/target/x86_64-unknown-linux-gnu/release/agentvm-agent"
AGENTVM_SYSCALL_PROBE="$PWD/target/x86_64-unknown-linux-gnu/release/agentvm-syscall-probe"
export AGENTVM_SYSCALL_PROBE
if [ "$(id -u)" = 0 ]; then
  # Installed where every runtime finds it, shims started by a long-running containerd too
  # (an exported path would live on in that containerd's environment after this checkout).
  install -D -m 0755 "$agent" "${AGENTVM_SHARE:-/usr/local/share/agentvm}/agentvm-agent"
else
  export AGENTVM_AGENT="$agent"
fi
AGENTVM_TEST_ROOTFS=$(hack/make-test-rootfs.sh)
export AGENTVM_TEST_ROOTFS
AGENTVM_TEST_IMAGE=$(hack/make-test-image.py)
export AGENTVM_TEST_IMAGE
cargo build --workspace --locked --bins
if [ "${CI:-}" = true ]; then
  export AGENTVM_REQUIRE_VM=1
fi

# Docker tests: containerd + dockerd (started here when not running), the agentvm runtime
# registered, the freshly built shim on containerd's PATH, and a local test image.
if [ "$(id -u)" = 0 ] && command -v dockerd >/dev/null 2>&1; then
  log "containerd and dockerd for the Docker tests"
  install -m 0755 target/debug/containerd-shim-agentvm-v1 /usr/local/bin/containerd-shim-agentvm-v1
  AGENTVM_BIN="$PWD/target/debug/agentvm" hack/docker-up.sh /usr/local/bin
  log "the nested-Docker test image (cached by its inputs)"
  AGENTVM_NESTED_IMAGE=$(hack/make-nested-image.sh)
  export AGENTVM_NESTED_IMAGE
else
  log "not root or no dockerd (hack/install-deps.sh installs it): the Docker tests will skip"
fi

# CRI tests: a containerd of their own (socket, config, CNI network, pause and busybox images
# in k8s.io) running this checkout's shim and agent, copied to its own directory.
if [ "$(id -u)" = 0 ] && command -v containerd >/dev/null 2>&1; then
  log "containerd for the CRI tests"
  AGENTVM_CRI_SOCKET=$(hack/cri-up.sh target/debug/containerd-shim-agentvm-v1 "$agent")
  export AGENTVM_CRI_SOCKET
else
  log "not root or no containerd: the CRI tests will skip"
fi

log "cargo test"
cargo test --workspace --locked
