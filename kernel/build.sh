#!/usr/bin/env bash
# Builds the agentvm guest kernel from Debian's linux-source-6.12: `make tinyconfig`, then the
# fragment kernel/agentvm.config, then a check that every requested option is in the final
# .config. The bzImage is cached outside the clone, keyed by the hash of its inputs (fragment,
# this script, source tarball, compiler), so a repeat run returns at once.
#
# Output: $AGENTVM_CACHE/kernel/<key>/{vmlinux,bzImage,config,release,modules/}, copied to $AGENTVM_SHARE/
# (defaults /var/cache/agentvm and /usr/local/share/agentvm), where the runtime looks for it.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
fragment="$here/agentvm.config"
src_tar=${LINUX_SOURCE_TAR:-$(ls /usr/src/linux-source-6.12.tar.xz 2>/dev/null || true)}
cache=${AGENTVM_CACHE:-/var/cache/agentvm}
share=${AGENTVM_SHARE:-/usr/local/share/agentvm}
jobs=${JOBS:-$(nproc)}

log() { printf '==> kernel: %s\n' "$*" >&2; }

if [ -z "$src_tar" ] || [ ! -f "$src_tar" ]; then
  echo "kernel/build.sh: /usr/src/linux-source-6.12.tar.xz not found; run hack/install-deps.sh (apt-get install linux-source-6.12)" >&2
  exit 1
fi

key=$( { sha256sum "$fragment" "$here/build.sh" | cut -d' ' -f1; basename "$src_tar"; stat -c %s "$src_tar"; gcc --version | head -1; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"

install_kernel() {
  mkdir -p "$share"
  cp "$out/bzImage" "$share/bzImage.tmp" && mv "$share/bzImage.tmp" "$share/bzImage"
  cp "$out/vmlinux" "$share/vmlinux.tmp" && mv "$share/vmlinux.tmp" "$share/vmlinux"
  cp "$out/config" "$share/kernel.config"
  # lib/modules/<release>/ for the guest (the runtime puts it into the agent's initramfs)
  if [ -d "$out/modules" ]; then
    rm -rf "$share/modules.tmp"
    cp -r "$out/modules" "$share/modules.tmp"
    rm -rf "$share/modules"
    mv "$share/modules.tmp" "$share/modules"
  fi
  log "ready: $share/vmlinux and $share/bzImage (key $key)"
}

if [ -f "$out/bzImage" ] && [ -f "$out/vmlinux" ]; then
  log "cached build $key"
  install_kernel
  exit 0
fi

work="$cache/kernel-build"
rm -rf "$work"
mkdir -p "$work"
start=$(date +%s)
log "unpacking $(basename "$src_tar")"
tar -C "$work" -xf "$src_tar"
srcdir=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -1)
cd "$srcdir"

make -s ARCH=x86_64 tinyconfig
# merge_config.sh -m: merge only; olddefconfig then resolves dependencies.
./scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null
make -s ARCH=x86_64 olddefconfig

# Every requested option must have landed with the requested value; an option requested off
# ("# CONFIG_X is not set") must be off or absent.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*)
      opt=${line%%=*}
      if ! grep -qx "$line" .config; then
        actual=$(grep -E "^(# )?$opt[= ]" .config || echo "absent")
        echo "kernel/build.sh: requested $line but the final config has: $actual" >&2
        missing=1
      fi
      ;;
    "# CONFIG_"*" is not set")
      opt=${line#\# }; opt=${opt%% *}
      if grep -qE "^$opt=" .config; then
        echo "kernel/build.sh: requested $opt off but the final config has: $(grep -E "^$opt=" .config)" >&2
        missing=1
      fi
      ;;
  esac
done < "$fragment"
if [ "$missing" != 0 ]; then
  echo "kernel/build.sh: some requested options did not land (unmet dependencies?); fix kernel/agentvm.config" >&2
  exit 1
fi
[ "${CHECK_ONLY:-0}" = 1 ] && { log "config check passed"; exit 0; }

log "building bzImage with $jobs jobs"
make -s ARCH=x86_64 -j"$jobs" bzImage 2>&1 | grep -v '^  ' || true
test -f arch/x86/boot/bzImage || { echo "kernel/build.sh: the kernel build failed" >&2; exit 1; }

mkdir -p "$out.tmp"
# Nothing is a loadable module, but with CONFIG_MODULES the build lists what is built in:
# lib/modules/<release>/ with modules.builtin and depmod's indexes lets `modprobe overlay`
# (dockerd, kind, k3s do that) find the module built in and succeed quietly.
release=$(make -s ARCH=x86_64 kernelrelease)
if grep -qx 'CONFIG_MODULES=y' .config; then
  make -s ARCH=x86_64 -j"$jobs" modules 2>&1 | grep -v '^  ' || true
  moddir="$out.tmp/modules/lib/modules/$release"
  mkdir -p "$moddir"
  for f in modules.builtin modules.builtin.modinfo modules.order; do
    if [ -f "$f" ]; then cp "$f" "$moddir/"; else : > "$moddir/$f"; fi
  done
  if command -v depmod >/dev/null || [ -x /sbin/depmod ]; then
    PATH="$PATH:/sbin:/usr/sbin" depmod -b "$out.tmp/modules" "$release" || log "depmod failed: modprobe in the guest will not find built-ins"
  fi
fi
echo "$release" > "$out.tmp/release"
cp arch/x86/boot/bzImage "$out.tmp/bzImage"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
echo "$(( $(date +%s) - start ))" > "$out.tmp/build-seconds"
rm -rf "$out"; mv "$out.tmp" "$out"
cd /; rm -rf "$work"
log "built in $(cat "$out/build-seconds") s"
install_kernel
