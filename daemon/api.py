"""The REST API (aiohttp): routes, error mapping, body limits, bearer-token check for the TCP listener.

Every error is JSON ``{"error": msg}`` (plus ``"errors": [...]`` for definition validation). Client mistakes get
400 (malformed), 404, 409 (wrong state / exists), 413 (too large), 415 (not JSON), 422 (invalid definition or
unstartable guest); DM faults get 502/504; a catch-all middleware answers 500 only for genuine bugs and logs the
traceback. The OpenAPI document (:mod:`daemon.openapi`) describes exactly these routes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from daemon import openapi
from daemon.messages import MAX_CONSOLE_INPUT
from daemon.supervisor import (
    DMFault,
    Guest,
    InvalidDefinition,
    Supervisor,
    SupervisorError,
)

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
MAX_TAIL = 8 << 20  # the DM caps console.log at 8 MiB
DEFAULT_TAIL = 64 * 1024
VERSION = "0.1.0"

SUP_KEY = web.AppKey("supervisor", Supervisor)
TOKEN_KEY = web.AppKey("token", str)
STARTED_KEY = web.AppKey("started", float)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, allow_nan=False))


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    return json_response({"error": message, **extra}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidDefinition as e:
        return error_response(e.status, str(e), errors=e.errors)
    except SupervisorError as e:
        if isinstance(e, DMFault):
            log.warning("%s %s: %s", request.method, request.path, e)
        return error_response(e.status, str(e))
    except ApiError as e:
        return error_response(e.status, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's own 404/405/413 become JSON too; keep headers such as Allow.
        resp = error_response(e.status, e.reason if e.text is None else e.text.removeprefix(f"{e.status}: "))
        for h in ("Allow",):
            if h in e.headers:
                resp.headers[h] = e.headers[h]
        return resp
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("internal error handling %s %s", request.method, request.path)
        return error_response(500, "internal error (this is a bug; see the daemon log)")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests over TCP need the bearer token; the unix socket is protected by its file mode instead."""
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if isinstance(sockname, tuple):
        token = request.app[TOKEN_KEY]
        got = request.headers.get("Authorization", "")
        if not token or not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            return error_response(401, "missing or invalid bearer token")
    return await handler(request)


# ------------------------------------------------------------------------------------------------ helpers


def _sup(request: web.Request) -> Supervisor:
    return request.app[SUP_KEY]


def _guest(request: web.Request) -> Guest:
    return _sup(request).get(request.match_info["name"])


def guest_json(g: Guest) -> dict[str, Any]:
    return {**g.info(), "definition": g.definition.to_dict()}


async def read_json(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {request.content_type!r}")
    body = await request.read()  # raises HTTPRequestEntityTooLarge beyond client_max_size
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"invalid JSON: {e}") from None


def _int_query(request: web.Request, key: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        v = int(raw, 10)
    except ValueError:
        raise ApiError(400, f"query parameter {key} must be an integer, got {raw[:32]!r}") from None
    if not lo <= v <= hi:
        raise ApiError(400, f"query parameter {key} must be between {lo} and {hi}")
    return v


def _float_query(request: web.Request, key: str, lo: float, hi: float) -> float | None:
    raw = request.query.get(key)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {key} must be a number, got {raw[:32]!r}") from None
    if not lo <= v <= hi:  # also refuses NaN
        raise ApiError(400, f"query parameter {key} must be between {lo:g} and {hi:g}")
    return v


# ----------------------------------------------------------------------------------------------- handlers


async def health(request: web.Request) -> web.Response:
    sup = _sup(request)
    return json_response({
        "status": "ok",
        "version": VERSION,
        "pid": os.getpid(),
        "uptime_s": time.monotonic() - request.app[STARTED_KEY],
        "guests": list(sup.summary()),
        "store_errors": [{"path": e.path, "error": e.error} for e in sup.store_errors],
    })


async def list_guests(request: web.Request) -> web.Response:
    return json_response({"guests": [guest_json(g) for g in _sup(request).guests.values()]})


async def create_guest(request: web.Request) -> web.Response:
    raw = await read_json(request)
    g = await _sup(request).create(raw)
    return json_response(guest_json(g), status=201)


async def get_guest(request: web.Request) -> web.Response:
    return json_response(guest_json(_guest(request)))


async def delete_guest(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    await _sup(request).destroy(name)
    return json_response({"deleted": name})


def _action(fn_name: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        sup = _sup(request)
        name = request.match_info["name"]
        if fn_name == "stop":
            g = await sup.stop(name, _float_query(request, "timeout", 0.0, 300.0))
        else:
            g = await getattr(sup, fn_name)(name)
        return json_response(guest_json(g))

    handler.__name__ = f"{fn_name}_guest"
    return handler


async def guest_stats(request: web.Request) -> web.Response:
    st = await _sup(request).stats(request.match_info["name"])
    return json_response(st.to_dict())


async def guest_events(request: web.Request) -> web.Response:
    return json_response({"events": list(_guest(request).events)})


def _read_tail(path: str, tail: int) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - tail))
            return f.read(tail)
    except FileNotFoundError:
        return b""


async def console_get(request: web.Request) -> web.Response:
    g = _guest(request)
    tail = _int_query(request, "tail", DEFAULT_TAIL, 0, MAX_TAIL)
    data = await asyncio.to_thread(_read_tail, str(_sup(request).paths.console_log(g.name)), tail)
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


async def console_stream(request: web.Request) -> web.StreamResponse:
    """Chunked stream of the console log: the tail first, then whatever the DM appends; follows rotation on
    restart (new inode or a shorter file) by starting over from the new file's beginning."""
    sup = _sup(request)
    g = _guest(request)
    tail = _int_query(request, "tail", DEFAULT_TAIL, 0, MAX_TAIL)
    max_s = _float_query(request, "max_s", 0.0, 86400.0)
    path = sup.paths.console_log(g.name)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    deadline = None if max_s is None else time.monotonic() + max_s
    f = None
    ino = None
    try:
        first = True
        while sup.guests.get(g.name) is g:
            if f is None:
                try:
                    f = open(path, "rb")  # noqa: SIM115 - kept open across iterations deliberately
                    ino = os.fstat(f.fileno()).st_ino
                    if first:
                        f.seek(max(0, os.fstat(f.fileno()).st_size - tail))
                except FileNotFoundError:
                    f = None
                first = False
            if f is not None:
                chunk = f.read(65536)
                if chunk:
                    await resp.write(chunk)
                    continue
                try:
                    st = os.stat(path)
                    if st.st_ino != ino or st.st_size < f.tell():
                        f.close()
                        f = None
                        continue
                except FileNotFoundError:
                    pass
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        if f is not None:
            f.close()
    with _suppress_conn():
        await resp.write_eof()
    return resp


class _suppress_conn:
    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, ev: Any, tb: Any) -> bool:
        return et is not None and issubclass(et, ConnectionError | RuntimeError)


async def console_post(request: web.Request) -> web.Response:
    g = _guest(request)
    raw = await read_json(request)
    if not isinstance(raw, dict) or len(raw) != 1 or not ({"data"} == raw.keys() or {"text"} == raw.keys()):
        raise ApiError(422, 'body must be {"data": "<base64>"} or {"text": "<string>"}')
    if "data" in raw:
        if not isinstance(raw["data"], str):
            raise ApiError(422, "data must be a base64 string")
        try:
            data = base64.b64decode(raw["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "data is not valid base64") from None
    else:
        if not isinstance(raw["text"], str):
            raise ApiError(422, "text must be a string")
        try:
            data = raw["text"].encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(422, "text is not encodable as UTF-8") from None
    if len(data) > MAX_CONSOLE_INPUT:
        raise ApiError(413, f"console input is limited to {MAX_CONSOLE_INPUT} bytes per request")
    n = await _sup(request).console_input(g.name, data)
    return json_response({"written": n})


async def openapi_doc(request: web.Request) -> web.Response:
    return json_response(openapi.document(VERSION))


def _esc(v: str) -> str:
    """Label value escaping of the Prometheus text format 0.0.4: backslash, double quote and newline."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Exposition:
    """Hand-written Prometheus text exposition: all samples of one family are emitted together after its
    HELP/TYPE lines, as the format requires."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_: str, value: float, **labels: str) -> None:
        fam = self._families.setdefault(name, (kind, help_, []))
        lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
        v = repr(float(value)) if isinstance(value, float) else str(value)
        fam[2].append(f"{name}{{{lab}}} {v}" if lab else f"{name} {v}")

    def render(self) -> str:
        out: list[str] = []
        for name, (kind, help_, samples) in self._families.items():
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


GUEST_STATES = ("stopped", "starting", "running", "paused", "stopping", "restarting", "crashed", "failed")


async def render_metrics(sup: Supervisor) -> str:
    guests = list(sup.guests.values())

    async def one(g: Guest) -> Any:
        if g.pidfd is None or g.state not in ("running", "paused"):
            return None
        return await sup.stats(g.name, timeout=1.0)

    stats = await asyncio.gather(*(one(g) for g in guests), return_exceptions=True)
    e = _Exposition()
    e.add("kvmdm_up", "gauge", "The daemon is serving.", 1)
    e.add("kvmdm_guests", "gauge", "Number of defined guests.", len(guests))
    e.add("kvmdm_store_errors", "gauge", "Guest definition files skipped as corrupt at load.", len(sup.store_errors))
    for g in guests:
        for s in GUEST_STATES:
            e.add("kvmdm_guest_state", "gauge", "Guest state (1 for the current state).", int(g.state == s),
                  guest=g.name, state=s)
    for g in guests:
        e.add("kvmdm_guest_restarts_total", "counter", "DM restarts done by the supervisor.", g.restarts,
              guest=g.name)
    for g in guests:
        for b in g.backends:
            e.add("kvmdm_backend_up", "gauge", "1 if the daemon-managed vhost-user back-end is running.",
                  int(b.state == "running"), guest=g.name, device=str(b.spec.device), type=b.spec.kind)
    for g in guests:
        for b in g.backends:
            e.add("kvmdm_backend_restarts", "gauge", "Restarts of the vhost-user back-end in the current DM run.",
                  b.restarts, guest=g.name, device=str(b.spec.device), type=b.spec.kind)
    for g in guests:
        up = g.uptime()
        if up is not None:
            e.add("kvmdm_guest_uptime_seconds", "gauge", "Seconds since the current DM was spawned.", up,
                  guest=g.name)
    for g in guests:
        rss = sup.dm_rss(g)
        if rss is not None:
            e.add("kvmdm_guest_dm_rss_bytes", "gauge", "Resident set size of the DM (from /proc).", rss,
                  guest=g.name)
    for g, st in zip(guests, stats, strict=True):
        if isinstance(st, BaseException) or st is None:
            continue
        for reason, n in sorted(st.exits.items()):
            e.add("kvmdm_guest_vm_exits_total", "counter", "VM exits handled by the DM, by reason.", n,
                  guest=g.name, reason=reason)
    for g, st in zip(guests, stats, strict=True):
        if isinstance(st, BaseException) or st is None:
            continue
        for dev, counters in sorted(st.devices.items()):
            for counter, n in sorted(counters.items()):
                e.add("kvmdm_guest_device_events_total", "counter", "Device counters reported by the DM.", n,
                      guest=g.name, device=dev, counter=counter)
    for g, st in zip(guests, stats, strict=True):
        ok = not isinstance(st, BaseException)
        if st is not None:
            e.add("kvmdm_guest_stats_ok", "gauge", "1 if the DM answered the stats request of this scrape.",
                  int(ok), guest=g.name)
    return e.render()


async def metrics(request: web.Request) -> web.Response:
    text = await render_metrics(_sup(request))
    return web.Response(text=text, content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


def make_app(sup: Supervisor, token: str = "") -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware, auth_middleware])
    app[SUP_KEY] = sup
    app[TOKEN_KEY] = token
    app[STARTED_KEY] = time.monotonic()
    r = app.router
    r.add_get("/health", health)
    r.add_get("/metrics", metrics)
    r.add_get("/openapi.json", openapi_doc)
    r.add_get("/v1/guests", list_guests)
    r.add_post("/v1/guests", create_guest)
    r.add_get("/v1/guests/{name}", get_guest)
    r.add_delete("/v1/guests/{name}", delete_guest)
    for action in openapi.ACTIONS:
        r.add_post(f"/v1/guests/{{name}}/{action}", _action(action))
    r.add_get("/v1/guests/{name}/stats", guest_stats)
    r.add_get("/v1/guests/{name}/events", guest_events)
    r.add_get("/v1/guests/{name}/console", console_get)
    r.add_post("/v1/guests/{name}/console", console_post)
    r.add_get("/v1/guests/{name}/console/stream", console_stream)
    return app
