"""Daemon <-> device-model control protocol: codec, sans-I/O validation, asyncio client, blocking server.

Wire format (one listening SOCK_STREAM unix socket per guest, bound by the daemon, passed to the DM as
``--control-fd``; the DM serves one connection at a time and a new connection replaces the old one, which is how
a restarted daemon re-attaches):

* newline-delimited UTF-8 JSON objects, at most :data:`MAX_LINE` bytes per line (without the newline); a longer
  line or undecodable JSON is a protocol error and the connection is closed;
* request  ``{"id": int, "cmd": str, "args": object}``
* response ``{"id": int, "ok": bool, "result": object|null, "error": str|null}``
* ``attach_backend`` (``{"device": int}``) is the one request that carries a file descriptor: a connected
  vhost-user socket, sent by SCM_RIGHTS with the request's first byte. The DM accepts exactly one fd, and only a
  unix stream socket (:func:`check_passed_socket`); any other fd arriving on the connection is closed.
* event    ``{"event": "state", "state": "starting|running|paused|stopped|crashed", "reason": str,
  "guest_status": int|null}`` (unsolicited, DM -> daemon).

What ``args`` and ``result`` hold for each command is defined once, typed, in :mod:`daemon.messages`; the daemon
sends with :meth:`ControlClient.call` and the DMs serve through :func:`typed_handler`, so both ends (and the tests'
fake DM) are held to the same schema.

Both ends treat the other's bytes as untrusted (h11's model): :class:`LineDecoder` and the ``validate_*``
functions do no I/O, raise :class:`RemoteProtocolError` for the peer's faults and :class:`LocalProtocolError`
for our own, and everything else in the daemon and DM only sees validated dataclasses/dicts.

The server half (:class:`ControlServer`) is selectors-based and imports no asyncio so the DM stays small.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from daemon.messages import (
    COMMANDS,
    DM_STATES,
    FD_COMMANDS,
    MAX_CONSOLE_INPUT,
    MAX_ID,
    MAX_VHOST_DEVICES,
    AttachBackend,
    Command,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    Reply,
    StateEvent,
    Stats,
    decode_command,
    validate_event,
    validate_stats,
)
from daemon.messages import check_keys as _check_keys
from daemon.messages import is_int as _is_int
from kvmcore.util.fdpass import recv_with_fds, sendmsg_fds

R = TypeVar("R", bound=Reply)

__all__ = [
    "COMMANDS", "DM_STATES", "FD_COMMANDS", "MAX_CONSOLE_INPUT", "MAX_ID", "MAX_VHOST_DEVICES", "LocalProtocolError",
    "ProtocolError", "RemoteProtocolError", "StateEvent", "Stats", "validate_event", "validate_stats",
]

log = logging.getLogger(__name__)

MAX_LINE = 65536
DEFAULT_TIMEOUT = 5.0
MAX_ERROR_LEN = 4096
# How many fds one recvmsg may bring in before the extra ones are refused (closed): enough to notice "more than
# one" for the FD_COMMANDS, bounded so a peer cannot fill our table.
MAX_FDS_PER_MSG = 4
MAX_PENDING_FD_BATCHES = 4


class ControlError(Exception):
    """The DM answered ``ok: false``; the message is the DM's error string."""


class ControlTimeout(ControlError):
    """No response within the request timeout."""


class ControlClosed(ControlError):
    """The control connection is closed (DM exited or dropped us)."""


# --------------------------------------------------------------------------------------------- codec (sans-I/O)


class LineDecoder:
    """Splits a byte stream into lines, refusing any line longer than ``max_line`` before buffering it all."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while True:
            nl = self._buf.find(b"\n", start)
            if nl < 0:
                break
            if nl - start > self.max_line:
                raise RemoteProtocolError(f"line of {nl - start} bytes exceeds {self.max_line}")
            lines.append(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        if len(self._buf) > self.max_line:
            raise RemoteProtocolError(f"line exceeds {self.max_line} bytes without a newline")
        return lines


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def decode_line(line: bytes) -> dict[str, Any]:
    """One line -> JSON object. NaN/Infinity (Python extensions, not JSON) are refused."""
    try:
        text = line.decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RemoteProtocolError(f"undecodable message: {e}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"message must be a JSON object, got {type(obj).__name__}")
    return obj


def encode(msg: dict[str, Any]) -> bytes:
    data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("utf-8")
    if len(data) > MAX_LINE:
        raise LocalProtocolError(f"message of {len(data)} bytes exceeds {MAX_LINE}")
    return data + b"\n"


def encode_request(req_id: int, cmd: str, args: dict[str, Any] | None = None) -> bytes:
    msg = {"id": req_id, "cmd": cmd, "args": args or {}}
    try:
        validate_request(msg)
    except RemoteProtocolError as e:
        raise LocalProtocolError(str(e)) from None
    return encode(msg)


def encode_response(req_id: int, ok: bool, result: dict[str, Any] | None = None,
                    error: str | None = None) -> bytes:
    if ok and error is not None or not ok and not error:
        raise LocalProtocolError("ok responses carry no error; failed responses carry one")
    return encode({"id": req_id, "ok": ok, "result": result if ok else None,
                   "error": None if ok else error[:MAX_ERROR_LEN]})  # type: ignore[index]


def encode_event(state: str, reason: str = "", guest_status: int | None = None) -> bytes:
    return encode(StateEvent.make(state, reason, guest_status).to_msg())


# ----------------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Request:
    id: int
    cmd: str
    args: dict[str, Any]
    command: Command[Any]


@dataclass(frozen=True)
class Response:
    id: int
    ok: bool
    result: dict[str, Any] | None
    error: str | None


def validate_request(msg: dict[str, Any]) -> Request:
    _check_keys(msg, {"id", "cmd", "args"}, "request")
    rid, cmd, args = msg["id"], msg["cmd"], msg["args"]
    if not _is_int(rid) or not 0 <= rid <= MAX_ID:
        raise RemoteProtocolError(f"request: id must be an integer in 0..{MAX_ID}")
    command = decode_command(cmd, args)
    return Request(rid, cmd, args, command)


class PassedFdError(RemoteProtocolError):
    """The fds that came with a request are not exactly one connected unix stream socket."""


def check_passed_socket(fds: list[int]) -> int:
    """Validate the fds received with an fd-carrying request: exactly one, and a unix SOCK_STREAM socket
    (fstat S_ISSOCK, then SO_DOMAIN/SO_TYPE). Returns it; on error every fd in ``fds`` is closed."""
    try:
        if len(fds) != 1:
            raise PassedFdError(f"expected exactly one fd with the request, got {len(fds)}")
        fd = fds[0]
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise PassedFdError(f"passed fd: {e.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise PassedFdError(f"passed fd is not a socket (mode 0o{st.st_mode:o})")
        s = socket.socket(fileno=fd)
        try:
            domain = s.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
            stype = s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        finally:
            s.detach()
        if domain != socket.AF_UNIX or stype != socket.SOCK_STREAM:
            raise PassedFdError(f"passed socket is not a unix stream socket (domain {domain}, type {stype})")
        return fd
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def validate_response(msg: dict[str, Any]) -> Response:
    _check_keys(msg, {"id", "ok", "result", "error"}, "response")
    rid, ok, result, error = msg["id"], msg["ok"], msg["result"], msg["error"]
    if not _is_int(rid) or not 0 <= rid <= MAX_ID:
        raise RemoteProtocolError("response: id must be an integer")
    if not isinstance(ok, bool):
        raise RemoteProtocolError("response: ok must be a boolean")
    if result is not None and not isinstance(result, dict):
        raise RemoteProtocolError("response: result must be an object or null")
    if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR_LEN):
        raise RemoteProtocolError(f"response: error must be a string of at most {MAX_ERROR_LEN} chars or null")
    if ok and error is not None:
        raise RemoteProtocolError("response: ok response with an error")
    if not ok and error is None:
        raise RemoteProtocolError("response: failed response without an error")
    return Response(rid, ok, result, error)


def classify(msg: dict[str, Any]) -> Response | StateEvent:
    """A message arriving at the daemon is either a response or an event."""
    if "event" in msg:
        return validate_event(msg)
    return validate_response(msg)


# ----------------------------------------------------------------------------------------- asyncio client (daemon)


class ControlClient:
    """Daemon side of one control connection. Events go to ``on_event``; ``on_close(reason)`` fires once when the
    connection ends for any reason (EOF, protocol error, :meth:`close`)."""

    def __init__(self, reader: Any, writer: Any, on_event: Callable[[StateEvent], None] | None,
                 on_close: Callable[[str], None] | None) -> None:
        import asyncio

        self._asyncio = asyncio
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._on_close = on_close
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._decoder = LineDecoder()
        self.closed = False
        self.close_reason = ""
        self._task = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, on_event: Callable[[StateEvent], None] | None = None,
                      on_close: Callable[[str], None] | None = None,
                      timeout: float = DEFAULT_TIMEOUT) -> ControlClient:
        import asyncio

        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(os.fspath(path)), timeout)
        return cls(reader, writer, on_event, on_close)

    async def _read_loop(self) -> None:
        reason = "connection closed by DM"
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for line in self._decoder.feed(data):
                    self._dispatch(classify(decode_line(line)))
        except ProtocolError as e:
            reason = f"protocol error from DM: {e}"
            log.warning("control: %s", reason)
        except (OSError, ConnectionError) as e:
            reason = f"connection error: {e}"
        except self._asyncio.CancelledError:
            reason = "closed by daemon"
        finally:
            self._finish(reason)

    def _dispatch(self, msg: Response | StateEvent) -> None:
        if isinstance(msg, StateEvent):
            if self._on_event is not None:
                self._on_event(msg)
            return
        fut = self._pending.pop(msg.id, None)
        if fut is None:
            # A response to a request that timed out, or a made-up id: ignore rather than trust it.
            log.warning("control: response with unexpected id %d ignored", msg.id)
            return
        if not fut.done():
            fut.set_result(msg)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ControlClosed(reason))
        self._pending.clear()
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - closing a broken transport must not raise
            pass
        if self._on_close is not None:
            self._on_close(reason)

    async def request(self, cmd: str, args: dict[str, Any] | None = None,
                      timeout: float = DEFAULT_TIMEOUT, fd: int | None = None) -> dict[str, Any]:
        """Send one command; return its result; raise ControlError/ControlTimeout/ControlClosed.

        ``fd`` (only for :data:`FD_COMMANDS`, and required by them) travels by SCM_RIGHTS with the request; the
        caller keeps its copy."""
        if self.closed:
            raise ControlClosed(self.close_reason or "closed")
        if (fd is not None) != (cmd in FD_COMMANDS):
            raise LocalProtocolError(f"{cmd}: an fd goes with exactly the commands {sorted(FD_COMMANDS)}")
        rid = next(self._ids)
        data = encode_request(rid, cmd, args)
        fut: Any = self._asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            if fd is not None:
                await self._asyncio.wait_for(self._send_with_fd(data, fd), timeout)
            else:
                self._writer.write(data)
            await self._asyncio.wait_for(self._writer.drain(), timeout)
            resp: Response = await self._asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ControlTimeout(f"DM did not answer {cmd!r} within {timeout:g} s") from None
        except (OSError, ConnectionError) as e:
            raise ControlClosed(f"connection error: {e}") from None
        finally:
            self._pending.pop(rid, None)
        if not resp.ok:
            raise ControlError(resp.error or "error")
        return resp.result or {}

    async def call(self, command: Command[R], timeout: float = DEFAULT_TIMEOUT, fd: int | None = None) -> R:
        """Send a typed command; return its typed reply (validated against daemon.messages' schema: a reply the
        schema does not allow raises :class:`RemoteProtocolError`, never falls back to a guess)."""
        result = await self.request(command.cmd, command.to_args(), timeout=timeout, fd=fd)
        return command.decode_reply(result)

    async def _send_with_fd(self, data: bytes, fd: int) -> None:
        """sendmsg on (a dup of) the transport's socket, once the transport's own buffer is empty so the bytes
        stay in order; the fd rides on the first byte, the rest (if the socket took only part) via the writer."""
        transport = self._writer.transport
        while transport.get_write_buffer_size():
            await self._asyncio.sleep(0.005)
        tsock = self._writer.get_extra_info("socket")
        if tsock is None:
            raise ControlClosed("no socket")
        sock = socket.socket(fileno=os.dup(tsock.fileno()))  # shares the O_NONBLOCK file description
        try:
            while True:
                try:
                    sent = sendmsg_fds(sock, data, [fd])
                    break
                except BlockingIOError:
                    await self._asyncio.sleep(0.005)
        finally:
            sock.close()
        if sent < len(data):
            self._writer.write(data[sent:])

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except self._asyncio.CancelledError:
                pass
        self._finish("closed by daemon")


# ---------------------------------------------------------------------------------------- blocking server (DM)

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
# fd_handler(cmd, args, fd): for FD_COMMANDS, with the validated socket fd; it owns (must close or keep) the fd.
FdHandler = Callable[[str, dict[str, Any], int], dict[str, Any]]
# The typed forms every DM (the real one, the tests' fake) serves with: a command in, its reply type out.
TypedHandler = Callable[[Command[Any]], Reply]
TypedFdHandler = Callable[[AttachBackend, int], Reply]


def typed_handler(handler: TypedHandler) -> Handler:
    """Adapt a typed handler to :class:`ControlServer`: args decoded by the command's schema, the reply checked to
    be the command's reply type and to pass the daemon's validation (else the daemon gets ``ok: false``)."""

    def raw(cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        command = decode_command(cmd, args)
        return command.encode_reply(handler(command))

    return raw


def typed_fd_handler(handler: TypedFdHandler) -> FdHandler:
    def raw(cmd: str, args: dict[str, Any], fd: int) -> dict[str, Any]:
        try:
            command = decode_command(cmd, args)
            if not isinstance(command, AttachBackend):
                raise LocalProtocolError(f"{cmd} carries no fd")
        except BaseException:
            os.close(fd)
            raise
        return command.encode_reply(handler(command, fd))

    return raw


class ControlServer:
    """DM side: accept one daemon connection at a time on ``listen_fd`` and answer requests with ``handler``.

    ``handler(cmd, args)`` gets only validated requests; it returns the result object or raises to answer
    ``ok: false`` with ``str(exc)``. A new connection replaces the current one (daemon restart). The last state
    event is replayed to each new connection so a re-attaching daemon learns the current state at once.
    :meth:`send_event` and :meth:`stop` are thread-safe; :meth:`serve_forever` runs until :meth:`stop`.
    """

    SEND_TIMEOUT = DEFAULT_TIMEOUT

    def __init__(self, listen_fd: int, handler: Handler, fd_handler: FdHandler | None = None) -> None:
        self._listener = socket.socket(fileno=listen_fd)
        self._listener.setblocking(False)
        self._handler = handler
        self._fd_handler = fd_handler
        # fds received by SCM_RIGHTS, one list per recvmsg, waiting for the FD_COMMANDS request they came with.
        self._fd_batches: list[list[int]] = []
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conn: socket.socket | None = None
        self._decoder = LineDecoder()
        self._send_lock = threading.Lock()
        self._last_event: bytes | None = None
        self._running = False
        self.protocol_errors = 0

    def fileno(self) -> int:
        return self._listener.fileno()

    def send_event(self, state: str, reason: str = "", guest_status: int | None = None) -> None:
        data = encode_event(state, reason, guest_status)
        with self._send_lock:
            self._last_event = data
            if self._conn is not None:
                self._send_locked(data)

    def _send_locked(self, data: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.sendall(data)
        except OSError as e:  # includes socket.timeout: a daemon that stops reading loses its connection
            log.warning("control: send failed (%s); dropping connection", e)
            self._drop_locked()

    def _drop_locked(self) -> None:
        if self._conn is not None:
            try:
                self._sel.unregister(self._conn)
            except (KeyError, ValueError):
                pass
            self._conn.close()
            self._conn = None
        self._decoder = LineDecoder()
        self._close_fd_batches()

    def _close_fd_batches(self) -> None:
        for batch in self._fd_batches:
            for fd in batch:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd_batches = []

    def stop(self) -> None:
        self._running = False
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close(self) -> None:
        with self._send_lock:
            self._drop_locked()
        self._sel.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def serve_forever(self) -> None:
        self._running = True
        while self._running:
            self.poll(None)

    def poll(self, timeout: float | None) -> None:
        """One selector round (lets a DM with its own loop drive the server)."""
        for key, _ in self._sel.select(timeout):
            if key.data == "wake":
                try:
                    self._wake_r.recv(4096)
                except BlockingIOError:
                    pass
            elif key.data == "listen":
                self._accept()
            else:
                self._readable()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        # Blocking with a timeout: recv after select never blocks, and sendall cannot hang the DM forever.
        conn.settimeout(self.SEND_TIMEOUT)
        with self._send_lock:
            self._drop_locked()  # a new connection replaces the old one (daemon restart)
            self._conn = conn
            self._sel.register(conn, selectors.EVENT_READ, "conn")
            if self._last_event is not None:
                self._send_locked(self._last_event)

    def _readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            data, fds, truncated = recv_with_fds(conn, 65536, MAX_FDS_PER_MSG)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, truncated = b"", [], False
        if fds or truncated:
            if truncated:
                fds.append(-1)  # more fds than we accept were sent: the batch can never validate
            self._fd_batches.append(fds)
            if len(self._fd_batches) > MAX_PENDING_FD_BATCHES:
                for fd in self._fd_batches.pop(0):
                    if fd >= 0:
                        with contextlib.suppress(OSError):
                            os.close(fd)
        if not data:
            with self._send_lock:
                self._drop_locked()
            return
        try:
            lines = self._decoder.feed(data)
        except RemoteProtocolError as e:
            self._protocol_error(e)
            return
        for line in lines:
            try:
                msg = decode_line(line)
            except RemoteProtocolError as e:
                self._protocol_error(e)
                return
            self._handle(msg)
            if self._conn is not conn:
                return

    def _protocol_error(self, e: Exception) -> None:
        self.protocol_errors += 1
        log.warning("control: protocol error from daemon: %s; closing connection", e)
        with self._send_lock:
            self._drop_locked()

    def _handle(self, msg: dict[str, Any]) -> None:
        rid = msg.get("id")
        try:
            req = validate_request(msg)
        except RemoteProtocolError as e:
            if isinstance(rid, int) and _is_int(rid) and 0 <= rid <= MAX_ID:
                self._reply(encode_response(rid, False, error=str(e)))
            else:
                self._protocol_error(e)
            return
        try:
            if req.cmd in FD_COMMANDS:
                batch = self._fd_batches.pop(0) if self._fd_batches else []
                fd = check_passed_socket(batch)
                if self._fd_handler is None:
                    os.close(fd)
                    raise ValueError(f"{req.cmd} is not supported by this DM")
                result = self._fd_handler(req.cmd, req.args, fd)
            else:
                result = self._handler(req.cmd, req.args)
            if not isinstance(result, dict):
                raise LocalProtocolError(f"handler returned {type(result).__name__}, not a dict")
            data = encode_response(req.id, True, result)
        except Exception as e:  # noqa: BLE001 - any handler failure is reported to the daemon, not raised
            data = encode_response(req.id, False, error=str(e) or type(e).__name__)
        self._reply(data)

    def _reply(self, data: bytes) -> None:
        with self._send_lock:
            self._send_locked(data)
