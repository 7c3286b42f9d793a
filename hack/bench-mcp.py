#!/usr/bin/env python3
"""`exec` round trip through `agentvm mcp` vs `docker exec` (issue 14): one command (`true`)
in an already running sandbox, median of N, MCP and Docker interleaved so both see the same
machine load. The MCP client is the official Python SDK (hack/mcp-client.sh's venv; this script
re-executes itself under it); the time is from `call_tool` to its result, so it includes the
JSON-RPC round trip over stdio, the server's work and the agent's. `docker exec` runs into a
`docker run --runtime=agentvm` container of the same busybox image (and a runc one for
reference); its time includes the docker CLI's start.

Needs root, the guest kernel and agent, and for the Docker half dockerd with the agentvm
runtime (hack/docker-up.sh); Docker use holds /tmp/agentvm-docker.lock (shared with the other
users of this machine's Docker).

Usage: hack/bench-mcp.py [-n 20] [--no-docker] [--bin target/debug/agentvm]
"""
import argparse, asyncio, fcntl, os, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def ensure_sdk():
    try:
        import mcp  # noqa: F401
    except ImportError:
        py = subprocess.run([os.path.join(HERE, "mcp-client.sh")], check=True,
                            capture_output=True, text=True).stdout.strip()
        os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


def timed(args):
    t0 = time.monotonic()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return (time.monotonic() - t0) * 1000


async def bench(a):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    image = "oci:" + subprocess.run([os.path.join(HERE, "make-test-image.py")], check=True,
                                    capture_output=True, text=True).stdout.strip()
    params = StdioServerParameters(command=a.bin, args=["mcp"], env=dict(os.environ))
    runs = {"mcp": [], "mcp-server": []}
    containers = {}
    lock = None
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            t0 = time.monotonic()
            c = await s.call_tool("sandbox_create", {"image": image})
            assert not c.is_error, c
            create_ms = (time.monotonic() - t0) * 1000
            sid = c.structured_content["sandbox"]["id"]

            async def mcp_exec():
                t = time.monotonic()
                res = await s.call_tool("exec", {"sandbox_id": sid, "argv": ["true"]})
                ms = (time.monotonic() - t) * 1000
                assert not res.is_error and res.structured_content["exit_code"] == 0, res
                return ms, res.structured_content["duration_ms"]

            await mcp_exec()  # warm up
            try:
                if not a.no_docker:
                    lock = open("/tmp/agentvm-docker.lock", "w")
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    for rt in ("agentvm", "runc"):
                        containers[rt] = subprocess.run(
                            ["docker", "run", "-d", f"--runtime={rt}", a.docker_image, "sleep", "600"],
                            check=True, capture_output=True, text=True).stdout.strip()
                        runs[f"docker-{rt}"] = []
                        timed(["docker", "exec", containers[rt], "true"])  # waits for the boot
                for _ in range(a.n):
                    ms, server_ms = await mcp_exec()
                    runs["mcp"].append(ms)
                    runs["mcp-server"].append(server_ms)
                    for rt, cid in containers.items():
                        runs[f"docker-{rt}"].append(timed(["docker", "exec", cid, "true"]))
            finally:
                if containers:
                    subprocess.run(["docker", "rm", "-f", *containers.values()],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if lock:
                    lock.close()
            await s.call_tool("sandbox_remove", {"sandbox_id": sid})
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print(f"sandbox_create (boot from the cached image, TCG): {create_ms:.0f} ms")
    print(f"exec `true`, median of {a.n}:")
    print("| path | ms |")
    print("|---|---|")
    labels = {
        "mcp": "MCP `exec` (Python SDK client, call to result)",
        "mcp-server": "  of which in the server (agent connection, start, exit)",
        "docker-agentvm": "`docker exec` into `--runtime=agentvm`",
        "docker-runc": "`docker exec` into `--runtime=runc`",
    }
    for k in ("mcp", "mcp-server", "docker-agentvm", "docker-runc"):
        if k in med:
            print(f"| {labels[k]} | {med[k]:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20)
    ap.add_argument("--no-docker", action="store_true")
    ap.add_argument("--bin", default=os.environ.get("AGENTVM_BIN", os.path.join(ROOT, "target/debug/agentvm")))
    ap.add_argument("--docker-image", default="agentvm-test/busybox:latest")
    a = ap.parse_args()
    ensure_sdk()
    asyncio.run(bench(a))


if __name__ == "__main__":
    main()
