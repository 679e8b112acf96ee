"""``kvmdmd``: the daemon's entry point (flags, listeners, sd_notify, signal handling).

On SIGTERM/SIGINT the daemon stops serving and exits *without* touching the DMs: they run in their own sessions
(``start_new_session``) and the unit uses ``KillMode=process``, so guests survive a daemon restart and the next
daemon re-attaches to them (see :mod:`daemon.supervisor`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import ipaddress
import logging
import os
import shlex
import signal
import socket
import sys
from pathlib import Path

from aiohttp import web

from daemon.api import make_app
from daemon.paths import DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR, Paths
from daemon.supervisor import DEFAULT_DM_COMMAND, Supervisor, SupervisorConfig

log = logging.getLogger("kvmdmd")


# ---------------------------------------------------------------------------------------------------- sd_notify


def sd_notify(message: str) -> bool:
    """Send a datagram to $NOTIFY_SOCKET (sd_notify(3) protocol, no libsystemd needed). '@' means abstract."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify(%r) failed: %s", message, e)
        return False


def watchdog_interval() -> float | None:
    """Half of $WATCHDOG_USEC (sd_watchdog_enabled(3) recommends pinging at half the timeout), if it is for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    wpid = os.environ.get("WATCHDOG_PID")
    if wpid and wpid != str(os.getpid()):
        return None
    try:
        return max(0.1, int(usec) / 2e6)
    except ValueError:
        return None


async def _watchdog_loop(interval: float) -> None:
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


# ----------------------------------------------------------------------------------------------------- listeners


def bind_unix_socket(path: Path, group: str | None) -> socket.socket:
    """Bind the API socket with mode 0660 from the first instant (umask during bind), then chown to ``group``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o660)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    s.listen(128)
    s.setblocking(False)
    return s


def parse_tcp(spec: str) -> tuple[str, int]:
    host, sep, port_s = spec.rpartition(":")
    if not sep:
        raise ValueError("--tcp must be HOST:PORT")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"--tcp host must be a literal loopback IP address, got {host!r}") from None
    if not ip.is_loopback:
        raise ValueError(f"--tcp refuses non-loopback address {host} (the API has no TLS)")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError("--tcp port out of range")
    return host, port


def read_token(path: str) -> str:
    st = os.stat(path)
    if st.st_mode & 0o077:
        raise ValueError(f"--token-file {path} must not be readable by group/others (mode {st.st_mode & 0o777:o})")
    token = Path(path).read_text().strip()
    if len(token) < 16:
        raise ValueError("--token-file must hold a token of at least 16 characters")
    return token


# ---------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmdmd", description="KVM device-model daemon")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--runtime-dir", type=Path, default=DEFAULT_RUNTIME_DIR)
    p.add_argument("--socket", type=Path, help="API unix socket (default <runtime-dir>/kvmdmd.sock)")
    p.add_argument("--socket-group", help="group owning the API socket (mode 0660), e.g. kvmdm")
    p.add_argument("--tcp", metavar="127.0.0.1:PORT", help="also listen on loopback TCP (needs --token-file)")
    p.add_argument("--token-file", help="file holding the bearer token for --tcp (mode 0600)")
    p.add_argument("--no-jail", action="store_true", help="DEVELOPMENT ONLY: run DMs without their jail")
    p.add_argument("--dm-command", help="device-model command line (default: python -m daemon.dm); implies "
                   "--dm-spawn exec")
    p.add_argument("--dm-spawn", choices=["exec", "zygote"], default=None,
                   help="zygote (default): fork each DM from a pre-imported zygote process, started in "
                        "milliseconds; exec: run the DM command for every guest (its own interpreter, hash seed "
                        "and address-space layout)")
    p.add_argument("--kvm-device", default="/dev/kvm")
    p.add_argument("--uid-base", type=int, default=200000, help="first uid/gid of the per-guest jail range")
    p.add_argument("--uid-count", type=int, default=10000)
    p.add_argument("--start-timeout", type=float, default=10.0, help="seconds for a DM to answer its first ping")
    p.add_argument("--backend-ready-timeout", type=float, default=None,
                   help="seconds for a vhost-user back-end to say it is ready (default 10)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def serve(args: argparse.Namespace) -> int:
    paths = Paths(args.state_dir.resolve(), args.runtime_dir.resolve())
    if args.dm_command and args.dm_spawn == "zygote":
        raise ValueError("--dm-spawn zygote runs daemon.dm itself: it does not take a --dm-command")
    cfg = SupervisorConfig(
        paths=paths,
        dm_command=shlex.split(args.dm_command) if args.dm_command else list(DEFAULT_DM_COMMAND),
        kvm_device=args.kvm_device, no_jail=args.no_jail, uid_base=args.uid_base, uid_count=args.uid_count,
        start_timeout=args.start_timeout,
        dm_spawn="exec" if args.dm_command or args.dm_spawn == "exec" else "zygote")
    if args.backend_ready_timeout is not None:
        cfg.backend_ready_timeout = args.backend_ready_timeout
    token = ""
    tcp = None
    if args.tcp:
        tcp = parse_tcp(args.tcp)
        if not args.token_file:
            raise ValueError("--tcp requires --token-file")
        token = read_token(args.token_file)
    if args.no_jail:
        log.warning("!!! --no-jail: device models run WITHOUT namespaces, uid drop, seccomp. DEVELOPMENT ONLY !!!")
    sup = Supervisor(cfg)
    await sup.load()
    app = make_app(sup, token)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    sock_path = args.socket or paths.default_socket
    usock = bind_unix_socket(sock_path, args.socket_group)
    await web.SockSite(runner, usock).start()
    log.info("listening on unix:%s", sock_path)
    if tcp is not None:
        await web.TCPSite(runner, tcp[0], tcp[1]).start()
        log.info("listening on tcp:%s:%d (bearer token required)", *tcp)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sd_notify(f"READY=1\nSTATUS=serving {len(sup.guests)} guests\nMAINPID={os.getpid()}")
    wd_task = None
    interval = watchdog_interval()
    if interval is not None:
        wd_task = asyncio.ensure_future(_watchdog_loop(interval))
    await stop.wait()
    log.info("shutting down (DMs keep running)")
    sd_notify("STOPPING=1")
    if wd_task is not None:
        wd_task.cancel()
    await runner.cleanup()
    await sup.close()
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(args))
    except (ValueError, OSError, KeyError) as e:
        log.error("kvmdmd: %s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
