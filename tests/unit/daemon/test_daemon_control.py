"""Control protocol: codec and validators (sans-I/O), the blocking DM server and the asyncio daemon client."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from daemon import control  # noqa: E402
from daemon.control import (  # noqa: E402
    MAX_LINE,
    ControlClient,
    ControlClosed,
    ControlError,
    ControlServer,
    ControlTimeout,
    LineDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    StateEvent,
    decode_line,
    encode_event,
    encode_request,
    encode_response,
    validate_event,
    validate_request,
    validate_response,
    validate_stats,
)

# ------------------------------------------------------------------------------------------- codec / validators


def test_line_decoder_splits_lines_across_chunks() -> None:
    d = LineDecoder()
    assert d.feed(b'{"a"') == []
    assert d.feed(b':1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert d.feed(b":3}\n") == [b'{"c":3}']


def test_line_of_exactly_max_is_accepted_one_more_is_a_protocol_error() -> None:
    assert LineDecoder().feed(b"x" * MAX_LINE + b"\n") == [b"x" * MAX_LINE]
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        LineDecoder().feed(b"x" * (MAX_LINE + 1) + b"\n")


def test_oversize_line_is_refused_before_its_newline_arrives() -> None:
    d = LineDecoder()
    with pytest.raises(RemoteProtocolError, match="without a newline"):
        for _ in range(20):
            d.feed(b"y" * 4096)


@pytest.mark.parametrize("line", [b"{bad json", b"[1,2]", b'"str"', b"\xff\xfe{}", b'{"a": NaN}',
                                  b'{"a": Infinity}', b"[" * 100000])
def test_undecodable_lines_are_remote_protocol_errors(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_line(line)


@pytest.mark.parametrize("msg, match", [
    ({"id": 1, "cmd": "ping"}, "missing field"),
    ({"id": 1, "cmd": "ping", "args": {}, "x": 1}, "unknown field"),
    ({"id": "1", "cmd": "ping", "args": {}}, "id must be an integer"),
    ({"id": True, "cmd": "ping", "args": {}}, "id must be an integer"),
    ({"id": -1, "cmd": "ping", "args": {}}, "id must be an integer"),
    ({"id": 2**53, "cmd": "ping", "args": {}}, "id must be an integer"),
    ({"id": 1, "cmd": "format_disk", "args": {}}, "unknown command"),
    ({"id": 1, "cmd": 5, "args": {}}, "unknown command"),
    ({"id": 1, "cmd": "ping", "args": []}, "args must be an object"),
    ({"id": 1, "cmd": "ping", "args": {"x": 1}}, "takes no arguments"),
    ({"id": 1, "cmd": "console_input", "args": {}}, "missing field"),
    ({"id": 1, "cmd": "console_input", "args": {"data": 5}}, "base64 of at most"),
    ({"id": 1, "cmd": "console_input", "args": {"data": "A" * 6000}}, "base64 of at most"),
    ({"id": 1, "cmd": "console_input", "args": {"data": "!!!"}}, "not valid base64"),
])
def test_request_validation_rejects(msg: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        validate_request(msg)


@pytest.mark.parametrize("msg, match", [
    ({"id": 1, "ok": True, "result": {}}, "missing field"),
    ({"id": 1, "ok": "yes", "result": None, "error": None}, "ok must be a boolean"),
    ({"id": 1.5, "ok": True, "result": None, "error": None}, "id must be an integer"),
    ({"id": 1, "ok": True, "result": [1], "error": None}, "result must be an object"),
    ({"id": 1, "ok": False, "result": None, "error": 7}, "error must be a string"),
    ({"id": 1, "ok": False, "result": None, "error": "e" * 5000}, "error must be a string"),
    ({"id": 1, "ok": True, "result": None, "error": "x"}, "ok response with an error"),
    ({"id": 1, "ok": False, "result": None, "error": None}, "without an error"),
])
def test_response_validation_rejects(msg: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        validate_response(msg)


@pytest.mark.parametrize("msg, match", [
    ({"event": "state", "state": "running", "reason": ""}, "missing field"),
    ({"event": "log", "state": "running", "reason": "", "guest_status": None}, "unknown event"),
    ({"event": "state", "state": "exploded", "reason": "", "guest_status": None}, "unknown state"),
    ({"event": "state", "state": "running", "reason": 1, "guest_status": None}, "reason must be"),
    ({"event": "state", "state": "running", "reason": "r" * 2000, "guest_status": None}, "reason must be"),
    ({"event": "state", "state": "stopped", "reason": "", "guest_status": "0"}, "guest_status"),
    ({"event": "state", "state": "stopped", "reason": "", "guest_status": 2**40}, "guest_status"),
])
def test_event_validation_rejects(msg: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        validate_event(msg)


GOOD_STATS = {"state": "running", "uptime_s": 1.5, "exits": {"io": 3}, "devices": {"serial0": {"tx": 1}},
              "rss_bytes": 4096, "vcpus": 1}


def test_valid_stats_pass() -> None:
    assert validate_stats(GOOD_STATS).exits == {"io": 3}


@pytest.mark.parametrize("patch, match", [
    ({"state": "weird"}, "unknown state"),
    ({"uptime_s": -1}, "uptime_s"),
    ({"uptime_s": True}, "uptime_s"),
    ({"exits": {"io": -1}}, "non-negative"),
    ({"exits": {"io": 2**64}}, "non-negative"),
    ({"exits": {"x" * 100: 1}}, "short printable"),
    ({"exits": {"a\nb": 1}}, "short printable"),
    ({"exits": {str(i): 1 for i in range(300)}}, "at most 256"),
    ({"devices": {"d": {"c": "1"}}}, "non-negative"),
    ({"devices": []}, "devices must be an object"),
    ({"rss_bytes": -5}, "rss_bytes"),
    ({"vcpus": 5000}, "vcpus"),
])
def test_invalid_stats_are_refused(patch: dict[str, Any], match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        validate_stats({**GOOD_STATS, **patch})


def test_missing_stats_key_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="missing rss_bytes"):
        validate_stats({k: v for k, v in GOOD_STATS.items() if k != "rss_bytes"})


def test_encoders_refuse_to_emit_invalid_messages() -> None:
    with pytest.raises(LocalProtocolError):
        encode_request(1, "nope")
    with pytest.raises(LocalProtocolError):
        encode_event("bogus")
    with pytest.raises(LocalProtocolError):
        encode_response(1, False)
    with pytest.raises(LocalProtocolError):
        encode_response(1, True, {"big": "x" * MAX_LINE})


def test_encoded_messages_round_trip_through_validators() -> None:
    assert validate_request(decode_line(encode_request(7, "ping")[:-1])).id == 7
    assert validate_response(decode_line(encode_response(7, False, error="no")[:-1])).error == "no"
    assert validate_event(decode_line(encode_event("stopped", "off", 3)[:-1])) == StateEvent("stopped", "off", 3)


# ----------------------------------------------------------------------------------------- server (DM side)


class ServerFixture:
    def __init__(self, path: Path, handler: Any) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.server = ControlServer(self.listener.detach(), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(self.path))
        return s

    def close(self) -> None:
        self.server.stop()
        self.thread.join(5)
        self.server.close()


def default_handler(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
    if cmd == "ping":
        return {"pong": True}
    if cmd == "reset":
        raise RuntimeError("cannot reset now")
    if cmd == "stats":
        return GOOD_STATS
    if cmd == "pause":
        time.sleep(0.6)
    return {}


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ServerFixture]:
    f = ServerFixture(tmp_path / "c.sock", default_handler)
    yield f
    f.close()


_files: dict[int, Any] = {}


def recv_line(s: socket.socket) -> dict[str, Any]:
    f = _files.setdefault(id(s), s.makefile("rb"))
    line = f.readline()
    if not line:
        raise EOFError
    return json.loads(line)


def test_server_answers_valid_requests_and_reports_handler_errors(srv: ServerFixture) -> None:
    s = srv.connect()
    s.sendall(encode_request(1, "ping") + encode_request(2, "reset"))
    assert recv_line(s) == {"id": 1, "ok": True, "result": {"pong": True}, "error": None}
    assert recv_line(s) == {"id": 2, "ok": False, "result": None, "error": "cannot reset now"}


def test_server_answers_invalid_request_with_an_error_when_id_is_usable(srv: ServerFixture) -> None:
    s = srv.connect()
    s.sendall(b'{"id": 3, "cmd": "rm -rf", "args": {}}\n')
    r = recv_line(s)
    assert r["id"] == 3 and r["ok"] is False and "unknown command" in r["error"]


@pytest.mark.parametrize("garbage", [b"{not json}\n", b'{"id": "x", "cmd": "ping"}\n', b"x" * (MAX_LINE + 2)])
def test_server_closes_connection_on_protocol_error_and_keeps_serving(srv: ServerFixture, garbage: bytes) -> None:
    s = srv.connect()
    s.sendall(garbage)
    with pytest.raises((EOFError, ConnectionResetError)):
        recv_line(s)
    assert srv.server.protocol_errors >= 1
    s2 = srv.connect()
    s2.sendall(encode_request(1, "ping"))
    assert recv_line(s2)["ok"] is True


def test_new_connection_replaces_old_and_gets_last_state_event(srv: ServerFixture) -> None:
    srv.server.send_event("running", "booted")  # no connection yet: remembered
    a = srv.connect()
    assert recv_line(a)["state"] == "running"
    b = srv.connect()
    assert recv_line(b) == {"event": "state", "state": "running", "reason": "booted", "guest_status": None}
    with pytest.raises((EOFError, ConnectionResetError)):
        recv_line(a)  # the old connection was dropped
    srv.server.send_event("paused", "p")
    assert recv_line(b)["state"] == "paused"


# ---------------------------------------------------------------------------------------- client (daemon side)


def test_client_round_trip_events_errors_and_timeout(srv: ServerFixture) -> None:
    async def main() -> None:
        events: list[StateEvent] = []
        closed: list[str] = []
        c = await ControlClient.connect(srv.path, on_event=events.append, on_close=closed.append)
        assert await c.request("ping") == {"pong": True}
        with pytest.raises(ControlError, match="cannot reset now"):
            await c.request("reset")
        srv.server.send_event("crashed", "triple fault", None)
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.01)
        assert events == [StateEvent("crashed", "triple fault", None)]
        with pytest.raises(ControlTimeout):
            await c.request("pause", timeout=0.2)
        await c.close()
        assert closed == ["closed by daemon"]
        with pytest.raises(ControlClosed):
            await c.request("ping")

    asyncio.run(main())


@pytest.mark.parametrize("reply", [
    b'{"id": 1, "ok": "true", "result": null, "error": null}\n',
    b"not json\n",
    b'{"event": "state", "state": "hacked", "reason": "", "guest_status": null}\n',
    b"z" * (MAX_LINE + 10),
])
def test_client_drops_connection_on_invalid_dm_messages(tmp_path: Path, reply: bytes) -> None:
    path = tmp_path / "evil.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)

    def evil() -> None:
        conn, _ = lst.accept()
        conn.recv(65536)
        try:
            conn.sendall(reply)
        except OSError:
            pass
        time.sleep(1)
        conn.close()

    t = threading.Thread(target=evil, daemon=True)
    t.start()

    async def main() -> None:
        closed: list[str] = []
        c = await ControlClient.connect(path, on_close=closed.append)
        with pytest.raises(ControlClosed, match="protocol error"):
            await c.request("ping", timeout=3)
        assert closed and "protocol error" in closed[0]

    asyncio.run(main())
    t.join(3)
    lst.close()


def test_client_ignores_responses_with_unknown_ids(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)

    def dm() -> None:
        conn, _ = lst.accept()
        req = json.loads(conn.recv(65536))
        conn.sendall(encode_response(999, True, {}) + encode_response(req["id"], True, {"real": 1}))
        time.sleep(0.5)
        conn.close()

    threading.Thread(target=dm, daemon=True).start()

    async def main() -> None:
        c = await ControlClient.connect(path)
        assert await c.request("ping") == {"real": 1}
        await c.close()

    asyncio.run(main())
    lst.close()


def test_module_keeps_asyncio_out_of_the_dm_import_path() -> None:
    src = Path(control.__file__).read_text()
    top = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    assert not any("asyncio" in ln or "aiohttp" in ln for ln in top)
