"""Process-model benchmarks with the real, jailed device model (issue #3 "Performance").

1. **startup**: create -> first serial byte of the demo guest, through REST (POST /v1/guests, POST .../start), over
   --runs runs: median and p90. The DM logs a wall-clock timeline (imports done, jail entered, VM built, vCPUs
   running); the first serial byte is seen by polling the console log file every 0.5 ms. "create->KVM_RUN" is the
   figure the target applies to (it excludes the guest's own emulated boot, KVM_RUN -> first byte).
2. **memory**: USS of a jailed DM running a long guest = sum of Private_* in /proc/<dm>/smaps_rollup, split by
   mapping from /proc/<dm>/smaps. Guest RAM is a MAP_SHARED memfd, but smaps counts a page as "Private" when only
   one process maps it, so the guest pages the guest touched show up in Private_*: they are reported separately
   and subtracted ("USS w/o guest RAM"), and the test runs with two RAM sizes to show the DM's own part does not
   grow with it. Also: how many modules the DM imported (it logs len(sys.modules)), and that no web framework is
   mapped into it.
3. **churn**: --churn guests created, started (the demo guest, every other one with a tap nic), run to power-off
   and destroyed, one after the other; then the daemon's fds, the DM processes, the host's mounts and network
   links must be what they were before (printed as "leaked: none" or what leaked).
4. **REST latency**: p50/p99 of GET /health and GET /v1/guests/{name} with --guests real guests running (the
   uart_irq guest waiting for console input: it sleeps in HLT and costs no CPU).

Every part runs once per DM spawn mode (``kvmdmd --dm-spawn exec|zygote``, issue 11: "start in milliseconds"),
each on a fresh daemon, and the report puts them side by side. The DM's CPU time ("DM CPU to KVM_RUN") is what
the DM logs in its timeline: its process CPU time (all threads) plus, through an at-fork hook, what it spent
before the jail's fork; the keeper's own work after that fork (closing fds, loading its filter) is not in it.
"Memory per extra guest" is what one more running guest costs the host: the pages its keeper (an exec'd DM's;
a zygote-forked DM has none) and DM map and no other process does, guest RAM excluded (with the zygote, pages still shared with the zygote cost nothing
more; the zygote itself is a one-off cost, reported on its own).

    python -m bench.daemon [--runs 20] [--guests 100] [--churn 100] [--requests 1000] [--modes exec,zygote] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit" / "daemon"))

from kvmdmd_harness import Daemon, wait_until  # noqa: E402

from bench.stats import median_p90, pct  # noqa: E402
from guests.build import build_guest  # noqa: E402

TIMELINE = re.compile(r"startup timeline \(wall clock s\): imported=([\d.]+) jailed=([\d.]+) built=([\d.]+) "
                      r"running=([\d.]+) modules=(\d+)(?: cpu_ms=([\d.]+))?(?: \(jailed ([\d.]+), built ([\d.]+)\))?")
WEB_MODULES = ("aiohttp", "multidict", "yarl", "frozenlist", "fastapi", "starlette", "uvicorn")
TARGET_STARTUP_MS = 20.0  # issue 11 (was 150 with exec'd DMs, issue 3)
TARGET_DM_CPU_MS = 8.0
TARGET_USS_MIB = 20.0
TARGET_EXTRA_GUEST_MIB = 5.0
TARGET_REST_P99_MS = 50.0
MODES = ("exec", "zygote")


class BenchDaemon(Daemon):
    """kvmdmd with its default dm_command: the real DM, jailed, spawned the ``mode`` way."""

    mode = "zygote"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "daemon.server", "--state-dir", str(self.state_dir), "--runtime-dir",
                str(self.runtime_dir), "--log-level", "WARNING", "--dm-spawn", self.mode]

    def zygote_pid(self) -> int | None:
        assert self.proc is not None
        for pid in _children(self.proc.pid):
            if b"daemon.zygote" in _cmdline(pid):
                return pid
        return None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
    except OSError:
        pass
    return kids


def _nspid(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    return []


def jailed_child(spawned: int) -> int:
    """The DM of a guest's dm_pid: that pid itself when it is pid 1 of its own pid namespace already (forked so by
    the zygote: no keeper, daemon/jail.py step 10), else the keeper's only child."""
    if _nspid(spawned)[1:] == ["1"]:
        return spawned
    kids = wait_until(lambda: Path(f"/proc/{spawned}/task/{spawned}/children").read_text().split(), 5.0)
    return int(kids[0])


def minor_faults(pid: int) -> int:
    """minflt of a process (proc(5) /proc/PID/stat field 10): its own, not its children's."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


# ------------------------------------------------------------------------------------------------ startup


def _watch_first_byte(path: Path, first: list[float], done: threading.Event) -> None:
    """Timestamp the moment the console log gets its first byte (the DM writes it from its vCPU thread)."""
    while not done.is_set():
        try:
            if path.stat().st_size > 0:
                first.append(time.time())
                return
        except FileNotFoundError:
            pass
        time.sleep(0.0005)


def bench_startup(d: BenchDaemon, runs: int, demo: str) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    modules = 0
    for i in range(runs):
        name = f"s{i}"
        console = d.state_dir / "guests" / name / "console.log"
        first: list[float] = []
        done = threading.Event()
        th = threading.Thread(target=_watch_first_byte, args=(console, first, done))
        th.start()
        t0 = time.time()
        d.json("POST", "/v1/guests", {"name": name, "kernel": demo}, expect=201)
        t_created = time.time()
        d.json("POST", f"/v1/guests/{name}/start")
        t_started = time.time()
        try:
            wait_until(lambda f=first: f, 10.0, 0.001)  # type: ignore[misc]
        finally:
            done.set()
            th.join()
        wait_until(lambda n=name: d.guest(n)["state"] == "stopped", 10.0)  # type: ignore[misc]
        m = TIMELINE.search((d.state_dir / "guests" / name / "dm.log").read_text())
        if m is None:
            raise RuntimeError(f"no startup timeline in the DM log of {name}")
        imported, jailed, built, running = (float(m.group(k)) for k in range(1, 5))
        modules = int(m.group(5))
        rows.append({
            "dm_cpu_ms": float(m.group(6) or "nan"),
            "dm_cpu_to_jailed_ms": float(m.group(7) or "nan"),
            "dm_cpu_jailed_to_built_ms": float(m.group(8) or "nan") - float(m.group(7) or "nan"),
            "create_ms": (t_created - t0) * 1e3,
            "create_to_first_byte_ms": (first[0] - t0) * 1e3,
            "create_to_kvm_run_ms": (running - t0) * 1e3,
            "spawn_to_imported_ms": (imported - t_created) * 1e3,  # includes the daemon's spawn work + exec
            "imported_to_jailed_ms": (jailed - imported) * 1e3,
            "jailed_to_built_ms": (built - jailed) * 1e3,
            "built_to_running_ms": (running - built) * 1e3,
            "guest_boot_ms": (first[0] - running) * 1e3,
            "start_request_ms": (t_started - t_created) * 1e3,
        })
        d.json("DELETE", f"/v1/guests/{name}")
    keys = rows[0].keys()
    return {"runs": runs, "dm_modules": modules, "loadavg": os.getloadavg()[0],
            **{k: median_p90(r[k] for r in rows)
               for k in keys}}


# ------------------------------------------------------------------------------------------------- memory


def smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        k, _, v = line.partition(":")
        out[k] = int(v.split()[0]) * 1024
    return out


GUEST_RAM = "guest RAM"


def guest_ram_ranges(pid: int, mem_mib: int) -> set[str]:
    """The address ranges (as /proc/PID/maps spells them) of guest RAM: the sealed memfd ``kvmdm-guest-ram``, or
    anonymous memory advised MADV_HUGEPAGE of the guest's size (kvmcore.memory pads it by 2 MiB to align it)."""
    out: set[str] = set()
    rng, name, size = "", "", 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            rng, name = parts[0], " ".join(parts[5:])
            lo, hi = (int(x, 16) for x in rng.split("-"))
            size = hi - lo
            if "kvmdm-guest-ram" in name:
                out.add(rng)
        elif parts[0] == "VmFlags:" and not name and "hg" in parts[1:] and \
                size in (mem_mib << 20, (mem_mib << 20) + (2 << 20)):
            out.add(rng)
    return out


def private_by_mapping(pid: int, guest_ram: set[str] | frozenset[str] = frozenset()) -> Counter[str]:
    """Private_Clean + Private_Dirty per mapping name (anonymous mappings grouped as [anon], guest RAM apart)."""
    by: Counter[str] = Counter()
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = parts[5] if len(parts) > 5 else "[anon]"
            if parts[0] in guest_ram:
                name = GUEST_RAM
            elif name.startswith("/memfd:"):
                name = " ".join(parts[5:])
            elif "/site-packages/" in name or "/lib/python3" in name:
                name = "python extension modules (.so)"
            elif name.startswith("/usr/lib") or name.startswith("/lib"):
                name = "shared libraries (.so)"
        elif parts[0] in ("Private_Clean:", "Private_Dirty:"):
            by[name] += int(parts[1]) * 1024
    return by


def _present_pfns(pid: int, skip: set[str] | frozenset[str]) -> list[int]:
    """Physical frames of every present page of ``pid`` (pagemap(5): bit 63 present, bits 0-54 PFN; needs
    root), skipping the address ranges in ``skip``."""
    pfns = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pm:
        for line in maps:
            parts = line.split()
            if parts[0] in skip:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo >= 1 << 47:  # [vsyscall]
                continue
            pm.seek(lo // 4096 * 8)
            data = pm.read((hi - lo) // 4096 * 8)
            for (e,) in struct.iter_unpack("<Q", data):
                if e >> 63 and e & ((1 << 55) - 1):
                    pfns.append(e & ((1 << 55) - 1))
    return pfns


def jail_unique_bytes(pids: list[int], skip: set[str]) -> int:
    """Memory mapped by these processes and nobody else: a frame counts when its /proc/kpagecount (number of
    mappings) equals how often these processes map it. Per-process USS misses the pages that the keeper and
    the DM still share copy-on-write since the jail's fork, so this is the jail's real private footprint."""
    seen: Counter[int] = Counter()
    for pid in pids:
        seen.update(_present_pfns(pid, skip))
    unique = 0
    with open("/proc/kpagecount", "rb") as kc:
        for pfn, n in seen.items():
            kc.seek(pfn * 8)
            (count,) = struct.unpack("<Q", kc.read(8))
            if count == n:
                unique += 4096
    return unique


def bench_memory(d: BenchDaemon, elf: str, mem_mib: int) -> dict[str, Any]:
    name = f"mem{mem_mib}"
    d.json("POST", "/v1/guests", {"name": name, "kernel": elf, "cmdline": "loops=2000000000",
                                  "memory_mib": mem_mib}, expect=201)
    spawned = d.json("POST", f"/v1/guests/{name}/start")["dm_pid"]
    dm = jailed_child(spawned)
    keeper = spawned if spawned != dm else None  # a zygote-forked DM has none
    time.sleep(1.0)  # let the DM settle (threads started, first stats served)
    d.json("GET", f"/v1/guests/{name}/stats")
    roll = smaps_rollup(dm)
    ram = guest_ram_ranges(dm, mem_mib)  # the same addresses in the keeper (mapped before the jail's fork)
    by = private_by_mapping(dm, ram)
    guest_ram = by.pop(GUEST_RAM, 0)
    uss = roll["Private_Clean"] + roll["Private_Dirty"] + roll.get("Private_Hugetlb", 0)
    keeper_uss = 0
    if keeper is not None:
        keeper_uss = sum(v for k, v in smaps_rollup(keeper).items() if k.startswith("Private_"))
        keeper_uss -= private_by_mapping(keeper, ram).get(GUEST_RAM, 0)
    jail = [dm] if keeper is None else [keeper, dm]
    jail_unique = jail_unique_bytes(jail, ram)
    minflt = sum(minor_faults(p) for p in jail)
    maps = Path(f"/proc/{dm}/maps").read_text()
    web = sorted({m for m in WEB_MODULES if f"/{m}/" in maps})
    zpid = d.zygote_pid()
    zygote = None
    if zpid is not None:
        zroll = smaps_rollup(zpid)
        zygote = {"uss": zroll["Private_Clean"] + zroll["Private_Dirty"], "rss": zroll["Rss"]}
    d.json("POST", f"/v1/guests/{name}/stop")
    d.json("DELETE", f"/v1/guests/{name}")
    return {"memory_mib": mem_mib, "zygote": zygote, "uss": uss, "uss_without_guest_ram": uss - guest_ram,
            "guest_ram_private": guest_ram, "guest_ram_found": bool(ram),
            "rss": roll["Rss"], "pss": roll["Pss"], "keeper_uss": keeper_uss, "keeper": keeper is not None,
            "minor_faults": minflt,
            "jail_unique_without_guest_ram": jail_unique,
            "top": by.most_common(6), "web_framework_mapped": web}


# ------------------------------------------------------------------------------------------------- churn


def _fds(pid: int) -> dict[str, str]:
    out = {}
    for f in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[f] = os.readlink(f"/proc/{pid}/fd/{f}")
        except OSError:
            pass
    return out


def _settled_fds(pid: int) -> dict[str, str]:
    """The daemon's fds once the last HTTP connection's close (asynchronous) is done."""
    prev: dict[str, str] = {}
    for _ in range(50):
        time.sleep(0.1)
        cur = _fds(pid)
        if cur == prev:
            return cur
        prev = cur
    return prev


def _mounts() -> list[str]:
    return sorted(line.split(" ", 4)[4] for line in Path("/proc/self/mountinfo").read_text().splitlines())


def _dm_processes(d: BenchDaemon) -> list[int]:
    marker = str(d.runtime_dir).encode()
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and b"daemon.dm" in (c := _cmdline(int(p))) and b"--control-fd" in c and marker in c]


def bench_churn(d: BenchDaemon, n: int, demo: str) -> dict[str, Any]:
    """n guests one after the other: create, start, run to power-off, destroy; then look for leftovers."""
    assert d.proc is not None
    dpid = d.proc.pid
    fds0, mounts0, links0 = _settled_fds(dpid), _mounts(), set(os.listdir("/sys/class/net"))
    kids0 = set(_children(dpid))
    zpid = d.zygote_pid()
    zfds0 = _fds(zpid) if zpid else {}
    t0 = time.monotonic()
    bad = []
    for i in range(n):
        name = f"c{i}"
        d.json("POST", "/v1/guests", {"name": name, "kernel": demo, "nics": [{}] if i % 2 else []}, expect=201)
        d.json("POST", f"/v1/guests/{name}/start")
        g = wait_until(lambda nm=name: (x := d.guest(nm))["state"] in ("stopped", "crashed", "failed") and x,
                       10.0, 0.005)
        if g["last_exit_code"] != 0:
            bad.append((name, g["last_exit_reason"]))
        d.json("DELETE", f"/v1/guests/{name}")
    elapsed = time.monotonic() - t0
    leaked: dict[str, Any] = {}
    fds1 = _settled_fds(dpid)
    if fds1 != fds0:
        leaked["daemon fds"] = sorted(set(fds1.items()) ^ set(fds0.items()))
    if zpid and d.zygote_pid() == zpid and _fds(zpid) != zfds0:
        leaked["zygote fds"] = sorted(set(_fds(zpid).items()) ^ set(zfds0.items()))
    if zpid and _children(zpid):
        leaked["zygote children"] = _children(zpid)
    if set(_children(dpid)) != kids0:
        leaked["daemon children"] = sorted(set(_children(dpid)) ^ kids0)
    if _dm_processes(d):
        leaked["DM processes"] = _dm_processes(d)
    if _mounts() != mounts0:
        leaked["mounts"] = sorted(set(_mounts()) ^ set(mounts0))
    links1 = set(os.listdir("/sys/class/net"))
    if links1 != links0:
        leaked["network links"] = sorted(links1 ^ links0)
    if list((d.runtime_dir / "guests").iterdir()):
        leaked["runtime dirs"] = [p.name for p in (d.runtime_dir / "guests").iterdir()]
    return {"guests": n, "elapsed_s": elapsed, "per_guest_ms": elapsed / max(1, n) * 1e3, "failed": bad,
            "leaked": leaked}


# ---------------------------------------------------------------------------------------------- REST p99


def bench_rest(d: BenchDaemon, elf: str, n_guests: int, n_requests: int) -> dict[str, Any]:
    t0 = time.monotonic()
    for i in range(n_guests):
        name = f"r{i}"
        d.json("POST", "/v1/guests", {"name": name, "kernel": elf, "cmdline": "timeout=3600000",
                                      "memory_mib": 16}, expect=201)
        d.json("POST", f"/v1/guests/{name}/start")
    start_all = time.monotonic() - t0
    h = d.json("GET", "/health")
    running = sum(g["state"] == "running" for g in h["guests"])
    out: dict[str, Any] = {"guests": n_guests, "running": running, "start_all_s": start_all}
    for label, path in (("GET /health", "/health"), ("GET /v1/guests/{name}", None)):
        lat = []
        for j in range(n_requests):
            p = path or f"/v1/guests/r{j % n_guests}"
            t = time.perf_counter()
            st, _, _ = d.request("GET", p)
            lat.append((time.perf_counter() - t) * 1e3)
            assert st == 200
        out[label] = {"p50_ms": statistics.median(lat), "p99_ms": pct(lat, 99), "max_ms": max(lat)}
    t = time.perf_counter()
    st, _, body = d.request("GET", "/metrics")
    out["GET /metrics (once)"] = {"ms": (time.perf_counter() - t) * 1e3, "bytes": len(body)}
    for i in range(n_guests):
        d.request("DELETE", f"/v1/guests/r{i}")
    return out


# ---------------------------------------------------------------------------------------------------- main


def run_mode(mode: str, a: argparse.Namespace, tmp: Path, env: dict[str, str], demo: str, loop_elf: str,
             uart_elf: str) -> dict[str, Any]:
    BenchDaemon.mode = mode
    (tmp / mode).mkdir()
    d = BenchDaemon(tmp / mode).start(env=env)
    try:
        d.json("POST", "/v1/guests", {"name": "warm", "kernel": demo}, expect=201)  # builds the demo once
        d.json("POST", "/v1/guests/warm/start")
        wait_until(lambda: d.guest("warm")["state"] == "stopped", 10)
        d.json("DELETE", "/v1/guests/warm")
        return {"startup": bench_startup(d, a.runs, demo),
                "memory": [bench_memory(d, loop_elf, m) for m in (16, 256)],
                "churn": bench_churn(d, a.churn, demo),
                "rest": bench_rest(d, uart_elf, a.guests, a.requests)}
    finally:
        d.cleanup()


STARTUP_ROWS = (("create_to_kvm_run_ms", "create -> KVM_RUN (DM startup)"),
                ("dm_cpu_ms", "DM CPU to KVM_RUN (its own, ms)"),
                ("dm_cpu_to_jailed_ms", "  CPU: start, fds, RAM, jail"),
                ("dm_cpu_jailed_to_built_ms", "  CPU: build VM"),
                ("create_to_first_byte_ms", "create -> first serial byte"),
                ("create_ms", "  POST /v1/guests"),
                ("spawn_to_imported_ms", "  spawn (+ exec + imports | fork)"),
                ("imported_to_jailed_ms", "  read fds, guest RAM, enter jail"),
                ("jailed_to_built_ms", "  build VM (KVM, devices, load kernel)"),
                ("built_to_running_ms", "  start vCPU thread"),
                ("guest_boot_ms", "  guest's own boot (emulated CPL0)"),
                ("start_request_ms", "POST .../start (returns after ping)"))


def report(res: dict[str, Any], a: argparse.Namespace) -> None:
    modes = list(res)
    mib = 1 << 20
    first = res[modes[0]]["startup"]
    cache = "no bytecode cache (--cold)" if a.cold else "bytecode cached"
    print(f"== startup: demo guest via REST, {first['runs']} runs per mode, {cache}; median (p90), ms ==")
    print(f"{'phase':40}" + "".join(f"{m:>20}" for m in modes) + "  target")
    for k, label in STARTUP_ROWS:
        cells = "".join(f"{res[m]['startup'][k]['median']:10.1f} ({res[m]['startup'][k]['p90']:6.1f})"
                        for m in modes)
        tgt = {"create_to_kvm_run_ms": f"<= {TARGET_STARTUP_MS:.0f}", "dm_cpu_ms": f"<= {TARGET_DM_CPU_MS:.0f}"}
        print(f"{label:40}{cells}  {tgt.get(k, '')}")
    for m in modes:
        s = res[m]["startup"]
        print(f"{m}: DM modules (len(sys.modules)) {s['dm_modules']}; load average {s['loadavg']:.2f} on "
              f"{os.cpu_count()} CPUs (the startup figures are sensitive to it)")
    print("\n== memory (jailed DM running the loop guest) ==")
    for m in modes:
        for r in res[m]["memory"]:
            print(f"{m:6} guest RAM {r['memory_mib']:4d} MiB: per extra guest (keeper + DM, mapped by no other "
                  f"process, guest RAM excluded) {r['jail_unique_without_guest_ram'] / mib:5.1f} MiB "
                  f"(target <= {TARGET_EXTRA_GUEST_MIB:.0f}); DM USS w/o guest RAM "
                  f"{r['uss_without_guest_ram'] / mib:5.1f} MiB, "
                  f"{'keeper USS ' + format(r['keeper_uss'] / mib, '4.1f') if r.get('keeper', True) else 'no keeper'}, "
                  f"minor faults (keeper + DM, 1 s in) {r.get('minor_faults', 0)}, "
                  f"DM RSS {r['rss'] / mib:5.1f}, PSS {r['pss'] / mib:5.1f}, guest pages "
                  f"{r['guest_ram_private'] / mib:.1f}{'' if r['guest_ram_found'] else ' (guest RAM NOT FOUND)'}; "
                  "web framework mapped: "
                  f"{r['web_framework_mapped'] or 'none'}")
            print("           DM private by mapping: " + ", ".join(f"{k} {v / mib:.1f}" for k, v in r["top"]))
        z = res[m]["memory"][0]["zygote"]
        if z is not None:
            print(f"{m:6} the zygote itself (once per host): USS {z['uss'] / mib:.1f} MiB, RSS {z['rss'] / mib:.1f} MiB")
    print("\n== churn: create, start, run to power-off, destroy, one guest after the other ==")
    for m in modes:
        c = res[m]["churn"]
        print(f"{m:6} {c['guests']} guests in {c['elapsed_s']:.1f} s ({c['per_guest_ms']:.0f} ms each), "
              f"{len(c['failed'])} failed{' ' + str(c['failed'][:3]) if c['failed'] else ''}; leaked: "
              f"{c['leaked'] or 'none (daemon fds, zygote fds and children, DM processes, mounts, links)'}")
    print("\n== REST latency with guests running, sequential requests ==")
    for m in modes:
        r = res[m]["rest"]
        print(f"{m:6} {r['running']}/{r['guests']} real guests running (started in {r['start_all_s']:.1f} s), "
              f"{a.requests} requests each:")
        for k in ("GET /health", "GET /v1/guests/{name}"):
            print(f"         {k:24} p50 {r[k]['p50_ms']:6.2f} ms  p99 {r[k]['p99_ms']:6.2f} ms "
                  f"(target < {TARGET_REST_P99_MS:.0f})  max {r[k]['max_ms']:6.2f} ms")
        print(f"         GET /metrics (stats from every DM) once: {r['GET /metrics (once)']['ms']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.daemon", description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--guests", type=int, default=100)
    ap.add_argument("--churn", type=int, default=100)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--modes", default=",".join(MODES), help="DM spawn modes to compare (kvmdmd --dm-spawn)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cold", action="store_true",
                    help="no bytecode cache: every DM compiles its modules from source (what happens when the "
                         "environment sets PYTHONDONTWRITEBYTECODE and nothing was precompiled)")
    ap.add_argument("--kernel-dir", type=Path,
                    help="use prebuilt loop.elf, uart_irq.elf and hello.elf (the demo) from here instead of building")
    a = ap.parse_args(argv)
    modes = [m for m in a.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}")
    if os.geteuid() != 0:
        print("bench.daemon needs root (jailed DMs)", file=sys.stderr)
        return 2
    if a.kernel_dir is not None:
        loop_elf, uart_elf = str(a.kernel_dir / "loop.elf"), str(a.kernel_dir / "uart_irq.elf")
        demo = str(a.kernel_dir / "hello.elf")
    else:
        loop_elf, uart_elf, demo = str(build_guest("loop")), str(build_guest("uart_irq")), "demo"
    with tempfile.TemporaryDirectory(prefix="kvmdm-bench-") as tmp:
        # An installed kvmdm ships bytecode; this checkout may not (PYTHONDONTWRITEBYTECODE in CI shells), so give
        # the daemon and its DMs a private, writable cache that the warm-up run fills.
        env = {} if a.cold else {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pyc")}
        res = {m: run_mode(m, a, Path(tmp), env, demo, loop_elf, uart_elf) for m in modes}
    floor = c_floor(demo, a.runs)
    if a.json:
        print(json.dumps({"modes": res, "c_floor": floor}, indent=2))
        return 0
    report(res, a)
    report_floor(res, floor)
    return 0


def c_floor(demo: str, runs: int) -> dict[str, Any]:
    """The same KVM set-up done by a C program (bench.vmm_floor), in this run: the part of the DM's CPU that no
    language makes go away on this host."""
    from bench import vmm_floor

    try:
        kernel = vmm_floor.demo_kernel() if demo == "demo" else Path(demo)
        return vmm_floor.run(kernel, runs)
    except (vmm_floor.FloorUnavailable, OSError) as e:
        return {"unavailable": str(e)}


def report_floor(res: dict[str, Any], floor: dict[str, Any]) -> None:
    print("\n== the C floor: the DM's KVM set-up for the demo guest in C, no Python (bench/vmm_floor.c) ==")
    if "unavailable" in floor:
        print(f"not measured: {floor['unavailable']}")
        return
    f = floor["cpu_ms"]["median"]
    print(f"C floor CPU to KVM_RUN {f:.2f} ms median (p90 {floor['cpu_ms']['p90']:.2f}), {floor['minor_faults']} "
          f"minor faults, {floor['runs']} runs")
    for m, r in res.items():
        dm = r["startup"]["dm_cpu_ms"]["median"]
        print(f"{m:6} DM CPU to KVM_RUN {dm:.1f} ms = {dm / f:.1f}x the C floor ({dm - f:.1f} ms above it)")


if __name__ == "__main__":
    sys.exit(main())
