"""Tap devices and bridges for guest NICs, created and owned by the daemon (pyroute2 + /dev/net/tun).

The daemon (root, CAP_NET_ADMIN) creates one tap per NIC and passes the DM only the attached fd (pass fds, not
paths: the jailed DM has no /dev/net/tun and no CAP_NET_ADMIN). The tap is opened with
IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and a 12-byte vnet header (pv.net's contract), optionally enslaved to a bridge
which is created if missing, and brought up.

Ownership: every link we create carries an ``IFLA_IFALIAS`` of ``kvmdm:tap:<guest>`` or ``kvmdm:bridge``, so
cleanup removes only what we created (also after a daemon restart), never an operator's tap or bridge. By default
taps are *not* persistent: the kernel deletes one when its last fd closes, i.e. when the DM exits, so a crash of
daemon and DM together still leaves nothing behind; :func:`remove_tap` and :func:`cleanup` cover persistent taps
and bridges.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pv import tap

log = logging.getLogger(__name__)

ALIAS_PREFIX = "kvmdm:"
TAP_ALIAS = ALIAS_PREFIX + "tap:"
BRIDGE_ALIAS = ALIAS_PREFIX + "bridge"
TAP_PREFIX = "kvmdm-"
VNET_HDR_SIZE = 12  # pv.net.NET_HDR_SIZE (kept literal: daemon must not need pv.net's device code to start)
MAX_IFNAME = tap.IFNAMSIZ - 1


class NetError(Exception):
    """Creating or removing a tap/bridge failed (host or configuration error; the guest is not involved)."""


def tap_name(guest: str, index: int) -> str:
    """``kvmdm-<guest>-<n>``, at most 15 characters. A long guest name is cut and a 4-hex-digit hash of the
    full name keeps guests that share a prefix apart (``kvmdm-webserv1a2b-0``... shortened to fit)."""
    suffix = f"-{index}"
    full = f"{TAP_PREFIX}{guest}{suffix}"
    if len(full) <= MAX_IFNAME:
        return full
    h = hashlib.sha1(guest.encode()).hexdigest()[:4]
    room = MAX_IFNAME - len(TAP_PREFIX) - len(suffix) - len(h)
    if room < 0:
        raise ValueError(f"nic index {index} too large for an interface name")
    return f"{TAP_PREFIX}{guest[:room]}{h}{suffix}"


@contextlib.contextmanager
def _ipr() -> Iterator[IPRoute]:
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _lookup(ipr: IPRoute, name: str) -> int | None:
    idx = ipr.link_lookup(ifname=name)
    return int(idx[0]) if idx else None


def _alias(ipr: IPRoute, index: int) -> str:
    links = ipr.get_links(index)
    return str(links[0].get_attr("IFLA_IFALIAS") or "") if links else ""


def _kind(ipr: IPRoute, index: int) -> str:
    links = ipr.get_links(index)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    return str(info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""


def _ensure_bridge(ipr: IPRoute, name: str) -> int:
    """Index of bridge ``name``, creating it (marked ours) if missing."""
    tap._check_name(name)
    idx = _lookup(ipr, name)
    if idx is None:
        try:
            ipr.link("add", ifname=name, kind="bridge")
        except NetlinkError as e:
            if e.code != errno.EEXIST:  # another guest's start created it just now: use it
                raise NetError(f"cannot create bridge {name}: {e}") from None
        else:
            idx = _lookup(ipr, name)
            if idx is not None:
                ipr.link("set", index=idx, ifalias=BRIDGE_ALIAS)
                log.info("created bridge %s", name)
        idx = _lookup(ipr, name)
        if idx is None:
            raise NetError(f"bridge {name} vanished while being created")
    elif _kind(ipr, idx) != "bridge":
        raise NetError(f"{name} exists and is not a bridge")
    ipr.link("set", index=idx, state="up")
    return idx


def create_tap(
    name: str | None,
    *,
    bridge: str | None,
    owner_uid: int | None,
    guest: str | None = None,
    index: int = 0,
    persist: bool = False,
) -> tuple[str, int]:
    """Create (or attach to an existing) tap for a guest NIC; returns ``(ifname, fd)``.

    ``name`` None: ``tap_name(guest, index)`` (or a kernel-chosen ``kvmdm%d`` without a guest). The fd is
    non-blocking, close-on-exec, IFF_VNET_HDR with a 12-byte header. A tap that already existed is used as is
    and never marked ours (so never removed by us). Raises NetError (or ValueError for a bad name).
    """
    if name is None:
        name = tap_name(guest, index) if guest else "kvmdm%d"
    with _ipr() as ipr:
        existed = "%" not in name and _lookup(ipr, name) is not None
        try:
            ifname, fd = tap.open_tap(name, vnet_hdr=True)
        except OSError as e:
            why = "exists and is not a tap" if existed and e.errno in (errno.EINVAL, errno.EBUSY) else e.strerror
            raise NetError(f"cannot open tap {name}: {why}") from None
        try:
            tap.set_vnet_hdr_size(fd, VNET_HDR_SIZE)
            if owner_uid is not None:
                tap.set_owner(fd, owner_uid)
            if persist:
                tap.set_persist(fd, True)
            idx = _lookup(ipr, ifname)
            if idx is None:
                raise NetError(f"tap {ifname} not found after creation")
            if not existed:
                ipr.link("set", index=idx, ifalias=f"{TAP_ALIAS}{guest or ''}")
            if bridge is not None:
                ipr.link("set", index=idx, master=_ensure_bridge(ipr, bridge))
            ipr.link("set", index=idx, state="up")
        except (OSError, NetlinkError, NetError) as e:
            if not existed:
                with contextlib.suppress(OSError):
                    tap.set_persist(fd, False)  # the close below then deletes the link
            os.close(fd)
            if isinstance(e, NetError):
                raise
            raise NetError(f"cannot set up tap {ifname}: {e}") from None
    log.info("tap %s ready (bridge %s, %s)", ifname, bridge, "pre-existing" if existed else "created")
    return ifname, fd


def remove_tap(name: str) -> bool:
    """Delete tap ``name`` if it exists and we created it; True if a link was deleted. Idempotent."""
    with _ipr() as ipr:
        idx = _lookup(ipr, name)
        if idx is None or not _alias(ipr, idx).startswith(TAP_ALIAS):
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False  # its last fd closed meanwhile
            raise NetError(f"cannot remove tap {name}: {e}") from None
    log.info("removed tap %s", name)
    return True


def release_bridge(name: str) -> bool:
    """Delete bridge ``name`` if we created it and no port is left on it; True if deleted."""
    with _ipr() as ipr:
        idx = _lookup(ipr, name)
        if idx is None or _alias(ipr, idx) != BRIDGE_ALIAS:
            return False
        if any(link.get_attr("IFLA_MASTER") == idx for link in ipr.get_links()):
            return False
        try:
            ipr.link("del", index=idx)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise NetError(f"cannot remove bridge {name}: {e}") from None
    log.info("removed bridge %s", name)
    return True


def cleanup(guest: str | None = None) -> list[str]:
    """Remove our taps (only ``guest``'s if given); without ``guest`` also our bridges left without ports (a
    daemon-wide sweep). Returns the removed names."""
    removed: list[str] = []
    want = f"{TAP_ALIAS}{guest}" if guest is not None else None
    with _ipr() as ipr:
        links = [(str(link.get_attr("IFLA_IFNAME")), _alias_of(link)) for link in ipr.get_links()]
    for ifname, alias in links:
        if alias.startswith(TAP_ALIAS) and (want is None or alias == want) and remove_tap(ifname):
            removed.append(ifname)
    if guest is not None:
        return removed  # a guest's bridges are released by name (release_bridge), never swept here
    for ifname, alias in links:
        if alias == BRIDGE_ALIAS and release_bridge(ifname):
            removed.append(ifname)
    return removed


def _alias_of(link: object) -> str:
    return str(link.get_attr("IFLA_IFALIAS") or "")  # type: ignore[attr-defined]
