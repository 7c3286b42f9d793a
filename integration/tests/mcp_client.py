"""The client side of integration/tests/mcp.rs: drives `agentvm mcp` with the official MCP
Python SDK (PyPI `mcp`, from hack/mcp-client.sh).

    mcp_client.py AGENTVM_BIN IMAGE full       the whole tour; exits 0 when every check held
    mcp_client.py AGENTVM_BIN IMAGE hold       creates a sandbox, prints "READY <id>", then
                                               waits to be killed (the test SIGKILLs it)
    mcp_client.py AGENTVM_BIN IMAGE persist    a persistent sandbox: made in one session, used
                                               and removed in the next
    mcp_client.py AGENTVM_BIN IMAGE net        the network of sandboxes under egress "agent"
                                               and "none", against the servers the test started
                                               (MCP_NET_PUBLIC, MCP_NET_PRIVATE, MCP_NET_METADATA,
                                               MCP_NET_MARKER); prints "NET <address>" per sandbox
    mcp_client.py AGENTVM_BIN IMAGE ctrd       containerd mode (MCP_SERVER_ARGS, MCP_CTRD_ADDRESS,
                                               MCP_CTRD_NAMESPACE, and the net mode's variables)

Every step prints one line ("ok <step> ..."), so a failure shows how far it got. The server
inherits this process's environment (AGENTVM_STATE_ROOT among it).
"""
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


def say(*a):
    print(*a, flush=True)


async def call(s, name, args, expect_error=False):
    r = await s.call_tool(name, args)
    body = r.structured_content
    if body is None:
        # Errors rmcp produces itself (bad arguments) are text only.
        body = {"text": " ".join(getattr(c, "text", "") for c in r.content)}
    if bool(r.is_error) != expect_error:
        raise AssertionError(f"{name}({args}) -> is_error={r.is_error}: {json.dumps(body)[:2000]}")
    return body


async def full(s, image):
    workspace = tempfile.mkdtemp(prefix="agentvm-mcp-ws.")
    try:
        await tour(s, image, workspace)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


async def tour(s, image, workspace):
    init = await s.initialize()
    assert init.server_info.name == "agentvm", init
    assert init.capabilities.tools is not None, init.capabilities
    assert init.instructions and "microVM" in init.instructions
    say("ok initialize", init.protocol_version)

    tools = {t.name: t for t in (await s.list_tools()).tools}
    want = {"sandbox_create", "sandbox_list", "exec", "exec_start", "exec_output", "file_read",
            "file_write", "file_list", "logs", "sandbox_pause", "sandbox_resume", "sandbox_stop",
            "sandbox_remove"}
    assert want <= set(tools), sorted(tools)
    assert tools["exec"].input_schema["properties"]["timeout_seconds"]["description"]
    say("ok list_tools", len(tools))

    # Bad input first: each a clear error, and the session goes on.
    e = await call(s, "exec", {"sandbox_id": "nope", "argv": ["true"]}, expect_error=True)
    assert e["error"]["code"] == "unknown_sandbox", e
    e = await call(s, "sandbox_create", {"image": image, "secrets": ["NO_SUCH_SECRET"]}, expect_error=True)
    assert e["error"]["code"] == "secret_error" and "NO_SUCH_SECRET" in e["error"]["message"], e
    say("ok bad input")

    with open(os.path.join(workspace, "from-host.txt"), "w") as f:
        f.write("host says hi\n")
    t = time.monotonic()
    secret = os.environ["MCP_TEST_SECRET_VALUE"]
    c = await call(s, "sandbox_create", {"image": image, "workspace": workspace,
                                         "env": {"GREETING": "hello"},
                                         "secrets": ["MCP_TOKEN"], "secret_env": ["MCP_TOKEN"]})
    assert secret not in json.dumps(c), c
    sid = c["sandbox"]["id"]
    assert c["sandbox"]["state"] == "running", c
    say("ok sandbox_create", sid, f"{time.monotonic() - t:.1f}s")

    listed = await call(s, "sandbox_list", {})
    assert [x["id"] for x in listed["sandboxes"]] == [sid], listed

    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["echo", "hello from the guest"]})
    assert r["exit_code"] == 0 and r["stdout"] == "hello from the guest\n", r
    r = await call(s, "exec", {"sandbox_id": sid, "shell": "echo $GREETING $X; pwd", "env": {"X": "y"}})
    assert r["stdout"] == "hello y\n/workspace\n", r
    r = await call(s, "exec", {"sandbox_id": sid, "shell":
                               "cat /run/secrets/MCP_TOKEN; echo; echo $MCP_TOKEN; stat -c %a /run/secrets/MCP_TOKEN"})
    assert r["stdout"] == f"{secret}\n{secret}\n400\n", r
    say("ok exec echo, secrets as a file and an env var")

    r = await call(s, "exec", {"sandbox_id": sid, "shell": "echo out; echo err >&2; exit 7"})
    assert (r["exit_code"], r["stdout"], r["stderr"]) == (7, "out\n", "err\n"), r
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["no-such-command"]})
    assert r["exit_code"] == 127, r
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["cat"], "stdin": "fed in\n"})
    assert r["stdout"] == "fed in\n", r
    # 4000 bytes cut at 1000. (Small on purpose: bulk guest output through vhost-device-vsock
    # stalls at times on these hosts, with `agentvm run` too; see the branch's report.)
    r = await call(s, "exec", {"sandbox_id": sid, "shell": "i=0; while [ $i -lt 400 ]; do echo 123456789; i=$((i+1)); done",
                               "max_output_bytes": 1000})
    assert r["stdout_truncated"] and r["stdout"] == "123456789\n" * 100, {k: r[k] for k in r if k != "stdout"}
    say("ok exec exit codes, stdin, capping")

    t = time.monotonic()
    e = await call(s, "exec", {"sandbox_id": sid, "shell": "echo started; sleep 60", "timeout_seconds": 2},
                   expect_error=True)
    assert e["error"]["code"] == "timeout" and e["timed_out"] and e["stdout"] == "started\n", e
    assert time.monotonic() - t < 20, time.monotonic() - t
    say("ok exec timeout", f"{time.monotonic() - t:.1f}s")

    w = await call(s, "file_write", {"sandbox_id": sid, "path": "notes/a.txt", "content": "line 1\n"})
    assert w == {"path": "/workspace/notes/a.txt", "size": 7}, w
    await call(s, "file_write", {"sandbox_id": sid, "path": "/workspace/notes/a.txt", "content": "line 2\n",
                                 "append": True})
    r = await call(s, "file_read", {"sandbox_id": sid, "path": "notes/a.txt"})
    assert r["content"] == "line 1\nline 2\n" and r["encoding"] == "text", r
    # The workspace is the host's directory, both ways.
    with open(os.path.join(workspace, "notes", "a.txt")) as f:
        assert f.read() == "line 1\nline 2\n"
    r = await call(s, "file_read", {"sandbox_id": sid, "path": "from-host.txt"})
    assert r["content"] == "host says hi\n", r
    await call(s, "file_write", {"sandbox_id": sid, "path": "/tmp/bin", "content": "AAEC/w==", "encoding": "base64"})
    r = await call(s, "file_read", {"sandbox_id": sid, "path": "/tmp/bin"})
    assert (r["encoding"], r["content"], r["size"]) == ("base64", "AAEC/w==", 4), r
    # Root in the guest cannot leave setuid files or device nodes in the host's workspace.
    r = await call(s, "exec", {"sandbox_id": sid, "shell":
                               "touch suid; chmod 4755 suid; mknod null c 1 3; ls -l suid; true"})
    st = os.stat(os.path.join(workspace, "suid"))
    assert not st.st_mode & 0o6000, (oct(st.st_mode), r)
    assert not os.path.exists(os.path.join(workspace, "null")), r
    ls = await call(s, "file_list", {"sandbox_id": sid, "path": "/workspace"})
    names = {(x["name"], x["type"]) for x in ls["entries"]}
    assert {("notes", "directory"), ("from-host.txt", "file")} <= names, ls
    e = await call(s, "file_read", {"sandbox_id": sid, "path": "../../../etc/passwd"}, expect_error=True)
    assert e["error"]["code"] == "path_outside_sandbox", e
    e = await call(s, "file_read", {"sandbox_id": sid, "path": "/nonexistent"}, expect_error=True)
    assert e["error"]["code"] == "file_error" and "does not exist" in e["error"]["message"], e
    await call(s, "exec", {"sandbox_id": sid, "shell": "head -c 2000000 /dev/zero > /tmp/big"})
    e = await call(s, "file_read", {"sandbox_id": sid, "path": "/tmp/big"}, expect_error=True)
    assert e["error"]["code"] == "too_large", e
    say("ok files")

    # It runs until told to go on (a file appears), so "running" is certain, whatever the load.
    x = await call(s, "exec_start", {"sandbox_id": sid, "shell":
                                     "echo tick 1; while [ ! -e /tmp/go ]; do sleep 1; done; echo tick 2; echo tick 3; exit 3"})
    xid = x["exec_id"]
    t = time.monotonic()
    first = await call(s, "exec_output", {"sandbox_id": sid, "exec_id": xid})
    assert time.monotonic() - t < 5, "exec_output blocked"
    assert first["running"] and first.get("exit_code") is None, first
    seen = first["stdout"]
    await call(s, "exec", {"sandbox_id": sid, "argv": ["touch", "/tmp/go"]})
    while True:
        o = await call(s, "exec_output", {"sandbox_id": sid, "exec_id": xid, "wait_seconds": 5})
        seen += o["stdout"]
        if not o["running"]:
            break
    assert o["exit_code"] == 3 and seen == "tick 1\ntick 2\ntick 3\n", (o, seen)
    e = await call(s, "exec_output", {"sandbox_id": sid, "exec_id": xid}, expect_error=True)
    assert e["error"]["code"] == "unknown_exec", e
    say("ok exec_start/exec_output")

    p = await call(s, "sandbox_pause", {"sandbox_id": sid})
    assert p["state"] == "paused", p
    e = await call(s, "exec", {"sandbox_id": sid, "argv": ["true"]}, expect_error=True)
    assert e["error"]["code"] == "invalid_state", e
    p = await call(s, "sandbox_resume", {"sandbox_id": sid})
    assert p["state"] == "running", p
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["echo", "back"]})
    assert r["stdout"] == "back\n", r
    say("ok pause/resume")

    lg = await call(s, "logs", {"sandbox_id": sid, "console": True})
    assert "agentvm-agent" in lg.get("console", ""), lg
    say("ok logs")

    st = await call(s, "sandbox_stop", {"sandbox_id": sid})
    assert st["state"] == "stopped", st
    e = await call(s, "exec", {"sandbox_id": sid, "argv": ["true"]}, expect_error=True)
    assert e["error"]["code"] == "invalid_state", e
    rm = await call(s, "sandbox_remove", {"sandbox_id": sid})
    assert rm["id"] == sid, rm
    e = await call(s, "sandbox_remove", {"sandbox_id": sid}, expect_error=True)
    assert e["error"]["code"] == "unknown_sandbox", e
    assert (await call(s, "sandbox_list", {}))["sandboxes"] == []
    say("ok stop/remove")

    # One more with a main process of its own, left for the session's end to remove.
    c = await call(s, "sandbox_create", {"image": image,
                                         "command": ["sh", "-c", "echo main says hi; exec sleep 1000"]})
    sid = c["sandbox"]["id"]
    # Tool calls run concurrently: three 3-second commands take far less than 9 seconds.
    t = time.monotonic()
    rs = await asyncio.gather(*[call(s, "exec", {"sandbox_id": sid, "shell": f"sleep 3; echo {i}"})
                                for i in range(3)])
    assert [r["stdout"] for r in rs] == ["0\n", "1\n", "2\n"], rs
    assert time.monotonic() - t < 8, time.monotonic() - t
    lg = await call(s, "logs", {"sandbox_id": sid})
    assert lg["output"] == "main says hi\n", lg
    say("ok left running", sid, f"(3 parallel execs: {time.monotonic() - t:.1f}s)")


async def hold(s, image):
    await s.initialize()
    c = await call(s, "sandbox_create", {"image": image})
    sid = c["sandbox"]["id"]
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["echo", "up"]})
    assert r["stdout"] == "up\n", r
    say("READY", sid, c["sandbox"].get("address", "-"))
    await asyncio.sleep(3600)


async def reach(s, sid, host, port):
    """Whether a TCP connection from the sandbox to host:port opens (5 s)."""
    r = await call(s, "exec", {"sandbox_id": sid,
                               "shell": f"timeout 5 nc {host} {port} </dev/null && echo OPEN || echo CLOSED"})
    assert "OPEN" in r["stdout"] or "CLOSED" in r["stdout"], r
    return "OPEN" in r["stdout"]


async def net(s, image):
    await s.initialize()
    public, private = os.environ["MCP_NET_PUBLIC"], os.environ["MCP_NET_PRIVATE"]
    metadata, marker = os.environ["MCP_NET_METADATA"], os.environ["MCP_NET_MARKER"]
    c = await call(s, "sandbox_create", {"image": image})
    sid = c["sandbox"]["id"]
    assert c["sandbox"].get("egress") == "agent", c
    say("NET", c["sandbox"]["address"])
    r = await call(s, "exec", {"sandbox_id": sid, "shell": "ip -4 addr show eth0; ip route"})
    assert c["sandbox"]["address"] in r["stdout"] and "default via" in r["stdout"], r
    # (busybox's nc: its wget looks the address up through NSS, which a static busybox lacks.)
    r = await call(s, "exec", {"sandbox_id": sid,
                               "shell": f"printf 'GET /marker.txt HTTP/1.0\\r\\n\\r\\n' | "
                                        f"timeout 10 nc {public} 8080"})
    assert r["exit_code"] == 0 and r["stdout"].rstrip().endswith(marker), r
    say("ok agent reaches the public test host", public)
    assert not await reach(s, sid, private, 8080), "the private test host answered"
    assert not await reach(s, sid, metadata, 8080), "the metadata look-alike answered"
    say("ok agent refuses the private host and the metadata look-alike")
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["cat", "/etc/resolv.conf"]})
    assert r["stdout"] == "nameserver 127.0.0.11\n", r

    n = await call(s, "sandbox_create", {"image": image, "egress": "none"})
    nid = n["sandbox"]["id"]
    assert n["sandbox"]["egress"] == "none" and "address" not in n["sandbox"], n
    r = await call(s, "exec", {"sandbox_id": nid, "shell": "ip route; ls /sys/class/net"})
    assert "default" not in r["stdout"] and "eth0" not in r["stdout"], r
    assert not await reach(s, nid, public, 8080), "egress none reached the public host"
    say("ok none has no network")

    o = await call(s, "sandbox_create", {"image": image,
                                         "egress": f"none-but; allow {private} tcp port 8080"})
    oid = o["sandbox"]["id"]
    say("NET", o["sandbox"]["address"])
    assert await reach(s, oid, private, 8080), "the allowed private host did not answer"
    assert not await reach(s, oid, public, 8080), "none-but reached a host it does not allow"
    say("ok none-but allows only its rule")

    for x in (sid, nid):
        await call(s, "sandbox_remove", {"sandbox_id": x})
    say("ok removed; one networked sandbox left for the session's end")


def ctr_ls(what):
    """IDs of `ctr` containers or tasks of the MCP namespace of the test's containerd."""
    out = subprocess.run(["ctr", "--address", os.environ["MCP_CTRD_ADDRESS"], "-n",
                          os.environ["MCP_CTRD_NAMESPACE"], what, "ls", "-q"],
                         check=True, capture_output=True, text=True).stdout
    return out.split()


async def ctrd(s, image):
    await s.initialize()
    public, private = os.environ["MCP_NET_PUBLIC"], os.environ["MCP_NET_PRIVATE"]
    marker = os.environ["MCP_NET_MARKER"]
    c = await call(s, "sandbox_create", {"image": image})
    sid = c["sandbox"]["id"]
    say("NET", c["sandbox"]["address"])
    assert sid in ctr_ls("containers") and sid in ctr_ls("tasks"), (sid, ctr_ls("containers"))
    say("ok the sandbox is a container of", os.environ["MCP_CTRD_NAMESPACE"])
    r = await call(s, "exec", {"sandbox_id": sid, "shell": "echo $FOO; pwd; id -u",
                               "env": {"FOO": "bar"}, "cwd": "/tmp"})
    assert r["exit_code"] == 0 and r["stdout"] == "bar\n/tmp\n0\n", r
    r = await call(s, "exec", {"sandbox_id": sid, "shell": "exit 3"})
    assert r["exit_code"] == 3, r
    await call(s, "file_write", {"sandbox_id": sid, "path": "/tmp/f", "content": "hello"})
    r = await call(s, "file_read", {"sandbox_id": sid, "path": "/tmp/f"})
    assert r["content"] == "hello", r
    # stdin through ctr's own: all of a large one, and none is EOF at once.
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["wc", "-c"], "stdin": "x" * 300000})
    assert r["exit_code"] == 0 and r["stdout"].strip() == "300000", r
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["cat"], "timeout_seconds": 30})
    assert r["exit_code"] == 0 and r["stdout"] == "", r
    say("ok exec and files")
    r = await call(s, "exec", {"sandbox_id": sid,
                               "shell": f"printf 'GET /marker.txt HTTP/1.0\\r\\n\\r\\n' | "
                                        f"timeout 10 nc {public} 8080"})
    assert r["exit_code"] == 0 and r["stdout"].rstrip().endswith(marker), r
    assert not await reach(s, sid, private, 8080), "the private test host answered"
    say("ok agent reaches the public test host, not the private one")
    n = await call(s, "sandbox_create", {"image": image, "egress": "none"})
    nid = n["sandbox"]["id"]
    assert not await reach(s, nid, public, 8080), "egress none reached the public host"
    say("ok none has no network")
    await call(s, "sandbox_remove", {"sandbox_id": nid})
    assert nid not in ctr_ls("containers"), ctr_ls("containers")
    say("ok removed from containerd")
    # sid is left for the session's end.


async def persist_make(s, image):
    await s.initialize()
    c = await call(s, "sandbox_create", {"image": image, "persistent": True})
    assert c["sandbox"]["persistent"] is True, c
    sid = c["sandbox"]["id"]
    await call(s, "file_write", {"sandbox_id": sid, "path": "/tmp/keep", "content": "still here\n"})
    gone = await call(s, "sandbox_create", {"image": image})
    say("ok persistent created", sid, "and one not", gone["sandbox"]["id"])
    return sid


async def persist_use(s, sid):
    await s.initialize()
    listed = (await call(s, "sandbox_list", {}))["sandboxes"]
    assert [(x["id"], x["persistent"]) for x in listed] == [(sid, True)], listed
    r = await call(s, "exec", {"sandbox_id": sid, "argv": ["cat", "/tmp/keep"]})
    assert r["stdout"] == "still here\n", r
    x = await call(s, "exec_start", {"sandbox_id": sid, "shell": "echo bg"})
    o = await call(s, "exec_output", {"sandbox_id": sid, "exec_id": x["exec_id"], "wait_seconds": 10})
    assert o["stdout"] == "bg\n" and o["exit_code"] == 0, o
    rm = await call(s, "sandbox_remove", {"sandbox_id": sid})
    assert rm["id"] == sid, rm
    for _ in range(50):
        if not (await call(s, "sandbox_list", {}))["sandboxes"]:
            break
        await asyncio.sleep(0.2)
    assert (await call(s, "sandbox_list", {}))["sandboxes"] == []
    e = await call(s, "exec", {"sandbox_id": sid, "argv": ["true"]}, expect_error=True)
    assert e["error"]["code"] == "unknown_sandbox", e
    say("ok persistent used in a new session and removed")


async def session(bin_, fn, *args):
    extra = os.environ.get("MCP_SERVER_ARGS", "").split()
    params = StdioServerParameters(command=bin_, args=["mcp", *extra], env=dict(os.environ))
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            out = await fn(s, *args)
    say("ok session closed")
    return out


async def main():
    bin_, image, mode = sys.argv[1:4]
    if mode == "persist":
        sid = await session(bin_, persist_make, image)
        await session(bin_, persist_use, sid)
    else:
        await session(bin_, {"full": full, "hold": hold, "net": net, "ctrd": ctrd}[mode], image)


asyncio.run(main())
