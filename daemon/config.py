"""Guest definitions: the documented schema, hand-written validation, and JSON/TOML loading.

This module is the one validating layer for operator input (conventions §6): after
:func:`parse_definition` everything in a :class:`GuestDefinition` has the right type and range. The DM imports it
too (it re-validates the definition it receives on ``--definition-fd`` with ``check_paths=False``), so it must
stay stdlib-only: no pydantic, no aiohttp.

Schema (every key optional unless marked; unknown keys are errors that name the key)::

    name         str, required, [a-z0-9][a-z0-9_-]{0,62}
    vcpus        int 1..32                      (default 1)
    memory_mib   int 16..65536                  (default 128)
    kernel       str, required unless firmware: absolute path, or "demo" (the embedded demo guest,
                 kvmcore.util.guest_build.build_demo())
    firmware     "seabios" (Debian's /usr/share/seabios/bios-256k.bin) | absolute path to a BIOS image | null:
                 boot the PC from its reset vector through that BIOS instead of loading a kernel; excludes
                 kernel, initrd and cmdline. The image is checked (size, reset vector) when paths are checked
    boot_order   list of "diskN" | "nicN" (firmware only; default: every disk in order): the BIOS's boot order
    nic_rom      "ipxe" (Debian's ipxe-qemu efi-virtio.rom) | absolute path | null (firmware only): the option ROM
                 the BIOS runs for every virtio-net nic (network boot)
    initrd       str | null: absolute path      (default null)
    cmdline      str, at most 4096 UTF-8 bytes, no NUL (default "")
    disks        list (at most 16) of {path (required, absolute), read_only bool (false),
                 serial str <= 20 printable ASCII bytes (""), backend "inline" | "vhost-user" ("inline")}
                 vhost-user: a path to a regular file (or block device) gets a daemon-managed back-end process
                 (kvmdm-backend blk, supervised and restarted by the daemon); a path to a unix socket is an
                 external back-end listening there (e.g. qemu-storage-daemon), only connected to
    nics         list (at most 8) of {mac "52:54:00:xx:xx:xx" unicast (generated if absent),
                 tap str <= 15 chars | null (auto), bridge str <= 15 chars | null, backend "inline" | "vhost-user"}
                 vhost-user: a daemon-managed kvmdm-backend net process on the tap the daemon creates
    restart      "never" | "on-failure" | "always"  (default "on-failure")
    max_restarts int 0..1000                    (default 5) restarts allowed within restart_window_s
    restart_window_s int 1..86400               (default 60)
    jail         {enabled: bool (true)}
    rng          bool (false): a virtio-rng device (pv.rng.Rng, getrandom) after the disks and nics
    console2     bool (false): a virtio-console (pv.console.Console, the guest's hvc0) after rng; its output goes
                 to the same console log as COM1, every line prefixed with "[hvc0] "
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
# Linux IFNAMSIZ is 16 including the NUL; '/' and whitespace are refused by dev_valid_name() (net/core/dev.c).
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
SERIAL_RE = re.compile(r"[\x20-\x7e]{0,20}")  # virtio-blk GET_ID returns at most 20 bytes (virtio 1.2 §5.2.6)

VCPUS_RANGE = (1, 32)
MEMORY_RANGE = (16, 65536)
MAX_CMDLINE = 4096
MAX_DISKS = 16
MAX_NICS = 8
MAX_PATH = 4096
MAX_RESTARTS_RANGE = (0, 1000)
RESTART_WINDOW_RANGE = (1, 86400)
RESTART_POLICIES = ("never", "on-failure", "always")
BACKENDS = ("inline", "vhost-user")
DEMO_KERNEL = "demo"


class ConfigError(ValueError):
    """The guest definition is invalid; ``errors`` lists every problem as "field.path: message"."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class DiskConfig:
    path: str
    read_only: bool = False
    serial: str = ""
    backend: str = "inline"


@dataclass(frozen=True)
class NicConfig:
    mac: str
    tap: str | None = None
    bridge: str | None = None
    backend: str = "inline"


@dataclass(frozen=True)
class JailConfig:
    enabled: bool = True


@dataclass(frozen=True)
class GuestDefinition:
    name: str
    kernel: str
    vcpus: int = 1
    memory_mib: int = 128
    initrd: str | None = None
    cmdline: str = ""
    disks: tuple[DiskConfig, ...] = ()
    nics: tuple[NicConfig, ...] = ()
    restart: str = "on-failure"
    max_restarts: int = 5
    restart_window_s: int = 60
    jail: JailConfig = field(default_factory=JailConfig)
    rng: bool = False
    console2: bool = False
    firmware: str | None = None  # "seabios" or a path; kernel is "" then
    boot_order: tuple[str, ...] = ()
    nic_rom: str | None = None  # "ipxe" or a path (firmware only)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["disks"] = [asdict(x) for x in self.disks]
        d["nics"] = [asdict(x) for x in self.nics]
        d["boot_order"] = list(self.boot_order)
        if self.firmware is not None:
            del d["kernel"], d["initrd"], d["cmdline"]  # a firmware guest has none; parse_definition refuses them
        else:
            del d["firmware"], d["boot_order"], d["nic_rom"]  # a kernel guest's dict stays as it always was
        return d

    def boot_devices(self) -> tuple[tuple[str, int], ...]:
        """The boot order as (kind "disk" | "net", index into the virtio devices in attach order: disks, then
        nics): what daemon.vmm.MachineConfig.boot_order takes. Default: every disk in order."""
        order = self.boot_order or tuple(f"disk{i}" for i in range(len(self.disks)))
        out = []
        for entry in order:
            m = BOOT_DEVICE_RE.fullmatch(entry)
            assert m is not None  # parse_definition checked it
            i = int(m.group(2))
            out.append(("disk", i) if m.group(1) == "disk" else ("net", len(self.disks) + i))
        return tuple(out)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def generate_mac() -> str:
    """A random locally-administered-by-convention QEMU-range MAC (52:54:00 is QEMU's OUI prefix)."""
    import secrets  # lazy: the DM imports this module and never generates a MAC (startup time, bench/daemon.py)

    b = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{x:02x}" for x in b)


class _Checker:
    """Collects every error so an operator fixes a definition in one round trip."""

    def __init__(self, check_paths: bool) -> None:
        self.errors: list[str] = []
        self.check_paths = check_paths

    def err(self, path: str, msg: str) -> None:
        self.errors.append(f"{path}: {msg}")

    def obj(self, path: str, value: Any, allowed: set[str], required: set[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.err(path or "definition", f"must be an object, got {_tname(value)}")
            return None
        for k in value:
            if not isinstance(k, str) or k not in allowed:
                self.err(_join(path, str(k)), "unknown key")
        for k in sorted(required - value.keys()):
            self.err(_join(path, k), "is required")
        return value

    def integer(self, path: str, value: Any, lo: int, hi: int) -> int | None:
        # bool is an int subclass in Python; true/false are not numbers in a definition.
        if not isinstance(value, int) or isinstance(value, bool):
            self.err(path, f"must be an integer, got {_tname(value)}")
            return None
        if not lo <= value <= hi:
            self.err(path, f"must be between {lo} and {hi}, got {value}")
            return None
        return value

    def boolean(self, path: str, value: Any) -> bool | None:
        if not isinstance(value, bool):
            self.err(path, f"must be a boolean, got {_tname(value)}")
            return None
        return value

    def string(self, path: str, value: Any, *, max_bytes: int, pattern: re.Pattern[str] | None = None,
               what: str = "") -> str | None:
        if not isinstance(value, str):
            self.err(path, f"must be a string, got {_tname(value)}")
            return None
        if "\x00" in value:
            self.err(path, "must not contain NUL characters")
            return None
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            self.err(path, "must be valid UTF-8 (lone surrogates are not)")
            return None
        if n > max_bytes:
            self.err(path, f"must be at most {max_bytes} bytes, got {n}")
            return None
        if pattern is not None and not pattern.fullmatch(value):
            self.err(path, f"must be {what or 'of the form ' + pattern.pattern}, got {value!r}")
            return None
        return value

    def choice(self, path: str, value: Any, choices: tuple[str, ...]) -> str | None:
        if not isinstance(value, str) or value not in choices:
            self.err(path, f"must be one of {', '.join(choices)}, got {value!r}")
            return None
        return value

    def file_path(self, path: str, value: Any, *, kind: str = "file") -> str | None:
        s = self.string(path, value, max_bytes=MAX_PATH)
        if s is None:
            return None
        if not s.startswith("/"):
            self.err(path, f"must be an absolute path, got {s!r}")
            return None
        if not self.check_paths:
            return s
        try:
            st = os.stat(s)
        except FileNotFoundError:
            self.err(path, "file does not exist")
            return None
        except (OSError, ValueError) as e:
            self.err(path, f"cannot be accessed: {e}")
            return None
        if kind == "file" and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            self.err(path, "must be a regular file or a block device")
            return None
        if kind == "socket" and not stat.S_ISSOCK(st.st_mode):
            self.err(path, "must be a unix socket (vhost-user backend)")
            return None
        if kind == "file-or-socket" and not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
                                             or stat.S_ISSOCK(st.st_mode)):
            self.err(path, "must be an image (regular file or block device, served by a daemon-managed "
                           "back-end) or the unix socket of an external vhost-user back-end")
            return None
        return s


def _tname(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TOP_KEYS = {"name", "vcpus", "memory_mib", "kernel", "initrd", "cmdline", "disks", "nics", "restart",
             "max_restarts", "restart_window_s", "jail", "rng", "console2", "firmware", "boot_order",
             "nic_rom"}
IPXE = "ipxe"
SEABIOS = "seabios"
BOOT_DEVICE_RE = re.compile(r"(disk|nic)(0|[1-9][0-9]?)")
_DISK_KEYS = {"path", "read_only", "serial", "backend"}
_NIC_KEYS = {"mac", "tap", "bridge", "backend"}
_JAIL_KEYS = {"enabled"}


def parse_definition(raw: Any, *, check_paths: bool = True) -> GuestDefinition:
    """Validate a decoded JSON/TOML document; raise :class:`ConfigError` listing every problem.

    ``check_paths`` stats kernel/initrd/disk paths (the daemon does; the jailed DM cannot and does not).
    """
    c = _Checker(check_paths)
    top = c.obj("", raw, _TOP_KEYS, {"name"})
    if top is None:
        raise ConfigError(c.errors)

    def opt(key: str, default: Any, fn: Callable[[str, Any], Any]) -> Any:
        if key not in top:
            return default
        return fn(key, top[key])

    name = opt("name", None, lambda p, v: c.string(p, v, max_bytes=63, pattern=NAME_RE,
                                                   what="1-63 chars of [a-z0-9_-] starting with [a-z0-9]"))
    vcpus = opt("vcpus", 1, lambda p, v: c.integer(p, v, *VCPUS_RANGE))
    memory = opt("memory_mib", 128, lambda p, v: c.integer(p, v, *MEMORY_RANGE))

    kernel = None
    firmware = None
    if top.get("firmware") is not None:
        firmware = _firmware(c, top["firmware"])
        for key in ("kernel", "initrd", "cmdline"):
            if key in top:
                c.err(key, "cannot be combined with firmware (the BIOS boots the disks)")
        kernel = "" if firmware is not None else None
    elif "kernel" in top:
        if top["kernel"] == DEMO_KERNEL:
            kernel = DEMO_KERNEL
        else:
            kernel = c.file_path("kernel", top["kernel"])
    else:
        c.err("kernel", "is required (or firmware)")
    initrd = opt("initrd", None, lambda p, v: None if v is None else c.file_path(p, v))
    cmdline = opt("cmdline", "", lambda p, v: c.string(p, v, max_bytes=MAX_CMDLINE))
    restart = opt("restart", "on-failure", lambda p, v: c.choice(p, v, RESTART_POLICIES))
    max_restarts = opt("max_restarts", 5, lambda p, v: c.integer(p, v, *MAX_RESTARTS_RANGE))
    window = opt("restart_window_s", 60, lambda p, v: c.integer(p, v, *RESTART_WINDOW_RANGE))
    rng = opt("rng", False, c.boolean)
    console2 = opt("console2", False, c.boolean)

    jail = JailConfig()
    if "jail" in top:
        j = c.obj("jail", top["jail"], _JAIL_KEYS, set())
        if j is not None and "enabled" in j:
            en = c.boolean("jail.enabled", j["enabled"])
            jail = JailConfig(enabled=en if en is not None else True)

    disks: list[DiskConfig] = []
    raw_disks = top.get("disks", [])
    if not isinstance(raw_disks, list):
        c.err("disks", f"must be an array, got {_tname(raw_disks)}")
    elif len(raw_disks) > MAX_DISKS:
        c.err("disks", f"at most {MAX_DISKS} disks, got {len(raw_disks)}")
    else:
        for i, rd in enumerate(raw_disks):
            p = f"disks[{i}]"
            d = c.obj(p, rd, _DISK_KEYS, {"path"})
            if d is None:
                continue
            backend = c.choice(f"{p}.backend", d.get("backend", "inline"), BACKENDS)
            dpath = None
            if "path" in d:
                # vhost-user: a socket (external back-end) or an image (daemon-managed back-end, daemon.backends)
                dpath = c.file_path(f"{p}.path", d["path"], kind="file-or-socket" if backend == "vhost-user" else "file")
            ro = c.boolean(f"{p}.read_only", d.get("read_only", False))
            serial = c.string(f"{p}.serial", d.get("serial", ""), max_bytes=20, pattern=SERIAL_RE,
                              what="at most 20 printable ASCII characters")
            if None not in (dpath, ro, serial, backend):
                disks.append(DiskConfig(path=dpath, read_only=ro, serial=serial, backend=backend))  # type: ignore[arg-type]

    nics: list[NicConfig] = []
    raw_nics = top.get("nics", [])
    if not isinstance(raw_nics, list):
        c.err("nics", f"must be an array, got {_tname(raw_nics)}")
    elif len(raw_nics) > MAX_NICS:
        c.err("nics", f"at most {MAX_NICS} nics, got {len(raw_nics)}")
    else:
        seen_macs: set[str] = set()
        for i, rn in enumerate(raw_nics):
            p = f"nics[{i}]"
            n = c.obj(p, rn, _NIC_KEYS, set())
            if n is None:
                continue
            mac: str | None
            if "mac" in n:
                mac = c.string(f"{p}.mac", n["mac"], max_bytes=17, pattern=MAC_RE,
                               what="six lower-case hex octets separated by ':'")
                # Bit 0 of the first octet is the multicast bit (IEEE 802-2014 §8.2); a NIC needs unicast.
                if mac is not None and int(mac[:2], 16) & 1:
                    c.err(f"{p}.mac", f"must be a unicast address, got {mac!r}")
                    mac = None
                elif mac == "00:00:00:00:00:00":
                    c.err(f"{p}.mac", "must not be all zeros")
                    mac = None
            else:
                mac = generate_mac()
            if mac is not None and mac in seen_macs:
                c.err(f"{p}.mac", f"duplicate MAC {mac}")
            if mac is not None:
                seen_macs.add(mac)
            tap = n.get("tap")
            if tap is not None:
                tap = c.string(f"{p}.tap", tap, max_bytes=15, pattern=IFNAME_RE,
                               what="an interface name of 1-15 chars [A-Za-z0-9_.-]") or ""
            bridge = n.get("bridge")
            if bridge is not None:
                bridge = c.string(f"{p}.bridge", bridge, max_bytes=15, pattern=IFNAME_RE,
                                  what="an interface name of 1-15 chars [A-Za-z0-9_.-]") or ""
            backend = c.choice(f"{p}.backend", n.get("backend", "inline"), BACKENDS)
            if mac is not None and tap != "" and bridge != "" and backend is not None:
                nics.append(NicConfig(mac=mac, tap=tap, bridge=bridge, backend=backend))

    boot_order = _boot_order(c, top.get("boot_order"), firmware is not None, len(disks), len(nics))
    nic_rom = _nic_rom(c, top.get("nic_rom"), firmware is not None)
    if c.errors or name is None or kernel is None:
        raise ConfigError(c.errors or ["definition: invalid"])
    return GuestDefinition(
        name=name, kernel=kernel, vcpus=vcpus, memory_mib=memory, initrd=initrd, cmdline=cmdline,
        disks=tuple(disks), nics=tuple(nics), restart=restart, max_restarts=max_restarts,
        restart_window_s=window, jail=jail, rng=bool(rng), console2=bool(console2),
        firmware=firmware, boot_order=boot_order, nic_rom=nic_rom,
    )


def firmware_file(choice: str) -> str:
    """The image a definition's ``firmware`` names: "seabios" is Debian's, anything else a path."""
    from kvmcore.firmware import firmware_path

    return firmware_path(choice)


def _firmware(c: _Checker, value: Any) -> str | None:
    path: str | None = firmware_file(SEABIOS) if value == SEABIOS else c.file_path("firmware", value)
    if path is None:
        return None
    if c.check_paths:
        from kvmcore.firmware import FirmwareError, load_bios

        try:
            load_bios(path)
        except FirmwareError as e:
            c.err("firmware", str(e))
            return None
    return SEABIOS if value == SEABIOS else path


def nic_rom_file(choice: str) -> str:
    from kvmcore.firmware import nic_rom_path

    return nic_rom_path(choice)


def _nic_rom(c: _Checker, value: Any, firmware: bool) -> str | None:
    if value is None:
        return None
    if not firmware:
        c.err("nic_rom", "only applies with firmware")
        return None
    path = nic_rom_file(IPXE) if value == IPXE else c.file_path("nic_rom", value)
    if path is None:
        return None
    if c.check_paths:
        from kvmcore.firmware import FirmwareError, load_option_rom

        try:
            load_option_rom(path)
        except FirmwareError as e:
            c.err("nic_rom", str(e))
            return None
    return IPXE if value == IPXE else path


def _boot_order(c: _Checker, value: Any, firmware: bool, ndisks: int, nnics: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if not firmware:
        c.err("boot_order", "only applies with firmware")
        return ()
    if not isinstance(value, list) or len(value) > MAX_DISKS + MAX_NICS:
        c.err("boot_order", f"must be an array of at most {MAX_DISKS + MAX_NICS} device names")
        return ()
    out: list[str] = []
    for i, entry in enumerate(value):
        p = f"boot_order[{i}]"
        m = BOOT_DEVICE_RE.fullmatch(entry) if isinstance(entry, str) else None
        if m is None:
            c.err(p, f'must be "diskN" or "nicN", got {entry!r}')
            continue
        count = ndisks if m.group(1) == "disk" else nnics
        if int(m.group(2)) >= count:
            c.err(p, f"{entry} does not exist ({count} {m.group(1)}s defined)")
        elif entry in out:
            c.err(p, f"{entry} is listed twice")
        else:
            out.append(entry)
    return tuple(out)


def parse_definition_json(text: str | bytes, *, check_paths: bool = True) -> GuestDefinition:
    """Decode JSON then validate; JSON syntax errors become a :class:`ConfigError` too."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError([f"definition: invalid JSON: {e}"]) from None
    return parse_definition(raw, check_paths=check_paths)


def load_definition_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read FILE.json or FILE.toml into a raw document (not yet validated); relative image paths are made
    absolute against the file's directory, which is what an operator writing ``kernel = "vmlinuz"`` means."""
    p = Path(path)
    data = p.read_bytes()
    raw: Any
    try:
        if p.suffix == ".toml":
            import tomllib  # lazy, like secrets above: only the CLI and daemon read definition files

            raw = tomllib.loads(data.decode("utf-8"))
        else:
            raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError([f"{p}: cannot parse: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{p}: top level must be an object/table"])
    return absolutize_paths(raw, p.resolve().parent)


def absolutize_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Return a copy of ``raw`` with relative kernel/initrd/disk paths joined to ``base`` (lenient: the
    validator reports type errors later)."""
    out = dict(raw)

    def fix(v: Any) -> Any:
        if isinstance(v, str) and v and not v.startswith("/") and "\x00" not in v:
            return str(base / v)
        return v

    if "kernel" in out and out["kernel"] != DEMO_KERNEL:
        out["kernel"] = fix(out["kernel"])
    if "initrd" in out:
        out["initrd"] = fix(out["initrd"])
    if "firmware" in out and out["firmware"] != SEABIOS:
        out["firmware"] = fix(out["firmware"])
    if "nic_rom" in out and out["nic_rom"] != IPXE:
        out["nic_rom"] = fix(out["nic_rom"])
    if isinstance(out.get("disks"), list):
        out["disks"] = [
            {**d, "path": fix(d["path"])} if isinstance(d, dict) and "path" in d else d for d in out["disks"]
        ]
    return out
