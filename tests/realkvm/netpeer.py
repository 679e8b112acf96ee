"""A network peer for the Linux guests: per nic N a bridge ``klbrN`` (which the guest's tap joins) with a veth into
the namespace ``kvmdm-lane-peer``, where 10.77.N.1/24 answers ping and runs an iperf3 server.

Everything is created with unique names and removed on exit, so on a host with hardware KVM (where the realkvm
tests run without L1) nothing of it stays behind.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

NETNS = "kvmdm-lane-peer"


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


@dataclass(frozen=True)
class Peer:
    bridges: tuple[str, ...]
    addrs: tuple[str, ...]


@contextmanager
def network_peer(count: int) -> Iterator[Peer]:
    bridges = tuple(f"klbr{i}" for i in range(count))
    addrs = tuple(f"10.77.{i}.1" for i in range(count))
    servers: list[subprocess.Popen[bytes]] = []
    _ip("netns", "del", NETNS, check=False)
    for br in bridges:
        _ip("link", "del", br, check=False)
    _ip("netns", "add", NETNS)
    try:
        _ip("link", "set", "lo", "up", ns=NETNS)
        for i, (br, addr) in enumerate(zip(bridges, addrs, strict=True)):
            _ip("link", "add", br, "type", "bridge")
            _ip("link", "set", br, "up")
            _ip("link", "add", f"klv{i}", "type", "veth", "peer", "name", f"klp{i}")
            _ip("link", "set", f"klv{i}", "master", br, "up")
            _ip("link", "set", f"klp{i}", "netns", NETNS)
            _ip("addr", "add", f"{addr}/24", "dev", f"klp{i}", ns=NETNS)
            _ip("link", "set", f"klp{i}", "up", ns=NETNS)
            servers.append(subprocess.Popen(["ip", "netns", "exec", NETNS, "iperf3", "-s", "-B", addr],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)  # iperf3 -s binds before the guest is anywhere near its client run
        for s in servers:
            if s.poll() is not None:
                raise RuntimeError(f"iperf3 server exited with {s.returncode}")
        yield Peer(bridges, addrs)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        _ip("netns", "del", NETNS, check=False)
        for br in bridges:
            _ip("link", "del", br, check=False)
