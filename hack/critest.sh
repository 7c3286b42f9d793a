#!/usr/bin/env bash
# Kubernetes' CRI validation suite (critest, kubernetes-sigs/cri-tools) against the CRI test
# containerd of hack/cri-up.sh, offline. Run by hand, as root; not part of CI.
#
#   hack/critest.sh HANDLER [CRITEST-ARGS...]      HANDLER: runc or agentvm
#
# - critest: $CRITEST, else built from a cri-tools checkout at $CRI_TOOLS_SRC (vendored Go,
#   builds offline with Go >= 1.24: `go test -c -mod=vendor ./cmd/critest`; v1.34.0 is the one
#   documented in docs/kubernetes.md).
# - images: critest pulls registry.k8s.io/e2e-test-images/* and gcr.io/k8s-staging-cri-tools/*.
#   hack/critest-images.py builds busybox-based stand-ins and pushes them to a local
#   docker-registry (Debian's `docker-registry`) on 127.0.0.1:$AGENTVM_CRITEST_REGISTRY_PORT;
#   containerd's hosts.toml (in hack/cri-up.sh's certs.d) sends both hosts there.
# - the CRI test containerd must be up (hack/cri-up.sh; AGENTVM_CRI_SOCKET names its socket;
#   set AGENTVM_CRI_CONTAINERD as for hack/cri-up.sh to run against a containerd 2.x).
# - skipped (cannot run on this machine, both handlers): specs needing AppArmor or SELinux
#   (the hosts have neither), user namespaces (the hosts' kernel/containerd do not offer them),
#   and the image pull by a digest of cri-tools' own registry image (a locally built image
#   cannot have that digest). $AGENTVM_CRITEST_SKIP replaces that list.
# Prints critest's summary; the JUnit report is in $AGENTVM_CRITEST_REPORTS/HANDLER.
set -euo pipefail
cd "$(dirname "$0")/.."
handler=${1:?usage: hack/critest.sh runc|agentvm [critest args]}
shift
sock=${AGENTVM_CRI_SOCKET:-/run/agentvm-cri-test/containerd.sock}
state=$(dirname "$sock")
port=${AGENTVM_CRITEST_REGISTRY_PORT:-5117}
regdir=${AGENTVM_CRITEST_REGISTRY:-/var/lib/agentvm-critest/registry}
reports=${AGENTVM_CRITEST_REPORTS:-/tmp/agentvm-critest}
skip=${AGENTVM_CRITEST_SKIP:-'AppArmor|SELinux|apparmor|selinux|UserNamespaces|should support seccomp localhost|image with digest'}
log() { printf '==> %s\n' "$*" >&2; }

critest=${CRITEST:-}
if [ -z "$critest" ]; then
  src=${CRI_TOOLS_SRC:?set CRITEST to a critest binary or CRI_TOOLS_SRC to a cri-tools checkout}
  critest=$src/build/critest
  if [ ! -x "$critest" ]; then
    log "building critest in $src"
    (cd "$src" && GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local go test -c -o "$critest" ./cmd/critest)
  fi
fi

# The local registry.
registry=127.0.0.1:$port
if ! curl -fsS "http://$registry/v2/" >/dev/null 2>&1; then
  log "starting docker-registry on $registry (storage $regdir)"
  mkdir -p "$regdir"
  cat >"$regdir.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $regdir
  delete:
    enabled: true
http:
  addr: $registry
YML
  # The registry outlives this script: it must not inherit a descriptor of ours (a caller's
  # `flock /tmp/agentvm-cri.lock` would stay held by it for good).
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] && eval "exec $fd>&-"
    done
    setsid nohup docker-registry serve "$regdir.yml" >"$regdir.log" 2>&1 </dev/null &
  )
  for _ in $(seq 1 100); do curl -fsS "http://$registry/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
fi
stamp="$regdir/.pushed-$(cat hack/critest-images.py hack/cri/critest-*.c /bin/busybox | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  log "pushing critest's images to $registry"
  hack/critest-images.py "$registry" >/dev/null
  touch "$stamp"
fi
# Pulled afresh from the registry by the specs (an older push may be in containerd's store).
ctr_bin=ctr
[ -n "${AGENTVM_CRI_CONTAINERD:-}" ] && [ -x "$(dirname "$AGENTVM_CRI_CONTAINERD")/ctr" ] \
  && ctr_bin=$(dirname "$AGENTVM_CRI_CONTAINERD")/ctr
"$ctr_bin" --address "$sock" -n k8s.io images ls -q \
  | grep -E '^(registry\.k8s\.io/e2e-test-images|gcr\.io/k8s-staging-cri-tools)/' \
  | xargs -r "$ctr_bin" --address "$sock" -n k8s.io images rm >/dev/null || true
for host in registry.k8s.io gcr.io; do
  mkdir -p "$state/certs.d/$host"
  cat >"$state/certs.d/$host/hosts.toml" <<TOML
server = "https://$host"
[host."http://$registry"]
  capabilities = ["pull", "resolve"]
TOML
done

mkdir -p "$reports/$handler"
log "critest, handler $handler, containerd at $sock"
set +e
"$critest" --runtime-endpoint "unix://$sock" --image-endpoint "unix://$sock" \
  --runtime-handler "$handler" --report-dir "$reports/$handler" \
  --ginkgo.skip "$skip" --ginkgo.no-color --ginkgo.timeout 3h "$@" 2>&1 | tee "$reports/$handler/critest.log" \
  | grep -E '^(Ran |FAIL|PASS|\[FAIL\]|SUCCESS|Summarizing|  \[FAIL\])|Passed \|' >&2
rc=${PIPESTATUS[0]}
exit "$rc"
