"""``kvmdm``: the operator CLI. Stdlib only (http.client over the daemon's unix socket).

Exit codes scripts can rely on: 0 ok, 1 API error, 2 usage, 3 daemon not running/unreachable, 4 guest not found.
Human tables by default; ``--json`` prints the API's JSON unchanged.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_NO_DAEMON = 3
EXIT_NOT_FOUND = 4

DEFAULT_SOCKET = os.environ.get("KVMDM_SOCKET", "/run/kvmdm/kvmdmd.sock")


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix stream socket (the Host header is a placeholder)."""

    def __init__(self, path: str, timeout: float | None = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, socket_path: str, timeout: float | None = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def open(self, method: str, path: str, body: Any = None) -> http.client.HTTPResponse:
        conn = UnixHTTPConnection(self.socket_path, self.timeout)
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise CliError(EXIT_NO_DAEMON, f"kvmdm: daemon not running (cannot connect to {self.socket_path}: "
                                           f"{e.strerror})") from None
        except PermissionError:
            raise CliError(EXIT_NO_DAEMON, f"kvmdm: permission denied on {self.socket_path} "
                                           "(are you in the kvmdm group?)") from None
        except (OSError, http.client.HTTPException) as e:
            raise CliError(EXIT_NO_DAEMON, f"kvmdm: cannot talk to the daemon at {self.socket_path}: {e}") from None

    def call(self, method: str, path: str, body: Any = None, *, guest: str | None = None) -> tuple[bytes, str]:
        resp = self.open(method, path, body)
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        if resp.status >= 400:
            try:
                msg = json.loads(data)["error"]
                extra = json.loads(data).get("errors") or []
            except (ValueError, KeyError, TypeError):
                msg, extra = data.decode("utf-8", "replace")[:500], []
            if resp.status == 404 and guest is not None:
                raise CliError(EXIT_NOT_FOUND, f"kvmdm: guest {guest!r} not found")
            detail = "".join(f"\n  - {x}" for x in extra) if len(extra) > 1 else ""
            raise CliError(EXIT_API, f"kvmdm: error {resp.status}: {msg}{detail}")
        return data, ctype

    def json(self, method: str, path: str, body: Any = None, *, guest: str | None = None) -> Any:
        data, _ = self.call(method, path, body, guest=guest)
        return json.loads(data)


# ------------------------------------------------------------------------------------------------- rendering


def _fmt_uptime(v: float | None) -> str:
    if v is None:
        return "-"
    v = int(v)
    return f"{v // 86400}d{v % 86400 // 3600:02d}h" if v >= 86400 else f"{v // 3600}:{v % 3600 // 60:02d}:{v % 60:02d}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def guest_rows(guests: list[dict[str, Any]]) -> str:
    rows = []
    for g in guests:
        d = g.get("definition", {})
        rows.append([g["name"], g["state"], str(g["dm_pid"] or "-"), _fmt_uptime(g["uptime_s"]),
                     str(g["restarts"]), str(d.get("vcpus", "")) if d else "",
                     str(d.get("memory_mib", "")) if d else "", g["last_exit_reason"] or ""])
    return table(rows, ["NAME", "STATE", "PID", "UPTIME", "RESTARTS", "VCPUS", "MEM_MIB", "LAST EXIT"])


# --------------------------------------------------------------------------------------------------- commands


def _out(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=2) if args.json else human)


def cmd_list(c: Client, a: argparse.Namespace) -> int:
    data = c.json("GET", "/v1/guests")
    _out(a, data, guest_rows(data["guests"]) if data["guests"] else "no guests defined")
    return EXIT_OK


def cmd_create(c: Client, a: argparse.Namespace) -> int:
    from daemon.config import ConfigError, load_definition_file

    try:
        raw = load_definition_file(a.file)
    except OSError as e:
        raise CliError(EXIT_USAGE, f"kvmdm: cannot read {a.file}: {e.strerror}") from None
    except ConfigError as e:
        raise CliError(EXIT_USAGE, f"kvmdm: {e}") from None
    data = c.json("POST", "/v1/guests", raw)
    _out(a, data, f"created guest {data['name']}")
    return EXIT_OK


def _action(name: str, verb: str) -> Any:
    def run(c: Client, a: argparse.Namespace) -> int:
        path = f"/v1/guests/{a.name}/{name}"
        if name == "stop" and a.timeout is not None:
            path += f"?timeout={a.timeout}"
        data = c.json("POST", path, guest=a.name)
        _out(a, data, f"{a.name}: {verb} (state {data['state']})")
        return EXIT_OK

    return run


def cmd_destroy(c: Client, a: argparse.Namespace) -> int:
    data = c.json("DELETE", f"/v1/guests/{a.name}", guest=a.name)
    _out(a, data, f"{a.name}: destroyed")
    return EXIT_OK


def cmd_show(c: Client, a: argparse.Namespace) -> int:
    data = c.json("GET", f"/v1/guests/{a.name}", guest=a.name)
    _out(a, data, guest_rows([data]) + "\n\n" + json.dumps(data["definition"], indent=2))
    return EXIT_OK


def cmd_console(c: Client, a: argparse.Namespace) -> int:
    if a.input is not None:
        data = c.json("POST", f"/v1/guests/{a.name}/console", {"text": a.input}, guest=a.name)
        _out(a, data, f"{a.name}: wrote {data['written']} bytes")
        return EXIT_OK
    q = f"?tail={a.tail}"
    if not a.follow:
        body, _ = c.call("GET", f"/v1/guests/{a.name}/console{q}", guest=a.name)
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        return EXIT_OK
    c.timeout = None  # a follow stream is idle for as long as the guest is quiet
    resp = c.open("GET", f"/v1/guests/{a.name}/console/stream{q}")
    if resp.status == 404:
        raise CliError(EXIT_NOT_FOUND, f"kvmdm: guest {a.name!r} not found")
    if resp.status >= 400:
        raise CliError(EXIT_API, f"kvmdm: error {resp.status}: {resp.read()[:500].decode('utf-8', 'replace')}")
    try:
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def cmd_logs(c: Client, a: argparse.Namespace) -> int:
    data = c.json("GET", f"/v1/guests/{a.name}/events", guest=a.name)
    lines = [f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))}  {e['event']}"
             for e in data["events"]]
    _out(a, data, "\n".join(lines) if lines else f"{a.name}: no events")
    return EXIT_OK


def cmd_health(c: Client, a: argparse.Namespace) -> int:
    data = c.json("GET", "/health")
    human = f"daemon: {data['status']} (pid {data['pid']}, version {data['version']}, " \
            f"up {_fmt_uptime(data['uptime_s'])})"
    if data["guests"]:
        human += "\n" + guest_rows(data["guests"])
    for e in data["store_errors"]:
        human += f"\nWARNING: skipped corrupt definition {e['path']}: {e['error']}"
    _out(a, data, human)
    return EXIT_OK


def cmd_metrics(c: Client, a: argparse.Namespace) -> int:
    body, _ = c.call("GET", "/metrics")
    sys.stdout.write(body.decode("utf-8", "replace"))
    return EXIT_OK


def cmd_stats(c: Client, a: argparse.Namespace) -> int:
    data = c.json("GET", f"/v1/guests/{a.name}/stats", guest=a.name)
    rows = [[k, str(v)] for k, v in sorted(data["exits"].items())]
    human = f"{a.name}: {data['state']}, up {_fmt_uptime(data['uptime_s'])}, rss {data['rss_bytes']} bytes\n"
    human += table(rows, ["EXIT", "COUNT"]) if rows else "no exits"
    _out(a, data, human)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS, help=f"daemon socket (default {DEFAULT_SOCKET}, "
                                                                   "or $KVMDM_SOCKET)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    p = _Parser(prog="kvmdm", description="Control the kvmdmd daemon", parents=[common])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, fn: Any, help_: str, with_name: bool = True) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, parents=[common])
        if with_name:
            sp.add_argument("name")
        sp.set_defaults(fn=fn)
        return sp

    add("list", cmd_list, "list guests", with_name=False)
    sp = add("create", cmd_create, "define a guest from FILE.json or FILE.toml", with_name=False)
    sp.add_argument("file")
    add("show", cmd_show, "show one guest")
    for action, verb, help_ in (("start", "started", "start the guest's DM"),
                                ("stop", "stopped", "stop gracefully (SIGKILL after --timeout)"),
                                ("kill", "killed", "SIGKILL the DM"), ("pause", "paused", "pause the guest"),
                                ("resume", "resumed", "resume the guest"), ("reset", "reset", "reset the guest")):
        sp = add(action, _action(action, verb), help_)
        if action == "stop":
            sp.add_argument("--timeout", type=float, help="seconds before SIGKILL (default 10)")
    add("destroy", cmd_destroy, "kill the DM if running and delete the guest")
    sp = add("console", cmd_console, "print the console log (--follow to stream it)")
    sp.add_argument("--follow", "-f", action="store_true")
    sp.add_argument("--tail", type=int, default=65536, help="bytes from the end (default 65536)")
    sp.add_argument("--input", help="send this text to the guest's console instead")
    add("logs", cmd_logs, "the guest's lifecycle events (spawns, exits, restarts)")
    add("stats", cmd_stats, "the DM's statistics")
    add("health", cmd_health, "daemon and guest health", with_name=False)
    add("metrics", cmd_metrics, "Prometheus metrics", with_name=False)
    sp = sub.add_parser("run", help="run a guest definition (or --kernel/--demo) in the foreground without the "
                                    "daemon, disks and nics included (see kvmdm run -h)",
                        add_help=False)
    sp.set_defaults(fn=None)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run` delegates everything after it to the one-shot runner (written elsewhere; imported lazily).
    if argv and argv[0] == "run":
        try:
            from daemon.runner import main as run_main
        except ImportError as e:
            print(f"kvmdm: run is not available: {e}", file=sys.stderr)
            return EXIT_API
        return int(run_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    c = Client(getattr(args, "socket", DEFAULT_SOCKET))
    try:
        return int(args.fn(c, args))
    except CliError as e:
        print(str(e), file=sys.stderr)
        return e.code
    except BrokenPipeError:
        return EXIT_OK
    except (KeyError, ValueError) as e:
        print(f"kvmdm: unexpected answer from the daemon: {e}", file=sys.stderr)
        return EXIT_API


if __name__ == "__main__":
    sys.exit(main())

