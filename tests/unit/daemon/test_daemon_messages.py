"""The typed daemon <-> DM messages (daemon.messages): every command and reply round-trips through its one codec,
the schema refuses what it does not define, and the real DM and the tests' fake DM answer every command through
the same typed_handler with replies the daemon's decoder accepts (the check that would have caught the old
``accepted``/``written`` drift)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon import messages as msg  # noqa: E402
from daemon.config import parse_definition  # noqa: E402
from daemon.control import (  # noqa: E402
    ControlClient,
    ControlServer,
    LocalProtocolError,
    RemoteProtocolError,
    typed_fd_handler,
    typed_handler,
)
from daemon.messages import DmState, ExitCode  # noqa: E402

FAKE_DM = Path(__file__).resolve().parent / "fake_dm.py"

# One instance of every command, with arguments where it takes them.
EVERY_COMMAND: list[msg.Command[Any]] = [msg.Ping(), msg.GetStats(), msg.Pause(), msg.Resume(), msg.Stop(),
                                         msg.Reset(), msg.ConsoleInput(b"hi\n\x00\xff"), msg.AttachBackend(3)]


def test_every_schema_command_is_listed_once_here() -> None:
    assert sorted(c.cmd for c in EVERY_COMMAND) == sorted(msg.SCHEMA)
    assert msg.FD_COMMANDS == {"attach_backend"}


@pytest.mark.parametrize("command", EVERY_COMMAND, ids=lambda c: c.cmd)
def test_every_command_round_trips_through_its_args(command: msg.Command[Any]) -> None:
    assert msg.decode_command(command.cmd, json.loads(json.dumps(command.to_args()))) == command


REPLIES: list[tuple[msg.Command[Any], msg.Reply]] = [
    (msg.Ping(), msg.Pong()),
    (msg.GetStats(), msg.Stats("running", 1.5, {"io": 3}, {"serial": {"tx": 1}}, 4096, 2)),
    (msg.Pause(), msg.StateReply(DmState.PAUSED)),
    (msg.Resume(), msg.StateReply(DmState.RUNNING)),
    (msg.Stop(), msg.Ack()),
    (msg.Reset(), msg.Ack()),
    (msg.ConsoleInput(b"abc"), msg.ConsoleInputReply(3)),
    (msg.AttachBackend(1), msg.AttachBackendReply(1, True)),
]


@pytest.mark.parametrize("command, reply", REPLIES, ids=lambda x: type(x).__name__)
def test_every_reply_round_trips_through_its_result(command: msg.Command[Any], reply: msg.Reply) -> None:
    wire = json.loads(json.dumps(command.encode_reply(reply)))
    assert command.decode_reply(wire) == reply


@pytest.mark.parametrize("command, result, match", [
    (msg.ConsoleInput(b"abc"), {"written": 3}, "unknown field"),  # the old drift: the fake said "written"
    (msg.ConsoleInput(b"abc"), {"accepted": True}, "accepted must be an integer"),
    (msg.ConsoleInput(b"abc"), {"accepted": 5000}, "accepted must be an integer"),
    (msg.Ping(), {}, "missing field"),
    (msg.Ping(), {"pong": 1}, "pong must be true"),
    (msg.Pause(), {}, "missing field"),
    (msg.Pause(), {"state": "stopping"}, "unknown state"),
    (msg.Stop(), {"state": "stopping"}, "unknown field"),
    (msg.Reset(), {"resets": 1}, "unknown field"),
    (msg.AttachBackend(0), {"device": 0}, "missing field"),
    (msg.AttachBackend(0), {"device": 0, "resumed": "yes"}, "resumed must be a boolean"),
    (msg.AttachBackend(0), {"device": 64, "resumed": False}, "device out of range"),
    (msg.GetStats(), [], "result must be an object"),
])
def test_replies_outside_the_schema_are_remote_protocol_errors(command: msg.Command[Any], result: Any,
                                                                match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        command.decode_reply(result)


def test_a_reply_of_the_wrong_type_is_our_own_protocol_error() -> None:
    with pytest.raises(LocalProtocolError, match="must be ConsoleInputReply"):
        msg.ConsoleInput(b"x").encode_reply(msg.Ack())
    with pytest.raises(LocalProtocolError, match="accepted must be"):
        msg.ConsoleInput(b"x").encode_reply(msg.ConsoleInputReply(-1))
    with pytest.raises(LocalProtocolError, match="at most 4096"):
        msg.ConsoleInput(b"x" * 4097)


@pytest.mark.parametrize("code, state, failure", [
    (ExitCode.STOPPED, DmState.STOPPED, False), (ExitCode.RESET, DmState.STOPPED, False),
    (ExitCode.CRASHED, DmState.CRASHED, True), (ExitCode.ERROR, DmState.CRASHED, True),
])
def test_exit_codes_name_the_final_state_and_whether_the_policy_sees_a_failure(
        code: ExitCode, state: DmState, failure: bool) -> None:
    assert code.final_state == state
    reason, is_failure = msg.describe_exit(int(code))
    assert is_failure == failure and f"DM exit {int(code)}" in reason


def test_stop_kinds_map_to_exit_codes_and_unknown_ones_to_error() -> None:
    assert [ExitCode.for_stop(k) for k in ("poweroff", "host", "reset", "crash", "vcpu-error")] == [
        ExitCode.STOPPED, ExitCode.STOPPED, ExitCode.RESET, ExitCode.CRASHED, ExitCode.ERROR]
    assert msg.describe_exit(2) == ("DM exited with unexpected code 2", True)
    assert msg.describe_exit(77) == ("DM exited with unexpected code 77", True)


# ------------------------------------------------------------------------- the real DM and the fake, same schema


class _StubVmm:
    """Just what DeviceModel.handle touches: pause/resume, request_stop, serial_input, the stats sources."""

    def __init__(self) -> None:
        self.stops: list[str] = []
        self.input = bytearray()
        self.state = SimpleNamespace(request_stop=lambda reason: self.stops.append(reason.kind))
        self.pio = SimpleNamespace(stats=SimpleNamespace(reads=1, writes=2))
        self.mmio = SimpleNamespace(stats=SimpleNamespace(reads=0, writes=0))
        self.serial = SimpleNamespace(metrics=SimpleNamespace(tx_bytes=5, name="not a counter"))

    def pause(self) -> bool:
        return True

    def resume(self) -> None:
        pass

    def serial_input(self, data: bytes) -> int:
        self.input += data
        return len(data)

    def exit_counts(self) -> dict[str, int]:
        return {"io": 4, "hlt": 1}


class _StubVhostDevice:
    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def reattach(self, sock: socket.socket) -> bool:
        self.sock = sock
        return True


@pytest.fixture
def real_dm() -> Iterator[Any]:
    from daemon.dm import DeviceModel

    null = os.open(os.devnull, os.O_WRONLY)
    d = parse_definition({"name": "schema", "kernel": "demo", "vcpus": 2}, check_paths=False)
    dm = DeviceModel(argparse.Namespace(console_fd=null), d)
    dm.vmm = _StubVmm()  # type: ignore[assignment]
    dm.state = DmState.RUNNING
    dm.vhost_devices = [_StubVhostDevice() for _ in range(4)]
    yield dm
    for dev in dm.vhost_devices:
        if dev.sock is not None:
            dev.sock.close()
    os.close(null)


@pytest.fixture
def fake_dm() -> Iterator[Any]:
    spec = importlib.util.spec_from_file_location("fake_dm_under_test", FAKE_DM)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r, w = os.pipe()
    d = parse_definition({"name": "schema", "kernel": "demo", "vcpus": 2}, check_paths=False)
    os.write(w, d.to_json().encode())
    os.close(w)
    null = os.open(os.devnull, os.O_WRONLY)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    args = argparse.Namespace(definition_fd=r, console_fd=null, control_fd=lst.detach())
    fake = mod.FakeDM(args)
    fake.state = DmState.RUNNING
    yield fake
    fake.server.close()
    os.close(null)


def _serve(handler: Any, command: msg.Command[Any]) -> msg.Reply:
    """One command through the same adapter ControlServer uses, then through the daemon's decoder."""
    wire = json.loads(json.dumps(typed_handler(handler)(command.cmd, command.to_args())))
    return command.decode_reply(wire)


@pytest.mark.parametrize("command", [c for c in EVERY_COMMAND if not c.carries_fd], ids=lambda c: c.cmd)
def test_the_real_dm_and_the_fake_dm_answer_each_command_with_the_same_reply_type(
        command: msg.Command[Any], real_dm: Any, fake_dm: Any) -> None:
    if isinstance(command, msg.Resume):  # both must be paused to resume
        _serve(real_dm.handle, msg.Pause())
        _serve(fake_dm.handle, msg.Pause())
    real = _serve(real_dm.handle, command)
    fake = _serve(fake_dm.handle, command)
    assert type(real) is type(fake) is command.reply
    if isinstance(command, msg.ConsoleInput):
        assert real == fake == msg.ConsoleInputReply(len(command.data))
        assert bytes(real_dm.vmm.input) == command.data
    if isinstance(command, msg.Pause | msg.Resume):
        assert real == fake


def test_the_real_dm_answers_attach_backend_through_the_typed_fd_adapter(real_dm: Any) -> None:
    a, b = socket.socketpair()
    with b:
        out = typed_fd_handler(real_dm.handle_fd)("attach_backend", {"device": 2}, a.detach())
    assert msg.AttachBackend(2).decode_reply(out) == msg.AttachBackendReply(2, True)
    assert real_dm.vhost_devices[2].sock is not None


def test_the_real_dm_reports_its_exit_code_with_the_matching_final_state(real_dm: Any) -> None:
    _serve(real_dm.handle, msg.Reset())
    assert real_dm.vmm.stops == ["reset"]
    assert ExitCode.for_stop("reset").final_state == DmState.STOPPED


# -------------------------------------------------------------------------------------- the daemon's client


def test_client_call_refuses_a_dm_reply_outside_the_schema_instead_of_guessing(tmp_path: Path) -> None:
    """A DM that answers console_input the old way ({"written": n}) is a protocol error for call(), not a value
    the daemon makes up (the supervisor turns it into a 502)."""
    path = tmp_path / "c.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)
    server = ControlServer(lst.detach(), lambda cmd, args: {"written": 3} if cmd == "console_input" else
                           {"pong": True})
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()

    async def main() -> None:
        c = await ControlClient.connect(path)
        try:
            assert await c.call(msg.Ping(), timeout=3) == msg.Pong()
            with pytest.raises(RemoteProtocolError, match="unknown field"):
                await c.call(msg.ConsoleInput(b"abc"), timeout=3)
        finally:
            await c.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()
        t.join(5)
        server.close()


def test_a_typed_dm_answers_a_wrong_reply_type_with_an_error_not_a_malformed_result(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)
    server = ControlServer(lst.detach(), typed_handler(lambda command: msg.Ack()))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b'{"id":1,"cmd":"ping","args":{}}\n')
        deadline = time.monotonic() + 5
        buf = b""
        while b"\n" not in buf and time.monotonic() < deadline:
            buf += s.recv(4096)
        r = json.loads(buf)
        assert r["ok"] is False and "must be Pong" in r["error"]
        s.close()
    finally:
        server.stop()
        t.join(5)
        server.close()


# ----------------------------------------------------------------------------------- the DM's fd arguments


def _fd_argv() -> tuple[list[str], dict[str, Any]]:
    argv: list[str] = []
    want: dict[str, Any] = {}
    for n, fd in enumerate(msg.DM_FDS, start=10):
        argv += [fd.flag, str(n)] * (2 if fd.repeated else 1)
        want[fd.flag[2:].replace("-", "_")] = [n, n] if fd.repeated else n
    return argv, want


def test_the_real_dm_and_the_fake_dm_parse_every_fd_of_the_contract_alike() -> None:
    from daemon.dm import parse_args

    spec = importlib.util.spec_from_file_location("fake_dm_argv", FAKE_DM)
    assert spec is not None and spec.loader is not None
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    argv, want = _fd_argv()
    assert "--nic-rom-fd" in argv  # a firmware guest's option ROM (nic_rom): the jail cannot open the file
    for parsed in (parse_args([*argv, "--no-jail"]), fake._parse_args([*argv, "--no-jail"])):
        assert {k: getattr(parsed, k) for k in want} == want


def test_required_fds_are_required_and_optional_ones_default_to_none_or_empty() -> None:
    from daemon.dm import parse_args

    required = [a for fd in msg.DM_FDS if fd.required for a in (fd.flag, "3")]
    a = parse_args([*required, "--no-jail"])
    assert a.initrd_fd is None and a.nic_rom_fd is None and a.disk_fd == [] and a.tap_fd == []
    with pytest.raises(SystemExit):
        parse_args([*required[2:], "--no-jail"])  # no --control-fd
