#!/usr/bin/env python3
"""Networking benchmark for the shim (issue 5): --runtime=agentvm vs runc, same image, same
run (runtimes interleaved so both see the same machine load).

Throughput, MB/s (10^6 bytes/s), median of --runs, each run a `docker exec` in a long-lived
container of each runtime on the default bridge:
  - container -> host: `dd if=/dev/zero bs=64k | nc GATEWAY PORT`; a Python receiver on the
    bridge's gateway IP times the first to the last byte. busybox nc copies 1 KiB per
    read/write and, at EOF on stdin, half-closes and waits for the host to close.
  - host -> container: the host sends to `nc GATEWAY PORT >/dev/null` (stdin a FIFO opened
    read-write, so nc does not half-close early); timed from the first byte sent to nc's close
    after it read EOF.
  - container -> host, large writes: busybox httpd in the container serves a file from its
    /dev/shm (sendfile); the host GETs it straight from the container's IP; timed from the
    response headers to the last byte.
Latency: sequential HTTP GETs of a 6-byte file from busybox httpd (which forks per
connection), a new TCP connection each, from the host through the published port
(`-p 127.0.0.1::8080`, Docker's proxy) and straight to the container's IP; median and p90 in
ms, after a warm-up, in interleaved blocks.

Every container is removed at the end, also on failure, and the script checks that no
process naming them (shim, QEMU, helpers) is left. Needs dockerd with the agentvm runtime
(hack/docker-up.sh). Prints Markdown tables for docs/benchmarks.md.

With --policy, a third container runs under agentvm with the `agent` egress policy plus a
1,000-entry allowlist (docs/security.md, "Egress policy") and the transfer's gateway port
allowed: the cost of the nftables table against the same agentvm without a policy.

Usage: hack/bench-net.py [--runs 5] [--mib 64] [--requests 200] [--image IMG] [--policy]
"""
import argparse, datetime, http.client, os, re, signal, socket, statistics, subprocess, sys
import threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import docker, docker_rm, md_table, percentile  # noqa: E402

RUNTIMES = ["runc", "agentvm"]
POLICY = "agentvm+policy"


def runtime_args(label, gw):
    """`docker run` arguments of a variant: its runtime, and for POLICY the annotation."""
    if label != POLICY:
        return [f"--runtime={label}"]
    allow = "; ".join(f"allow 198.18.{i // 250}.{i % 250 + 1}" for i in range(1000))
    return ["--runtime=agentvm", "--annotation",
            f"io.agentvm.egress=agent; allow {gw} tcp; {allow}"]
CHUNK = bytes(1 << 20)
WWW = "/dev/shm/www"
BODY = b"hello\n"


def tcp_counters(text):
    """TCP retransmits and input errors from /proc/net/snmp text."""
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Tcp:")]
    t = dict(zip(rows[0], map(int, rows[1])))
    return (f"TCP out {t['OutSegs']} segs, retrans {t['RetransSegs']}, in-errs {t['InErrs']}, "
            f"csum-errs {t['InCsumErrors']}, resets sent {t['OutRsts']}")


def dev_drops(text, where):
    """Per non-loopback interface in /proc/net/dev text: packets, errors and drops."""
    out = []
    for line in text.splitlines():
        if ":" not in line or "|" in line:
            continue
        name, v = line.split(":", 1)
        v = v.split()
        if len(v) != 16 or not all(x.isdigit() for x in v):
            continue  # not an interface line (e.g. /proc/net/snmp's, catted before)
        v = list(map(int, v))
        if name.strip() != "lo" and (v[1] or v[9]):  # skips lo and idle ones (sit0)
            out.append(f"{where} {name.strip()} rx {v[1]} pkts err {v[2]} drop {v[3]}, "
                       f"tx {v[9]} pkts err {v[10]} drop {v[11]}")
    return out


class Transfer:
    """One host end of a timed TCP transfer, on a thread: `recv` counts bytes from the first
    to the last; `send` sends `nbytes`, half-closes and waits for the peer to close."""

    def __init__(self, ip, mode, nbytes=0, timeout=300):
        self.mode, self.nbytes, self.timeout = mode, nbytes, timeout
        self.lsock = socket.socket()
        self.lsock.bind((ip, 0))
        self.lsock.listen(1)
        self.lsock.settimeout(timeout)
        self.port = self.lsock.getsockname()[1]
        self.bytes, self.t0, self.t1, self.error = 0, None, None, None
        self.conn = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            conn, _ = self.lsock.accept()
            self.conn = conn
            with conn:
                conn.settimeout(self.timeout)
                if self.mode == "recv":
                    while True:
                        b = conn.recv(1 << 20)
                        if not b:
                            break
                        if self.t0 is None:
                            self.t0 = time.monotonic()
                        self.bytes += len(b)
                        self.t1 = time.monotonic()
                else:
                    self.t0 = time.monotonic()
                    left = self.nbytes
                    while left:
                        n = min(left, len(CHUNK))
                        conn.sendall(CHUNK[:n])
                        left -= n
                        self.bytes += n
                    conn.shutdown(socket.SHUT_WR)
                    extra = conn.recv(1 << 16)  # b"" when nc exits after reading EOF
                    self.t1 = time.monotonic()
                    if extra:
                        self.error = f"unexpected {len(extra)} bytes from the container"
        except Exception as e:  # noqa: BLE001 - reported, not raised, from the thread
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.lsock.close()

    def abort(self):
        """Ends the transfer now (the container side failed): no more accept or recv."""
        for s in (self.lsock, self.conn):
            try:
                if s:
                    s.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept or recv; close won't
            except OSError:
                pass
        self.wait()

    def wait(self):
        self.thread.join(self.timeout + 10)
        if self.thread.is_alive():
            self.lsock.close()
            return "host end still busy after the timeout"
        return self.error


class Bench:
    def __init__(self, a):
        self.a = a
        self.tag = f"agentvm.bench=net-{os.getpid()}"
        self.cids = {}
        self.ips = {}
        self.ports = {}
        self.tput = {}  # (test, runtime) -> [MB/s]
        self.lat = {}  # (target, runtime) -> [ms]
        self.errors = []
        self.health = {}  # runtime -> [counter lines]
        self.dead = set()  # runtimes whose container stopped
        self.gw = None

    def err(self, what, rt, msg):
        self.errors.append(f"{what} [{rt}]: {msg}")
        print(f"  ERROR {what} [{rt}]: {msg}", file=sys.stderr)

    def start(self):
        self.gw = docker("network", "inspect", "bridge", "-f",
                         "{{range .IPAM.Config}}{{.Gateway}}{{end}}")
        if not self.gw:
            sys.exit("bench-net: the default bridge network has no gateway IP")
        for rt in RUNTIMES:
            cid = docker("run", "-d", "--label", self.tag, *runtime_args(rt, self.gw),
                         "-p", "127.0.0.1::8080", self.a.image, "sh", "-c",
                         f"mkdir -p {WWW} && echo hello > {WWW}/index.html && "
                         f"exec httpd -f -p 8080 -h {WWW}")
            self.cids[rt] = cid
            self.ips[rt] = docker("inspect", "-f", "{{.NetworkSettings.IPAddress}}", cid)
            hp = docker("port", cid, "8080/tcp").splitlines()[0]
            self.ports[rt] = int(hp.rsplit(":", 1)[1])
        for rt in RUNTIMES:
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.get(self.ips[rt], 8080, "/index.html")
                    break
                except Exception as e:  # noqa: BLE001
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{rt}: httpd not reachable after 60 s: {e}")
                    time.sleep(0.2)
            self.exec(rt, f"dd if=/dev/zero of={WWW}/big bs=1M count={self.a.sendfile_mib} "
                          f"2>/dev/null && mkfifo /dev/shm/hold")

    def alive(self, rt):
        """False (reported once) when the runtime's container is no longer running."""
        if rt in self.dead:
            return False
        state = docker("inspect", "-f", "{{.State.Status}} {{.State.Error}}", self.cids[rt],
                       check=False)
        if state.startswith("running"):
            return True
        self.dead.add(rt)
        self.err("container", rt, f"not running any more ({state or 'gone'}): its tests stop")
        return False

    def exec(self, rt, script, timeout=None):
        p = subprocess.run(["docker", "exec", self.cids[rt], "sh", "-c", script],
                           capture_output=True, text=True, timeout=timeout or self.a.timeout)
        if p.returncode != 0:
            raise RuntimeError(f"exit {p.returncode}: {p.stderr.strip()}")
        return p.stdout

    def record(self, test, rt, nbytes, seconds):
        mbs = nbytes / seconds / 1e6
        self.tput.setdefault((test, rt), []).append(mbs)
        print(f"  {test} [{rt}]: {mbs:.1f} MB/s", file=sys.stderr)

    def c2h(self, rt):
        test, n = "c2h-nc", self.a.mib * 16
        t = Transfer(self.gw, "recv", timeout=self.a.timeout)
        try:
            self.exec(rt, f"dd if=/dev/zero bs=64k count={n} 2>/dev/null | nc {self.gw} {t.port}")
        except Exception as e:  # noqa: BLE001
            t.abort()
            return self.err(test, rt, e)
        e = t.wait()
        if e or t.bytes != n * 65536:
            return self.err(test, rt, e or f"received {t.bytes} of {n * 65536} bytes")
        self.record(test, rt, t.bytes, t.t1 - t.t0)

    def h2c(self, rt):
        test, n = "h2c-nc", self.a.mib << 20
        t = Transfer(self.gw, "send", nbytes=n, timeout=self.a.timeout)
        try:
            self.exec(rt, f"nc {self.gw} {t.port} 0<>/dev/shm/hold >/dev/null")
        except Exception as e:  # noqa: BLE001
            t.abort()
            return self.err(test, rt, e)
        e = t.wait()
        if e or t.t1 is None:
            return self.err(test, rt, e or "no close from the container")
        self.record(test, rt, t.bytes, t.t1 - t.t0)

    def sendfile(self, rt):
        test, n = "c2h-sendfile", self.a.sendfile_mib << 20
        try:
            c = http.client.HTTPConnection(self.ips[rt], 8080, timeout=self.a.timeout)
            c.request("GET", "/big")
            r = c.getresponse()
            t0, got = time.monotonic(), 0
            while True:
                b = r.read1(1 << 20)
                if not b:
                    break
                got += len(b)
            t1 = time.monotonic()
            c.close()
            if r.status != 200 or got != n:
                return self.err(test, rt, f"HTTP {r.status}, {got} of {n} bytes")
        except Exception as e:  # noqa: BLE001
            return self.err(test, rt, f"{type(e).__name__}: {e}")
        self.record(test, rt, got, t1 - t0)

    @staticmethod
    def get(host, port, path, timeout=10):
        t0 = time.perf_counter()
        c = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            body = r.read()
        finally:
            c.close()
        dt = (time.perf_counter() - t0) * 1000
        if r.status != 200 or body != BODY:
            raise RuntimeError(f"HTTP {r.status}, body {body[:40]!r}")
        return dt

    def latency(self):
        targets = {"published": lambda rt: ("127.0.0.1", self.ports[rt]),
                   "direct": lambda rt: (self.ips[rt], 8080)}
        block = 20

        def burst(rt, target, count, keep):
            host, port = targets[target](rt)
            for _ in range(count):
                try:
                    dt = self.get(host, port, "/index.html")
                    if keep:
                        self.lat.setdefault((target, rt), []).append(dt)
                except Exception as e:  # noqa: BLE001
                    self.err(f"GET {target} {host}:{port}", rt, f"{type(e).__name__}: {e}")

        for rt in RUNTIMES:
            for target in targets:
                if self.alive(rt):
                    burst(rt, target, self.a.warmup, False)
        done = 0
        while done < self.a.requests:
            k = min(block, self.a.requests - done)
            for rt in RUNTIMES:
                for target in targets:
                    if not self.alive(rt):
                        continue
                    burst(rt, target, k, True)
            done += k
        for (target, rt), v in sorted(self.lat.items()):
            print(f"  GET {target} [{rt}]: median {statistics.median(v):.2f} ms, "
                  f"p90 {percentile(v, 90):.2f} ms, max {max(v):.1f} ms", file=sys.stderr)

    def counters(self):
        """Loss and error counters after the runs: TCP retransmits and errors and interface
        drops as the container's own stack saw them (the guest's for agentvm), and for agentvm
        the host side of its namespace: veth and tap drops, tc (mirred, qdisc) drops."""
        for rt in RUNTIMES:
            if not self.alive(rt):
                continue
            try:
                out = self.exec(rt, "cat /proc/net/snmp /proc/net/dev", timeout=30)
                self.health[rt] = [tcp_counters(out)] + dev_drops(out, "container")
                if rt != "runc":
                    pid = docker("inspect", "-f", "{{.State.Pid}}", self.cids[rt])
                    with open(f"/proc/{pid}/net/dev") as f:
                        self.health[rt] += dev_drops(f.read(), "host netns")
                    for what in ("qdisc", "filter"):
                        for dev in ("eth0", "avmtap0"):
                            args = ["nsenter", "-t", pid, "-n", "tc", "-s", what, "show",
                                    "dev", dev] + (["ingress"] if what == "filter" else [])
                            tc = subprocess.run(args, capture_output=True, text=True).stdout
                            dropped = sum(int(x) for x in re.findall(r"dropped (\d+)", tc))
                            self.health[rt].append(f"tc {what} {dev} dropped {dropped}")
            except Exception as e:  # noqa: BLE001
                self.err("counters", rt, e)

    def report(self):
        a = self.a
        names = {
            "c2h-nc": f"container → host, `dd bs=64k \\| nc` ({a.mib} MiB)",
            "h2c-nc": f"host → container, `nc >/dev/null` ({a.mib} MiB)",
            "c2h-sendfile": f"container → host, httpd sendfile, GET to the container's IP "
                            f"({a.sendfile_mib} MiB)",
        }
        rows = []
        for test, name in names.items():
            m = {rt: statistics.median(self.tput[(test, rt)]) if self.tput.get((test, rt))
                 else float("nan") for rt in RUNTIMES}
            rows.append([name] + [f"{m[rt]:.1f}" for rt in RUNTIMES]
                        + [f"{m[rt] / m['runc']:.3f}x" for rt in RUNTIMES[1:]])
        print(f"{datetime.date.today()}, image {a.image}, throughput median of {a.runs} runs, "
              f"latency {a.requests} requests per runtime and path after {a.warmup} warm-up\n")
        print(md_table(["TCP throughput (MB/s)"] + RUNTIMES
                       + [f"{rt} / runc" for rt in RUNTIMES[1:]], rows))
        print()
        rows = []
        for target, name in (("published", "host → `127.0.0.1:PORT` (`-p 127.0.0.1::8080`)"),
                             ("direct", "host → container IP:8080")):
            v = {rt: self.lat.get((target, rt)) or [float("nan")] for rt in RUNTIMES}
            med = {rt: statistics.median(v[rt]) for rt in RUNTIMES}
            rows.append([name] + [f"{f(v[rt]):.2f}" for rt in RUNTIMES
                                  for f in (statistics.median, lambda x: percentile(x, 90))]
                        + [f"{med[rt] / med['runc']:.2f}x" for rt in RUNTIMES[1:]])
        print(md_table(["HTTP GET, new connection each (ms)"]
                       + [f"{rt} {w}" for rt in RUNTIMES for w in ("median", "p90")]
                       + [f"{rt} / runc (median)" for rt in RUNTIMES[1:]], rows))
        print("\nper-run throughput (MB/s): " + "; ".join(
            f"{t} {rt} " + " ".join(f"{x:.1f}" for x in v) for (t, rt), v in self.tput.items()))
        for rt, h in self.health.items():
            print(f"counters {rt}: " + "; ".join(h))
        print(f"errors: {len(self.errors)}" + "".join(f"\n  - {e}" for e in self.errors))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", "-n", type=int, default=5)
    ap.add_argument("--mib", type=int, default=64, help="payload of the nc transfers")
    ap.add_argument("--sendfile-mib", type=int, default=48,
                    help="file served by httpd from the container's /dev/shm (64 MiB tmpfs)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--timeout", type=int, default=300, help="seconds for one transfer")
    ap.add_argument("--image", default="agentvm-test/busybox:latest")
    ap.add_argument("--policy", action="store_true",
                    help="also agentvm with the agent egress policy and a 1,000-entry allowlist")
    a = ap.parse_args()
    if a.policy:
        RUNTIMES.append(POLICY)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench-net: terminated"))
    b = Bench(a)
    try:
        b.start()
        for i in range(a.runs):
            print(f"run {i + 1}/{a.runs}", file=sys.stderr)
            for step in (b.c2h, b.h2c, b.sendfile):
                for rt in RUNTIMES:
                    if b.alive(rt):
                        step(rt)
        print("latency", file=sys.stderr)
        b.latency()
        b.counters()
    finally:
        left = docker_rm(list(b.cids.values()), label=b.tag)
        for x in left:
            print(f"bench-net: LEFT BEHIND: {x}", file=sys.stderr)
    b.report()
    print("cleanup: " + ("containers and their processes gone" if not left else
                         f"{len(left)} things left behind (see stderr)"))
    sys.exit(1 if left or b.errors else 0)


if __name__ == "__main__":
    main()
