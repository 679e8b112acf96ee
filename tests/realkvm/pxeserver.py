"""A network-boot server for firmware guests: a bridge (which the guest's tap joins) with a veth into a fresh
network namespace, where a dnsmasq (Debian's dnsmasq-base) answers DHCP on 10.78.0.0/24 and serves a directory by
TFTP, with a boot file named in its DHCP offers (``--dhcp-boot``).

dnsmasq's log (DHCP and TFTP lines) is read by a thread and kept with the time each line arrived, so a test can
wait for events and report how long DHCP and each TFTP transfer took. Namespace, bridge, veth and dnsmasq have
unique names and are removed on exit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.realkvm.netpeer import _ip

SERVER = "10.78.0.1"
SUBNET_PREFIX = "10.78.0."
DHCP_RANGE = "10.78.0.100,10.78.0.150,255.255.255.0,1h"


@dataclass
class PxeServer:
    bridge: str
    netns: str
    addr: str
    tftp_root: Path
    t0: float
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since t0, dnsmasq log line)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def _feed(self, stream: object) -> None:
        # In the lane the run dir is the host's (9p): the log can be watched there while the guest runs.
        lane_run = os.environ.get("KVMDM_LANE_RUN")
        live = open(Path(lane_run) / "pxe-dnsmasq.log", "a") if lane_run else None  # noqa: SIM115
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            t, line = time.monotonic() - self.t0, raw.decode(errors="replace").rstrip()
            with self._cond:
                self.lines.append((t, line))
                self._cond.notify_all()
            if live is not None:
                live.write(f"{t:8.1f} {line}\n")
                live.flush()
        if live is not None:
            live.close()

    def first(self, needle: str) -> float | None:
        """When dnsmasq first logged a line containing ``needle`` (seconds since the server started), or None."""
        with self._cond:
            return next((t for t, line in self.lines if needle in line), None)

    def log(self) -> str:
        with self._cond:
            return "\n".join(f"{t:8.1f} {line}" for t, line in self.lines)


def dnsmasq_argv(iface: str, tftp_root: Path, boot_file: str, state: Path) -> list[str]:
    return [
        shutil.which("dnsmasq") or "/usr/sbin/dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
        "--port=0",  # no DNS
        "--no-ping",  # offer at once (by default dnsmasq pings an address for ~3 s before offering it)
        "--no-resolv", "--no-hosts", "--bind-interfaces", f"--interface={iface}",
        f"--dhcp-range={DHCP_RANGE}", f"--dhcp-boot={boot_file}", f"--dhcp-leasefile={state / 'leases'}",
        "--enable-tftp", f"--tftp-root={tftp_root}",
        "--pid-file=",  # none
        "--user=root", "--group=root",  # the TFTP root is under the test's private tmp dir
        "--log-dhcp", "--log-facility=-",
    ]


@contextmanager
def pxe_server(tftp_root: Path, boot_file: str) -> Iterator[PxeServer]:
    if shutil.which("dnsmasq") is None and not Path("/usr/sbin/dnsmasq").exists():
        raise RuntimeError("dnsmasq is not installed (apt-get install dnsmasq-base; scripts/setup does)")
    tag = uuid.uuid4().hex[:6]
    ns, bridge, outer, inner = f"kvmdm-pxe-{tag}", f"kpxbr{tag}", f"kpxv{tag}", f"kpxp{tag}"
    state = tftp_root.parent / f".dnsmasq-{tag}"
    state.mkdir()
    proc: subprocess.Popen[bytes] | None = None
    _ip("netns", "add", ns)
    try:
        for knob in ("all", "default"):
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{knob}.disable_ipv6=1"],
                           check=True, capture_output=True, timeout=30)
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", outer, "master", bridge, "up")
        _ip("link", "set", inner, "netns", ns)
        _ip("addr", "add", f"{SERVER}/24", "dev", inner, ns=ns)
        _ip("link", "set", inner, "up", ns=ns)
        srv = PxeServer(bridge, ns, SERVER, tftp_root, time.monotonic())
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *dnsmasq_argv(inner, tftp_root, boot_file, state)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=srv._feed, args=(proc.stderr,), daemon=True, name="dnsmasq-log").start()
        deadline = time.monotonic() + 60
        while srv.first("DHCP, IP range") is None or srv.first("TFTP root") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                time.sleep(0.2)
                raise RuntimeError(f"dnsmasq did not start (rc={proc.poll()}):\n{srv.log()}")
            time.sleep(0.05)
        yield srv
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _ip("netns", "del", ns, check=False)
        _ip("link", "del", bridge, check=False)
        _ip("link", "del", outer, check=False)  # normally gone with its peer's namespace
        shutil.rmtree(state, ignore_errors=True)
