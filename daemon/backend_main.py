"""``kvmdm-backend``: a vhost-user back-end process holding one disk image or one tap, jailed.

    kvmdm-backend blk --socket PATH --image FILE [--readonly] [--num-queues N] [--queue-size N]
    kvmdm-backend net --socket PATH --tap NAME

Order (crosvm/Firecracker: acquire every resource, then drop every privilege): bind the listening socket and
open the image or tap while still privileged, then :func:`daemon.jail.enter_jail` with the ``backend`` seccomp
policy keeping only those fds (plus stdio), then serve front-ends one at a time forever. ``--no-jail`` skips
the jail for development. Follows QEMU's "Backend program conventions": no daemonising, stdio kept, exit on
SIGTERM, exit status != 0 when initialisation fails.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from daemon import jail
from pv.blk import Block
from pv.device import VirtioDevice
from pv.vhost_user.backend import DEFAULT_MAX_MEMORY, VhostUserServer, bind_listener

log = logging.getLogger("kvmdm-backend")

NOBODY = 65534


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmdm-backend", description="kvmdm vhost-user back-end (blk or net)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", required=True, help="path of the vhost-user unix socket to listen on")
    common.add_argument("--no-jail", action="store_true", help="do not jail the process (development only)")
    common.add_argument("--jail-root", type=Path, help="empty root-owned directory for the jail's root")
    common.add_argument("--uid", type=int, default=NOBODY, help="uid inside the jail (default 65534)")
    common.add_argument("--gid", type=int, default=NOBODY, help="gid inside the jail (default 65534)")
    common.add_argument("--max-memory", type=int, default=DEFAULT_MAX_MEMORY,
                        help="largest guest memory table accepted, bytes")
    common.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="kind", required=True)
    blk = sub.add_parser("blk", parents=[common], help="virtio-blk over a raw image")
    blk.add_argument("--image", required=True, type=Path)
    blk.add_argument("--readonly", action="store_true")
    blk.add_argument("--num-queues", type=int, default=1)
    blk.add_argument("--queue-size", type=int, default=256)
    blk.add_argument("--serial", default="")
    net = sub.add_parser("net", parents=[common], help="virtio-net over a tap device")
    net.add_argument("--tap", required=True, help="tap interface to attach to (created if missing)")
    net.add_argument("--mac", help="guest MAC address (default: random 52:54:00:xx:xx:xx)")
    net.add_argument("--queue-size", type=int, default=256)
    net.add_argument("--engine", choices=("c", "python"),
                     help="per-frame loop: C (default when it builds) or the Python reference")
    return p


def _open_blk(args: argparse.Namespace) -> tuple[VirtioDevice, list[int]]:
    flags = (os.O_RDONLY if args.readonly else os.O_RDWR) | os.O_CLOEXEC
    fd = os.open(args.image, flags)
    try:
        dev = Block(fd, read_only=args.readonly, serial=args.serial, num_queues=args.num_queues,
                    queue_size=args.queue_size)
    except BaseException:
        os.close(fd)
        raise
    return dev, [fd]


def _parse_mac(text: str | None) -> bytes:
    if text is None:
        # Locally administered unicast (bit 1 of the first octet set, bit 0 clear), like QEMU's 52:54:00 prefix.
        return bytes([0x52, 0x54, 0x00]) + os.urandom(3)
    parts = text.split(":")
    if len(parts) != 6 or not all(len(x) == 2 for x in parts):
        raise ValueError(f"--mac {text!r} is not xx:xx:xx:xx:xx:xx")
    return bytes(int(x, 16) for x in parts)


def _open_net(args: argparse.Namespace) -> tuple[VirtioDevice, list[int]]:
    from pv import net as pv_net
    from pv import tap

    mac = _parse_mac(args.mac)
    _ifname, fd = tap.open_tap(args.tap)  # needs CAP_NET_ADMIN unless the tap is ours: before the jail
    try:
        dev = pv_net.Net(fd, mac, queue_size=args.queue_size, engine=args.engine)
    except BaseException:
        os.close(fd)
        raise
    return dev, [fd]


def _jail(args: argparse.Namespace, keep: list[int], image_size: int | None) -> None:
    root = args.jail_root
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="kvmdm-backend-jail-"))  # 0700, owned by us (root)
    # RLIMIT_FSIZE applies to every write at an offset beyond it (SIGXFSZ), not only to growing files: let the
    # image be written up to its size and never grown.
    fsize = max(image_size or 0, 4096)
    cfg = jail.JailConfig(
        root_dir=root,
        uid=args.uid,
        gid=args.gid,
        keep_fds=sorted({0, 1, 2, *keep}),
        rlimits=jail.Rlimits(nofile=1024, nproc=256, fsize=fsize),
        seccomp="backend",
        # blk needs no network at all; a tap fd keeps working in an empty namespace too.
        allow_net_ns=False,
        hostname=f"kvmdm-{args.kind}",
    )
    jail.enter_jail(cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s kvmdm-backend[%(process)d] %(levelname)s %(name)s: %(message)s")
    try:
        device, fds = _open_blk(args) if args.kind == "blk" else _open_net(args)
        listener = bind_listener(args.socket)
    except (OSError, ValueError) as e:
        print(f"kvmdm-backend: {e}", file=sys.stderr)
        return 1
    image_size = getattr(device, "size_bytes", None)
    # "The back-end program must end (as quickly and cleanly as possible) when the SIGTERM signal is received."
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if not args.no_jail:
        try:
            _jail(args, [listener.fileno(), *fds], image_size)
        except (jail.JailConfigError, jail.JailSetupError) as e:
            print(f"kvmdm-backend: cannot enter the jail: {e}", file=sys.stderr)
            return 1
    log.info("serving %s on %s%s", args.kind, args.socket, "" if args.no_jail else " (jailed)")
    print(f"READY {args.socket}", file=sys.stderr, flush=True)
    VhostUserServer(listener, device, max_memory=args.max_memory, name=args.kind).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
