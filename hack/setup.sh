#!/usr/bin/env bash
# The one set-up command: installs every dependency (Debian packages, vhost-device-vsock),
# builds the guest kernel (cached), the workspace and the static guest agent, installs them,
# builds the test root filesystem, and runs a command in a microVM to show it all works.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '==> %s\n' "$*" >&2; }

export PATH="$HOME/.cargo/bin:$PATH"
hack/install-deps.sh
kernel/build.sh

log "building the workspace (release)"
cargo build --release --locked --workspace --bins
log "building the static guest agent and syscall probe"
RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --release --locked -p agentvm-agent -p agentvm-probe --target x86_64-unknown-linux-gnu

share=${AGENTVM_SHARE:-/usr/local/share/agentvm}
install -d "$share"
install -m 0755 target/x86_64-unknown-linux-gnu/release/agentvm-agent "$share/agentvm-agent"
# `agentvm check --guest` runs it in a VM; users can also run it in any container.
install -m 0755 target/x86_64-unknown-linux-gnu/release/agentvm-syscall-probe "$share/agentvm-syscall-probe"
for b in agentvm agentvm-image containerd-shim-agentvm-v1; do
  [ -f "target/release/$b" ] && install -m 0755 "target/release/$b" "/usr/local/bin/$b"
done
log "installed agentvm and containerd-shim-agentvm-v1 to /usr/local/bin and the agent to $share"
# A development machine: containers may run under TCG where KVM cannot boot our guest.
agentvm install --allow-tcg

rootfs=$(hack/make-test-rootfs.sh)
log "agentvm check"
agentvm check || true
log "running a command in a microVM (rootfs $rootfs)"
agentvm run --rootfs "$rootfs" -- sh -c 'echo "hello from $(uname -sr) in a microVM"; id'
