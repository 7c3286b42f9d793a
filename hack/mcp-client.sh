#!/usr/bin/env bash
# Makes (once) a Python venv with the official MCP Python SDK (PyPI `mcp`), the client of the
# `agentvm mcp` integration test and benchmark, and prints its python's path. Cached under
# $AGENTVM_CACHE (default /var/cache/agentvm), keyed by the SDK version; a venv is used only
# once its install finished (the `ready` marker).
set -euo pipefail

MCP_VERSION=2.3.0
CACHE=${AGENTVM_CACHE:-/var/cache/agentvm}
VENV="$CACHE/mcp-client-venv-$MCP_VERSION"
PY=${PYTHON:-python3}

if [ ! -f "$VENV/ready" ]; then
  mkdir -p "$CACHE"
  exec 9>"$VENV.lock"
  flock 9
  if [ ! -f "$VENV/ready" ]; then
    rm -rf "$VENV"
    "$PY" -m venv "$VENV" >&2 || {
      echo "hack/mcp-client.sh: $PY -m venv failed: apt-get install python3-venv (Python >= 3.10)" >&2
      exit 1
    }
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "mcp==$MCP_VERSION" >&2
    touch "$VENV/ready"
  fi
fi
echo "$VENV/bin/python"
