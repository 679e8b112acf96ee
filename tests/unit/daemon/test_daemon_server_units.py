"""kvmdmd's pure helpers: loopback-only TCP, token file checks, sd_notify datagrams, watchdog interval,
Prometheus label escaping, and the systemd units (systemd-analyze verify + security score)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon.api import _esc, _Exposition  # noqa: E402
from daemon.server import parse_tcp, read_token, sd_notify, watchdog_interval  # noqa: E402

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("spec", ["127.0.0.1:8080", "[::1]:9000", "127.1.2.3:0"])
def test_loopback_tcp_is_accepted(spec: str) -> None:
    assert parse_tcp(spec)[1] in (8080, 9000, 0)


@pytest.mark.parametrize("spec, match", [("0.0.0.0:80", "non-loopback"), ("192.168.1.1:80", "non-loopback"),
                                         ("localhost:80", "literal"), ("8080", "HOST:PORT"),
                                         ("127.0.0.1:70000", "out of range")])
def test_non_loopback_or_malformed_tcp_is_refused(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_tcp(spec)


def test_token_file_must_be_private_and_long(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("x" * 32)
    f.chmod(0o644)
    with pytest.raises(ValueError, match="must not be readable"):
        read_token(str(f))
    f.chmod(0o600)
    assert read_token(str(f)) == "x" * 32
    f.write_text("short")
    with pytest.raises(ValueError, match="at least 16"):
        read_token(str(f))


def test_sd_notify_sends_datagram_to_notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "n.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    assert sd_notify("READY=1")
    assert s.recv(100) == b"READY=1"
    s.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_watchdog_interval_is_half_and_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "junk")
    assert watchdog_interval() is None


def test_prometheus_label_values_are_escaped_and_families_grouped() -> None:
    assert _esc('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    e = _Exposition()
    e.add("m_total", "counter", "h", 1, guest="x")
    e.add("g", "gauge", "h", 2)
    e.add("m_total", "counter", "h", 3, guest="y")
    lines = e.render().splitlines()
    assert lines == ["# HELP m_total h", "# TYPE m_total counter", 'm_total{guest="x"} 1', 'm_total{guest="y"} 3',
                     "# HELP g h", "# TYPE g gauge", "g 2"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_units_verify_and_report_security_score(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "kvmdmd.service").read_text()
    # verify checks that ExecStart exists: point it at this interpreter (the packaged path is /usr/bin/kvmdmd)
    unit = unit.replace("ExecStart=/usr/bin/kvmdmd", f"ExecStart={sys.executable} -m daemon.server")
    (tmp_path / "kvmdmd.service").write_text(unit)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "kvmdmd.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "KillMode=process" in unit and "Type=notify" in unit and "WatchdogSec=" in unit
    assert "DeviceAllow=/dev/kvm rw" in unit and "DeviceAllow=/dev/net/tun rw" in unit
    sec = subprocess.run(["systemd-analyze", "security", "--offline=true", str(tmp_path / "kvmdmd.service")],
                         capture_output=True, text=True, timeout=60)
    score = [ln for ln in sec.stdout.splitlines() if "Overall exposure level" in ln]
    print(score)
    assert score, sec.stdout + sec.stderr


def test_the_unit_gives_the_c_loops_a_cache_outside_the_protected_home(tmp_path: Path) -> None:
    # ProtectHome=yes hides ~/.cache: without KVMDM_CACHE the C loops (kvmcore.fastrun, pv.netring) could not be
    # built under systemd and every DM would fall back to the Python loops.
    unit = (REPO / "systemd" / "kvmdmd.service").read_text()
    assert "ProtectHome=yes" in unit
    assert "CacheDirectory=kvmdm" in unit and "Environment=KVMDM_CACHE=/var/cache/kvmdm" in unit
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMDM_")}
    env |= {"HOME": "/nonexistent", "KVMDM_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", "from kvmcore import fastrun; from pv import netring; "
                        "print(fastrun.AVAILABLE, netring.AVAILABLE)"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["True", "True"], r.stderr
    assert list((tmp_path / "fastrun").glob("_kvmdm_fastrun_*")) and list((tmp_path / "netring").glob("_kvmdm_netring_*"))


def test_tmpfiles_and_sysusers_declare_dirs_and_group() -> None:
    tmpf = (REPO / "systemd" / "tmpfiles.d" / "kvmdm.conf").read_text()
    assert "d     /run/kvmdm            0755" in tmpf and "/var/lib/kvmdm        0700" in tmpf
    assert "g kvmdm -" in (REPO / "systemd" / "sysusers.d" / "kvmdm.conf").read_text()
