#!/usr/bin/env bash
# Builds the small busybox-static ext4 root filesystem the VM tests boot, cached by the hash of
# its inputs. Prints the image path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${AGENTVM_CACHE:-/var/cache/agentvm}/test-images
bb=$(command -v busybox 2>/dev/null || echo /bin/busybox)
if [ ! -x "$bb" ] || ! file -L "$bb" 2>/dev/null | grep -q 'statically linked'; then
  bb=/bin/busybox
fi
[ -x "$bb" ] || { echo "make-test-rootfs.sh: busybox not found: apt-get install busybox-static" >&2; exit 1; }
key=$( { sha256sum "$here/make-test-rootfs.sh" "$bb" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
out="$cache/busybox-$key.ext4"
if [ -f "$out" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
stage=$(mktemp -d "$cache/.stage.XXXXXX")
trap 'rm -rf "$stage" "$out.tmp"' EXIT
chmod 755 "$stage"
mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,etc,root,home/user,proc,sys,dev,run,var/tmp,tmp}
chmod 1777 "$stage/tmp" "$stage/var/tmp"
chmod 700 "$stage/root"
cp "$bb" "$stage/bin/busybox"
for applet in $("$stage/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$stage/bin/$applet"
done
cat > "$stage/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$stage/etc/group" <<'G'
root:x:0:
tty:x:5:
user:x:1000:
nogroup:x:65534:
G
echo agentvm-test > "$stage/etc/hostname"
chown -R 1000:1000 "$stage/home/user"
mkfs.ext4 -q -F -L agentvm-test -d "$stage" -E root_owner=0:0 "$out.tmp" 32M >&2
mv "$out.tmp" "$out"
echo "$out"
