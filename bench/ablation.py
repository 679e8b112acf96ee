"""Ablation: the old design (virtio backends inline in the DM) against the stub design (vhost-user back-end process).

Same guests, same workloads, two designs:
  inline  pv.blk.Block / pv.net.Net attached to the DM (this process): served on worker threads that share the
          DM's GIL with the vCPU thread;
  stub    ``kvmdm-backend blk|net`` (jailed when root) serving the same pv device over vhost-user; the DM only
          holds a pv.vhost_user.frontend.VhostUserDevice: the guest's notify ioeventfd is the back-end's kick,
          the back-end's call eventfd is the guest's irqfd.

Per design, each measured between the guest's '<' '>' markers on COM1 (timestamped in the serial sink, i.e. in the
vCPU thread at the exit, like bench/exits.py), median of --repeat runs:
  * DM userspace exits per request during the phase (all exits, and MMIO ones = virtio notify/config; the two
    marker writes on COM1 are included, ~2-4 exits per phase);
  * blk (tests/guests/virtio_blk.S ``bench=1``; synchronous driver, one request in flight): sequential 1 MiB read
    and write MiB/s, 4 KiB random read latency (us) and IOPS = 1 / latency;
  * net (tests/guests/virtio_net_blast.S): guest->host frames/s and MB/s (1 MB = 1e6 B of Ethernet frame), with
    the transmit ring kept full; host->guest when --rx > 0 (bench/blaster.py, a C sendmmsg loop, blasts frames into the
    tap from the moment the guest opens its rx phase; it shares the 2 cores with the vCPU and the back-end);
  * CPU seconds per second of phase, split: DM vCPU thread, DM other threads (inline: the backend workers),
    back-end process tree (stub), from /proc/<pid>/task/*/stat utime+stime deltas.
Net is measured with each virtio-net per-frame loop (--net-engine): pv.netring's C loop (metrics unprefixed) and
the Python reference (``py_`` metrics), the same loop in both designs each time, so the ratio is the design's.
Prints ratios stub / inline. The claim to check (Xen 3.3 stub domains): net bandwidth stub >= 2 x inline.

Network traffic stays in a network namespace this process unshares first (root needed for net; without root the
net part is skipped). Taps: abl-in (inline), abl-st (stub).

    sudo .venv/bin/python -m bench.ablation [--mb 64] [--rand 4096] [--tx 50000] [--rx 20000] [--size 1514]
                                            [--repeat 3] [--no-jail] [--json] [--only blk|net]
                                            [--net-engine c|python|both]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from daemon.vmm import MachineConfig, Vmm
from guests.build import build_guest
from pv import tap as pv_tap
from pv.blk import Block
from pv.device import VIRTIO_ID_BLOCK, VIRTIO_ID_NET, VirtioDevice
from pv.net import Net
from pv.vhost_user.frontend import VhostUserDevice

ROOT = Path(__file__).resolve().parents[1]
BLK_GUEST = ROOT / "tests" / "guests" / "virtio_blk.S"
NET_GUEST = ROOT / "tests" / "guests" / "virtio_net_blast.S"
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLONE_NEWNET = 0x40000000
ETH_P_BLAST = 0x88B6
MAC = bytes.fromhex("525400ab1a10")
DESIGNS = ("inline", "stub")
ENGINE_PREFIX = {"c": "", "python": "py_"}  # metric names: C loop unprefixed, the Python reference "py_..."


def net_engines(choice: str) -> list[str]:
    return ["c", "python"] if choice == "both" else [choice]


# ------------------------------------------------------------------------------------------------ accounting
def _task_times(pid: int) -> dict[int, float]:
    """utime + stime (s) of every thread of ``pid`` (proc(5): fields 14 and 15 of /proc/PID/task/TID/stat)."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2 :].split()
        out[int(tid)] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _tree_cpu(pids: list[int]) -> float:
    return sum(sum(_task_times(p).values()) for p in pids)


@dataclass
class Mark:
    t: float
    exits: Counter[str]
    dm_tasks: dict[int, float]
    backend_cpu: float


class _MarkerSink:
    """Serial sink: at every '<' / '>' written by the guest, snapshot time, exit counts and CPU times."""

    synchronous = True  # each byte at the exit that wrote it, not batched by the UART's C half (devices/serial.py)

    def __init__(self, backend_pids: list[int], on_second_phase: Callable[[], None] | None = None) -> None:
        self.on_second_phase = on_second_phase
        self.opened = 0
        self.vmm: Vmm | None = None
        self.backend_pids = backend_pids
        self.marks: list[Mark] = []
        self.vcpu_tid = 0
        self.text = bytearray()

    def write(self, data: bytes) -> None:
        now = time.perf_counter()
        self.text += data
        if (b"<" in data or b">" in data) and self.vmm is not None:
            self.vcpu_tid = threading.get_native_id()  # the sink runs in the vCPU thread, at the exit
            self.marks.append(Mark(now, self.vmm.exit_counts(), _task_times(os.getpid()),
                                   _tree_cpu(self.backend_pids)))
            self.opened += data.count(b"<")
            if self.opened >= 2 and self.on_second_phase is not None:
                callback, self.on_second_phase = self.on_second_phase, None
                callback()

    def phases(self) -> list[tuple[Mark, Mark]]:
        m = self.marks
        return [(m[i], m[i + 1]) for i in range(0, len(m) - 1, 2)]


@dataclass
class Phase:
    secs: float
    exits: int
    mmio_exits: int
    cpu_vcpu: float
    cpu_dm_other: float
    cpu_backend: float


def _phase(a: Mark, b: Mark, vcpu_tid: int) -> Phase:
    d = b.exits - a.exits
    vcpu = b.dm_tasks.get(vcpu_tid, 0.0) - a.dm_tasks.get(vcpu_tid, 0.0)
    other = sum(v - a.dm_tasks.get(t, 0.0) for t, v in b.dm_tasks.items() if t != vcpu_tid)
    return Phase(b.t - a.t, sum(d.values()), d["MmioRead"] + d["MmioWrite"], vcpu, other,
                 b.backend_cpu - a.backend_cpu)


# ------------------------------------------------------------------------------------------------ back-ends
@dataclass
class Backend:
    proc: subprocess.Popen[bytes]
    sock_path: Path
    log: bytes = b""

    def pids(self) -> list[int]:
        return _descendants(self.proc.pid)

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(self.sock_path))
        return s

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def start_backend(kind: str, workdir: Path, args: list[str], *, jail: bool) -> Backend:
    sock = workdir / f"{kind}{time.monotonic_ns() % 10**6}.sock"
    argv = [sys.executable, "-m", "daemon.backend_main", kind, "--socket", str(sock), *args]
    if jail:
        root = Path(tempfile.mkdtemp(prefix="jail-", dir=workdir))  # empty, 0700, ours
        argv += ["--jail-root", str(root)]
    else:
        argv.append("--no-jail")
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    be = Backend(proc, sock)
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while b"READY" not in be.log:
        if time.monotonic() > deadline or proc.poll() is not None:
            be.stop()
            raise RuntimeError(f"kvmdm-backend {kind} did not become ready: {be.log[-600:]!r}")
        if select.select([proc.stderr], [], [], 0.1)[0]:
            be.log += os.read(proc.stderr.fileno(), 4096)
    return be


# ------------------------------------------------------------------------------------------------ one guest run
def run_guest(elf: Path, cmdline: str, dev: VirtioDevice, backend_pids: list[int], *,
              timeout: float = 600, on_rx_phase: Callable[[], None] | None = None) -> tuple[list[Phase], str]:
    """Run the guest to its exit. ``on_rx_phase`` is called when the guest opens its second phase (its second '<')."""
    sink = _MarkerSink(backend_pids, on_rx_phase)
    cfg = MachineConfig(mem_size=128 << 20, kernel=elf.read_bytes(), cmdline=cmdline)
    vmm = Vmm(cfg, serial_sink=sink).build()
    sink.vmm = vmm
    try:
        vmm.attach_virtio(dev)
        vmm.finish()
        vmm.start()
        reason = vmm.wait(timeout)
        if reason is None:
            raise RuntimeError(f"guest did not finish within {timeout} s: {bytes(sink.text)[-300:]!r}")
        vmm.stop(reason)
        text = bytes(sink.text).decode(errors="replace")
        if reason.guest_status != 1:
            raise RuntimeError(f"guest failed ({reason}): {text[-400:]!r}")
    finally:
        vmm.close()
    return [_phase(a, b, sink.vcpu_tid) for a, b in sink.phases()], text


# ------------------------------------------------------------------------------------------------ blk
@contextmanager
def blk_device(design: str, image: Path, workdir: Path, jail: bool) -> Iterator[tuple[VirtioDevice, list[int]]]:
    if design == "inline":
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            yield Block(fd, serial="bench"), []
        finally:
            os.close(fd)
        return
    be = start_backend("blk", workdir, ["--image", str(image), "--serial", "bench"], jail=jail)
    dev = VhostUserDevice(be.connect(), VIRTIO_ID_BLOCK, num_queues=1, config_size=60)
    try:
        yield dev, be.pids()
    finally:
        dev.close()
        be.stop()


def measure_blk(design: str, elf: Path, image: Path, workdir: Path, mb: int, rand: int,
                jail: bool) -> dict[str, float]:
    with blk_device(design, image, workdir, jail) as (dev, pids):
        phases, text = run_guest(elf, f"bench=1 mb={mb} rand={rand}", dev, pids)
    if "virtio_blk: 0 failed" not in text or len(phases) != 3:
        raise RuntimeError(f"blk bench ({design}) failed: {text[-300:]!r}")
    rd, wr, rnd = phases
    nreq = 2 * mb + rand
    return {
        "seq_read_MiBps": mb / rd.secs, "seq_write_MiBps": mb / wr.secs,
        "rand_lat_us": rnd.secs / rand * 1e6, "rand_iops": rand / rnd.secs,
        "exits_per_req": (rd.exits + wr.exits + rnd.exits) / nreq,
        "mmio_exits_per_req": (rd.mmio_exits + wr.mmio_exits + rnd.mmio_exits) / nreq,
        **_cpu(rnd, "rand_"),
    }


def _cpu(p: Phase, prefix: str) -> dict[str, float]:
    return {f"{prefix}cpu_vcpu": p.cpu_vcpu / p.secs, f"{prefix}cpu_dm_other": p.cpu_dm_other / p.secs,
            f"{prefix}cpu_backend": p.cpu_backend / p.secs}


# ------------------------------------------------------------------------------------------------ net
def unshare_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) (needs root)")
    Path("/proc/sys/net/ipv6/conf/default/disable_ipv6").write_text("1")  # keep the taps quiet
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _link_up(ifname: str) -> None:
    subprocess.run(["ip", "link", "set", ifname, "up"], check=True, capture_output=True)


@dataclass
class TapCounters:
    """A tap's counters from /proc/net/dev (the tap's "rx" is what the device wrote into it, i.e. guest->host;
    its "tx" is what the device read out of it, host->guest)."""

    rx_packets: int
    rx_errs: int
    tx_packets: int
    tx_drop: int

    def __sub__(self, o: TapCounters) -> TapCounters:
        return TapCounters(self.rx_packets - o.rx_packets, self.rx_errs - o.rx_errs,
                           self.tx_packets - o.tx_packets, self.tx_drop - o.tx_drop)


def tap_counters(ifname: str) -> TapCounters:
    # /proc/net/dev follows the reader's network namespace (this /sys still shows the namespace it was mounted in).
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            f = [int(x) for x in rest.split()]
            return TapCounters(rx_packets=f[1], rx_errs=f[2], tx_packets=f[9], tx_drop=f[11])
    raise RuntimeError(f"{ifname} is not in /proc/net/dev")


GUEST_QUEUE_SIZE = 64  # VQ_MAX_SIZE in guests/src/rt.inc: the blast guest's rx buffers outstanding at most


class CrossCheckFailed(RuntimeError):
    """What the guest says it sent/received disagrees with what the host saw on the tap: the numbers are void."""


def guest_counts(text: str) -> tuple[int, int]:
    """(sent, received) from the blast guest's "virtio_net_blast: sent N received M" line."""
    for line in text.splitlines():
        if line.startswith("virtio_net_blast: sent "):
            f = line.split()
            return int(f[2]), int(f[4])
    raise RuntimeError(f"no result line from the blast guest: {text[-300:]!r}")


def odd_reads(text: str) -> int:
    """Used-idx reads the blast guest found impossible (> Q ahead) and re-read (see virtio_net_blast.S)."""
    for line in text.splitlines():
        if line.startswith("virtio_net_blast: sent ") and "odd-used-idx-reads" in line:
            return int(line.split()[-1])
    return 0


def cross_check(label: str, sent: int, received: int, d: TapCounters, held: int = 1) -> None:
    """Fail loudly unless the host saw what the guest counted.

    guest->host: the tap's rx_packets counts every frame the device wrote into the tap (tun_get_user), before the
    stack drops them for their unknown ethertype (that drop is the "drop" column, so it is no capture loss); the
    only tolerated difference is the tap's own rx error count. host->guest: the device read tx_packets frames from
    the tap; the guest counted ``received`` of them and stopped, so up to its queue size (buffers still posted) plus
    ``held`` frames held by the device itself (pv.net: 1 in its bounce buffer; QEMU: 1 more in its net queue)
    may have been read but not counted, never fewer than counted.
    """
    if abs(d.rx_packets - sent) > d.rx_errs:
        raise CrossCheckFailed(f"{label}: guest says it sent {sent} frames, the tap received {d.rx_packets} "
                               f"(rx errors {d.rx_errs})")
    top = received + GUEST_QUEUE_SIZE + held
    if received and not received <= d.tx_packets <= top:
        raise CrossCheckFailed(f"{label}: guest says it received {received} frames, the device read "
                               f"{d.tx_packets} from the tap (allowed {received}..{top})")




@contextmanager
def net_device(design: str, workdir: Path, jail: bool,
               engine: str | None = None) -> Iterator[tuple[VirtioDevice, list[int], str]]:
    if design == "inline":
        ifname, fd = pv_tap.open_tap("abl-in")
        _link_up(ifname)
        try:
            yield Net(fd, MAC, engine=engine), [], ifname
        finally:
            os.close(fd)
        return
    be = start_backend("net", workdir, ["--tap", "abl-st", "--mac", MAC.hex(":")]
                       + (["--engine", engine] if engine else []), jail=jail)
    _link_up("abl-st")
    dev = VhostUserDevice(be.connect(), VIRTIO_ID_NET, num_queues=2,
                          config=MAC + (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + bytes(2))
    try:
        yield dev, be.pids(), "abl-st"
    finally:
        dev.close()
        be.stop()


def measure_net(design: str, elf: Path, workdir: Path, tx: int, rx: int, size: int,
                jail: bool, engine: str) -> dict[str, float]:
    with net_device(design, workdir, jail, engine) as (dev, pids, ifname):
        blaster = start_blaster(ifname, size) if rx else None
        before = tap_counters(ifname)
        try:
            phases, text = run_guest(elf, f"tx={tx} rx={rx} size={size}", dev, pids,
                                     on_rx_phase=lambda: release_blaster(blaster))
        finally:
            stop_blaster(blaster)
        seen = tap_counters(ifname) - before
    res = net_result(f"net bench ({design}, {engine} engine)", text, phases, seen, tx, rx, size)
    return {ENGINE_PREFIX[engine] + k: v for k, v in res.items()}


def start_blaster(ifname: str, size: int) -> subprocess.Popen[bytes]:
    """A host process that, once released (:func:`release_blaster`), writes ethertype-0x88b6 frames of ``size``
    bytes into ``ifname`` as fast as it can. It burns a core: released only when the guest's rx phase begins, so the
    tx phase does not share the 2 cores with it."""
    return subprocess.Popen([sys.executable, "-m", "bench.blaster", ifname, str(size)], stdin=subprocess.PIPE,
                            cwd=ROOT)


def release_blaster(blaster: subprocess.Popen[bytes] | None) -> None:
    if blaster is not None and blaster.stdin is not None and not blaster.stdin.closed:
        os.write(blaster.stdin.fileno(), b"g")


def stop_blaster(blaster: subprocess.Popen[bytes] | None) -> None:
    if blaster is not None:
        blaster.kill()
        blaster.wait()
        if blaster.stdin is not None:
            blaster.stdin.close()


def net_result(label: str, text: str, phases: list[Phase], seen: TapCounters, tx: int, rx: int,
               size: int, held: int = 1) -> dict[str, float]:
    """Throughput per phase, after checking the guest's counts against the tap (CrossCheckFailed otherwise)."""
    sent, received = guest_counts(text)
    if (sent, received) != (tx, rx) or len(phases) != (2 if rx else 1):
        raise RuntimeError(f"{label} failed: {text[-300:]!r}")
    cross_check(label, sent, received, seen, held)
    t = phases[0]
    out = {"tx_fps": tx / t.secs, "tx_MBps": tx * size / t.secs / 1e6, "tx_exits_per_frame": t.exits / tx,
           "tx_mmio_exits_per_frame": t.mmio_exits / tx, **_cpu(t, "tx_"),
           "tx_host_seen": seen.rx_packets, "guest_odd_used_idx_reads": odd_reads(text)}
    if rx:
        r = phases[1]
        out |= {"rx_fps": rx / r.secs, "rx_MBps": rx * size / r.secs / 1e6, "rx_exits_per_frame": r.exits / rx,
                **_cpu(r, "rx_"), "rx_host_read": seen.tx_packets}
    return out


# ------------------------------------------------------------------------------------------------ driver
@dataclass
class Table:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, design: str, values: dict[str, float]) -> None:
        d = self.samples.setdefault(design, {})
        for k, v in values.items():
            d.setdefault(k, []).append(v)

    def median(self) -> dict[str, dict[str, float]]:
        return {des: {k: statistics.median(v) for k, v in m.items()} for des, m in self.samples.items()}


def run(args: argparse.Namespace) -> dict[str, object]:
    jail = not args.no_jail and os.geteuid() == 0
    table = Table()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kvmdm-ablation-") as d:
        workdir = Path(d)
        os.chmod(workdir, 0o755)
        steps: list[Callable[[str], dict[str, float]]] = []
        if args.only in (None, "blk"):
            image = workdir / "disk.raw"
            with open(image, "wb") as f:
                chunk = os.urandom(MIB)
                for _ in range(max(args.image_mb, args.mb)):
                    f.write(chunk)
            blk_elf = build_guest(BLK_GUEST)
            steps.append(lambda des: measure_blk(des, blk_elf, image, workdir, args.mb, args.rand, jail))
        if args.only in (None, "net"):
            if os.geteuid() != 0:
                notes.append("net skipped: needs root (network namespace, taps)")
            else:
                unshare_netns()
                net_elf = build_guest(NET_GUEST)
                for eng in net_engines(args.net_engine):
                    steps.append(lambda des, e=eng: measure_net(des, net_elf, workdir, args.tx, args.rx, args.size,  # type: ignore[misc]
                                                                jail, e))
        for _ in range(args.repeat):  # interleaved: machine-load drift hits both designs alike
            for des in DESIGNS:
                vals: dict[str, float] = {}
                for step in steps:
                    vals |= step(des)
                table.add(des, vals)
    med = table.median()
    ratios = {}
    if len(med) == 2:
        for k, v in med["inline"].items():
            s = med["stub"].get(k)
            if s is not None and v:
                ratios[k] = s / v
    return {"params": {k: v for k, v in vars(args).items() if k != "dir"} | {"jail": jail}, "median": med,
            "ratio_stub_over_inline": ratios, "samples": table.samples, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64, help="MiB per sequential blk phase")
    p.add_argument("--rand", type=int, default=4096, help="random 4 KiB reads")
    p.add_argument("--image-mb", type=int, default=64)
    p.add_argument("--tx", type=int, default=50_000, help="frames the guest sends")
    p.add_argument("--rx", type=int, default=20_000, help="frames the guest receives (0: skip)")
    p.add_argument("--size", type=int, default=1514, help="Ethernet frame bytes (60..1514)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", choices=("blk", "net"))
    p.add_argument("--net-engine", choices=("c", "python", "both"), default="both",
                   help="virtio-net per-frame loop used by BOTH designs (pv.netring C loop, the Python reference)")
    p.add_argument("--no-jail", action="store_true", help="run the back-ends unjailed")
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res))
        return 0
    med: dict[str, dict[str, float]] = res["median"]  # type: ignore[assignment]
    ratios: dict[str, float] = res["ratio_stub_over_inline"]  # type: ignore[assignment]
    print(f"ablation inline (backend in the DM) vs stub (vhost-user back-end process), median of {args.repeat}; "
          f"blk mb={args.mb} rand={args.rand}; net tx={args.tx} rx={args.rx} size={args.size}; "
          f"jail={res['params']['jail']}")  # type: ignore[index]
    keys = list(next(iter(med.values())).keys()) if med else []
    print(f"  {'metric':28s} {'inline':>12s} {'stub':>12s} {'stub/inline':>12s}")
    for k in keys:
        vals = [med.get(d, {}).get(k) for d in DESIGNS]
        cells = [f"{v:12.3f}" if v is not None else f"{'-':>12s}" for v in vals]
        r = ratios.get(k)
        print(f"  {k:28s} {cells[0]} {cells[1]} {(f'{r:12.3f}' if r is not None else '-'):>12s}")
    for eng, prefix in ENGINE_PREFIX.items():
        for k, what in ((prefix + "tx_MBps", "guest->host"), (prefix + "rx_MBps", "host->guest")):
            if k in ratios:
                verdict = "meets" if ratios[k] >= 2 else "misses"
                print(f"  claim: net bandwidth ({what}, {eng} engine in both designs) stub >= 2 x inline: "
                      f"{ratios[k]:.2f} x ({verdict})")
    if any(k.endswith("tx_MBps") for k in ratios):
        print("  host cross-check: every run's guest counts matched the tap's counters (else it would have failed)")
    for n in res["notes"]:  # type: ignore[attr-defined]
        print(f"  note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
