"""A fake device-model process that speaks the real DM contract (argv, fds, control protocol, exit codes).

The daemon's tests point ``--dm-command`` at this script. It serves the typed commands of daemon.messages through
the same ``typed_handler`` as the real ``daemon.dm``, so its replies are held to the schema the daemon decodes. Behaviour is
steered from the guest definition's ``cmdline`` with ``fake.*`` words, so a test chooses it per guest:

    fake.exit_after=SECONDS   exit by itself after SECONDS with fake.exit_code (default 0)
    fake.exit_code=N          0 powered off, 3 guest reset, 4 guest crashed, 1 DM error
    fake.exit_now=N           exit with code N at once, before answering anything (a guest that is over in ms)
    fake.guest_status=N       guest_status reported in the final "stopped" event
    fake.ignore_stop=1        answer "stop" but keep running (the daemon must fall back to SIGKILL)
    fake.hang=1               never answer any request (the daemon's timeouts must fire)
    fake.console_every=SECS   write a console line every SECS

At start it writes one console line listing its open fds (``fake-dm: fds=[...]``) so tests can check the daemon
passed exactly the contract's fds, and ``fake-dm: args=...`` with its parsed arguments.
"""

from __future__ import annotations

import argparse
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon import messages as msg  # noqa: E402
from daemon.config import ConfigError, parse_definition_json  # noqa: E402
from daemon.control import ControlServer, typed_handler  # noqa: E402
from daemon.messages import DmState, ExitCode  # noqa: E402


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fake_dm")
    p.add_argument("--tag", default="")  # lets tests find their own processes in /proc
    msg.add_dm_fd_args(p)  # the real DM's fd arguments (daemon.messages.DM_FDS)
    p.add_argument("--no-jail", action="store_true")
    p.add_argument("--jail-root")
    p.add_argument("--uid", type=int)
    p.add_argument("--gid", type=int)
    return p.parse_args(argv)


class FakeDM:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        with os.fdopen(args.definition_fd, "rb") as f:
            self.definition = parse_definition_json(f.read(), check_paths=False)
        self.opts = {}
        for word in self.definition.cmdline.split():
            if word.startswith("fake.") and "=" in word:
                k, v = word[5:].split("=", 1)
                self.opts[k] = v
        self.console_fd = args.console_fd
        self.state = DmState.STARTING
        self.started = time.monotonic()
        self.exits = {"io": 0, "mmio": 0, "hlt": 0}
        self.resets = 0
        self.console_in = 0
        self.lock = threading.Lock()
        self.server = ControlServer(args.control_fd, typed_handler(self.handle))
        self.exit_code: int | None = None

    def console(self, text: str) -> None:
        os.write(self.console_fd, text.encode() + b"\n")

    def handle(self, req: msg.Command[Any]) -> msg.Reply:
        if self.opts.get("hang") == "1":
            time.sleep(3600)
        with self.lock:
            if isinstance(req, msg.Ping):
                return msg.Pong()
            if isinstance(req, msg.GetStats):
                self.exits["io"] += 7
                self.exits["mmio"] += 3
                return msg.Stats(self.state, time.monotonic() - self.started, dict(self.exits),
                                 {"serial0": {"tx_bytes": 42, "rx_bytes": self.console_in},
                                  "virtio-blk0": {"requests": 5}},
                                 _rss(), self.definition.vcpus)
            if isinstance(req, msg.Pause):
                if self.state != DmState.RUNNING:
                    raise RuntimeError(f"cannot pause in state {self.state}")
                self.set_state(DmState.PAUSED, "paused by daemon")
                return msg.StateReply(self.state)
            if isinstance(req, msg.Resume):
                if self.state != DmState.PAUSED:
                    raise RuntimeError(f"cannot resume in state {self.state}")
                self.set_state(DmState.RUNNING, "resumed by daemon")
                return msg.StateReply(self.state)
            if isinstance(req, msg.Reset):
                self.resets += 1
                self.started = time.monotonic()
                self.console(f"fake-dm: reset #{self.resets}")
                self.set_state(DmState.RUNNING, "reset by daemon")
                return msg.Ack()
            if isinstance(req, msg.ConsoleInput):
                self.console_in += len(req.data)
                self.console("fake-dm: input " + req.data.decode("utf-8", "replace"))
                return msg.ConsoleInputReply(len(req.data))
            if isinstance(req, msg.Stop):
                if self.opts.get("ignore_stop") == "1":
                    return msg.Ack()
                self.finish(ExitCode.STOPPED, "stopped by daemon")
                return msg.Ack()
        raise RuntimeError(f"unhandled command {req.cmd}")

    def set_state(self, state: DmState, reason: str, guest_status: int | None = None) -> None:
        self.state = state
        self.server.send_event(state, reason, guest_status)

    def finish(self, code: int, reason: str) -> None:
        status = int(self.opts["guest_status"]) if "guest_status" in self.opts else None
        try:
            state = ExitCode(code).final_state
        except ValueError:
            state = DmState.CRASHED
        self.set_state(state, reason, status)
        self.exit_code = code
        self.server.stop()

    def run(self, fds: list[int]) -> int:
        self.console(f"fake-dm: booting {self.definition.name} pid={os.getpid()}")
        self.console(f"fake-dm: fds={fds}")
        a = self.args
        kinds: dict[str, Any] = {"kvm": _kind(a.kvm_fd), "kernel": _kind(a.kernel_fd),
                                 "disks": [_kind(x) for x in a.disk_fd]}
        if a.nic_rom_fd is not None:
            kinds["nic_rom"] = _kind(a.nic_rom_fd)
        self.console(f"fake-dm: args=jail:{'off' if a.no_jail else a.jail_root} uid={a.uid} gid={a.gid} "
                     f"kinds={kinds}")
        self.set_state(DmState.RUNNING, "guest started")
        if "exit_now" in self.opts:
            self.finish(int(self.opts["exit_now"]), "fake exit before any request")
            self.server.close()
            return self.exit_code or 0
        if "exit_after" in self.opts:
            code = int(self.opts.get("exit_code", "0"))
            threading.Timer(float(self.opts["exit_after"]), self.finish, (code, f"fake exit {code}")).start()
        if "console_every" in self.opts:
            period = float(self.opts["console_every"])

            def tick() -> None:
                n = 0
                while self.exit_code is None:
                    time.sleep(period)
                    n += 1
                    self.console(f"fake-dm: tick {n}")

            threading.Thread(target=tick, daemon=True).start()
        self.server.serve_forever()
        self.server.close()
        return self.exit_code or 0


def _open_fds() -> list[int]:
    out = []
    for x in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(x))  # the directory fd listdir used is closed by now: EBADF
        except OSError:
            continue
        out.append(int(x))
    return sorted(out)


def _kind(fd: int) -> str:
    st = os.fstat(fd)
    if stat.S_ISCHR(st.st_mode):
        return "chr"
    if stat.S_ISSOCK(st.st_mode):
        return "sock"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    fds = _open_fds()  # before we open anything ourselves: exactly what the daemon passed
    args = _parse_args(argv)
    try:
        dm = FakeDM(args)
    except (ConfigError, OSError, ValueError) as e:
        os.write(args.console_fd, f"fake-dm: error {e}\n".encode())
        return 1
    return dm.run(fds)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
