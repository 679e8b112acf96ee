"""daemon.builder: the one recipe from a validated guest definition plus its resources to a built VM, without
/dev/kvm (a fake Vmm records the attach steps; the virtio backends and vhost-user front-ends are real, the
latter served by kvmdm's own vhost-user back-end over a socketpair)."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import builder
from daemon.builder import BuiltVm, GuestResources, ResourceMismatchError, build_vm, guest_memory
from daemon.config import GuestDefinition, parse_definition
from daemon.vmm import MachineConfig
from pv.blk import Block
from pv.console import Console
from pv.device import VIRTIO_ID_BLOCK, VIRTIO_ID_NET
from pv.net import Net
from pv.rng import Rng
from pv.vhost_user.backend import VhostUserSession, serve_connection
from pv.vhost_user.frontend import BackendError, VhostUserDevice

KERNEL = b"\x7fELF fake kernel"


class FakeVmm:
    """The slice of daemon.vmm.Vmm the builder drives, recording the order of the steps."""

    instances: list[FakeVmm] = []

    def __init__(self, cfg: MachineConfig, *, kvm: Any = None, serial_sink: Any = None, mem: Any = None) -> None:
        self.cfg, self.kvm, self.serial_sink, self.mem = cfg, kvm, serial_sink, mem
        self.steps: list[str] = []
        self.attached: list[Any] = []
        self.on_device_alert: Any = None
        self.fail_on_attach: int | None = None
        self.closes = 0
        FakeVmm.instances.append(self)

    def build(self) -> FakeVmm:
        self.steps.append("build")
        return self

    def attach_virtio(self, device: Any) -> None:
        if self.fail_on_attach == len(self.attached):
            raise OSError(12, "no room for another PCI function (test)")
        self.steps.append(f"attach:{type(device).__name__}")
        self.attached.append(device)

    def finish(self) -> None:
        self.steps.append("finish")

    def close(self) -> None:
        self.closes += 1


def _definition(**kw: Any) -> GuestDefinition:
    return parse_definition({"name": "g", "kernel": "/k", **kw}, check_paths=False)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(1 << 20))
    return p


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds a test opens; whatever the builder left open is closed afterwards (a test asserts what it expects)."""
    opened: list[int] = []
    yield opened
    for fd in opened:
        if _is_open(fd):
            os.close(fd)


def _open(fds: list[int], path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    fds.append(fd)
    return fd


def _not_a_tap(fds: list[int]) -> int:
    """pv.net.Net accepts any fd (it only configures a real tap); one end of a datagram socketpair will do."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.close()
    fd = a.detach()
    fds.append(fd)
    return fd


def _vhost_user_backend(device: Any) -> tuple[int, threading.Thread]:
    """A connected front-end fd served, in a thread, by kvmdm's vhost-user back-end around ``device``."""
    fe, be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def serve() -> None:
        try:
            serve_connection(be, VhostUserSession(device))
        finally:
            be.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return fe.detach(), t


def _build(d: GuestDefinition, res: GuestResources, **kw: Any) -> BuiltVm:
    return build_vm(d, res, serial_sink=None, vmm_factory=FakeVmm, **kw)


# ------------------------------------------------------------------------------------------------- the recipe
def test_machine_comes_from_the_definition_and_devices_attach_disks_nics_rng_console_in_order(
        image: Path, fds: list[int]) -> None:
    d = _definition(vcpus=3, memory_mib=64, cmdline="a=b", rng=True, console2=True,
                    disks=[{"path": "/d0", "serial": "S0"}, {"path": "/d1", "read_only": True}],
                    nics=[{"mac": "52:54:00:00:00:01"}])
    res = GuestResources(kernel=KERNEL, initrd=b"initrd", disks=[_open(fds, image), _open(fds, image)],
                         nics=[_not_a_tap(fds)])
    built = _build(d, res)
    vmm = built.vmm
    assert isinstance(vmm, FakeVmm)
    assert vmm.cfg == MachineConfig(mem_size=64 << 20, vcpus=3, kernel=KERNEL, cmdline="a=b", initrd=b"initrd")
    assert vmm.steps == ["build", "attach:Block", "attach:Block", "attach:Net", "attach:Rng", "attach:Console",
                         "finish"]
    assert built.devices == vmm.attached
    b0, b1, net, rng, con = vmm.attached
    assert isinstance(b0, Block) and isinstance(b1, Block) and isinstance(net, Net)
    assert isinstance(rng, Rng) and isinstance(con, Console)
    assert (b0.fd, b0.read_only, b0.serial.rstrip(b"\0")) == (res.disks[0], False, b"S0")
    assert (b1.fd, b1.read_only, b1.serial.rstrip(b"\0")) == (res.disks[1], True, b"")
    assert net.tap_fd == res.nics[0] and net.mac == bytes.fromhex("525400000001")
    assert built.vhost_devices == []
    built.close()


def test_mem_size_in_bytes_replaces_memory_mib_for_a_bare_vm() -> None:
    built = _build(_definition(memory_mib=128), GuestResources(kernel=KERNEL), mem_size=(4 << 20) + 4096)
    assert built.vmm.cfg.mem_size == (4 << 20) + 4096


def test_device_alerts_and_the_dm_s_kvm_and_memory_reach_the_vmm() -> None:
    def alert(text: str) -> None:
        pass

    kvm, mem = object(), object()
    sink = object()
    built = build_vm(_definition(), GuestResources(kernel=KERNEL), serial_sink=sink, kvm=kvm,  # type: ignore[arg-type]
                     mem=mem, on_device_alert=alert, vmm_factory=FakeVmm)  # type: ignore[arg-type]
    vmm = built.vmm
    assert isinstance(vmm, FakeVmm)
    assert (vmm.kvm, vmm.mem, vmm.serial_sink, vmm.on_device_alert) == (kvm, mem, sink, alert)


def test_second_console_lines_go_to_the_serial_sink_with_the_hvc0_prefix_between_com1_lines() -> None:
    class Sink:
        data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    sink = Sink()
    built = build_vm(_definition(console2=True), GuestResources(kernel=KERNEL), serial_sink=sink,
                     vmm_factory=FakeVmm)
    [con] = built.devices
    assert isinstance(con, Console)
    assert isinstance(built.vmm, FakeVmm)
    com1 = built.vmm.serial_sink
    com1.write(b"booting")  # COM1 mid-line: the second console's line waits for its newline
    con.sink.write(b"hello\nworld\n")  # type: ignore[attr-defined]
    com1.write(b"\r\n")
    assert sink.data == b"booting\r\n[hvc0] hello\n[hvc0] world\n"


def test_vhost_user_devices_are_numbered_disks_first_then_nics_as_the_daemon_s_attach_backend_expects(
        image: Path, fds: list[int]) -> None:
    d = _definition(disks=[{"path": "/inline"}, {"path": "/sock0", "backend": "vhost-user"}],
                    nics=[{"mac": "52:54:00:aa:bb:cc", "backend": "vhost-user"}])
    blk_fd, t_blk = _vhost_user_backend(Block(_open(fds, image), serial="VUSER"))
    net_fd, t_net = _vhost_user_backend(Net(_not_a_tap(fds), bytes(6)))
    res = GuestResources(kernel=KERNEL, disks=[_open(fds, image), blk_fd], nics=[net_fd])
    built = _build(d, res)
    assert [type(x).__name__ for x in built.devices] == ["Block", "VhostUserDevice", "VhostUserDevice"]
    vblk, vnet = built.vhost_devices
    assert built.devices[1:] == [vblk, vnet]
    assert isinstance(vblk, VhostUserDevice) and isinstance(vnet, VhostUserDevice)
    assert (vblk.device_type, vnet.device_type) == (VIRTIO_ID_BLOCK, VIRTIO_ID_NET)
    # blk's config space is the back-end's (its serial is served by GET_ID; capacity here), net's is ours.
    cfg = bytearray(8)
    vblk.read_config(0, memoryview(cfg))
    assert struct.unpack("<Q", cfg)[0] == (1 << 20) // 512
    mac_status = bytearray(8)
    vnet.read_config(0, memoryview(mac_status))
    assert bytes(mac_status[:6]) == bytes.fromhex("525400aabbcc")
    assert struct.unpack_from("<H", mac_status, 6)[0] == builder.VIRTIO_NET_S_LINK_UP
    # The vhost-user sockets belong to their devices, the image fd to the build.
    assert built.owned_fds == [res.disks[0]]
    built.close()
    assert not _is_open(res.disks[0])
    assert vblk.sock.fileno() == -1 and vnet.sock.fileno() == -1
    t_blk.join(5)
    t_net.join(5)
    assert not t_blk.is_alive() and not t_net.is_alive()  # the back-ends saw the hang-up


# ------------------------------------------------------------------------------------------------ ownership
def test_fewer_fds_than_disks_or_nics_is_refused_before_a_vm_exists_and_the_fds_are_closed(
        image: Path, fds: list[int]) -> None:
    FakeVmm.instances.clear()
    d = _definition(disks=[{"path": "/a"}, {"path": "/b"}], nics=[{}])
    res = GuestResources(kernel=KERNEL, disks=[_open(fds, image)], nics=[])
    with pytest.raises(ResourceMismatchError, match="2 disks but 1 disk fds; 1 nics but 0 nic fds"):
        _build(d, res)
    assert FakeVmm.instances == []
    assert not _is_open(res.disks[0])


def test_a_failing_attach_step_closes_the_vm_and_every_fd_it_was_given(image: Path, fds: list[int]) -> None:
    class Failing(FakeVmm):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.fail_on_attach = 1

    d = _definition(disks=[{"path": "/a"}, {"path": "/b", "backend": "vhost-user"}], nics=[{}])
    blk_fd, t = _vhost_user_backend(Block(_open(fds, image)))
    res = GuestResources(kernel=KERNEL, disks=[_open(fds, image), blk_fd], nics=[_not_a_tap(fds)])
    with pytest.raises(OSError, match="no room"):
        build_vm(d, res, serial_sink=None, vmm_factory=Failing)
    vmm = FakeVmm.instances[-1]
    assert vmm.closes == 1
    assert not any(_is_open(fd) for fd in (res.disks[0], res.nics[0]))
    t.join(5)
    assert not t.is_alive()  # the vhost-user socket was closed too: its back-end saw EOF


def test_a_vhost_user_back_end_that_refuses_the_handshake_fails_the_build_with_its_socket_closed(
        fds: list[int]) -> None:
    fe, be = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    be.close()  # nobody there: GET_FEATURES cannot be sent
    fd = fe.detach()
    with pytest.raises(BackendError, match="GET_FEATURES"):
        _build(_definition(disks=[{"path": "/s", "backend": "vhost-user"}]), GuestResources(KERNEL, disks=[fd]))
    assert not _is_open(fd)
    assert FakeVmm.instances[-1].closes == 1


def test_close_is_idempotent(image: Path, fds: list[int]) -> None:
    built = _build(_definition(disks=[{"path": "/a"}]), GuestResources(KERNEL, disks=[_open(fds, image)]))
    built.close()
    built.close()
    assert built.vmm.closes == 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- preloading
def test_preload_imports_exactly_the_device_modules_a_definition_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    mods = ("devices.virtio_pci", "pv.blk", "pv.rng", "pv.console", "pv.net", "pv.vhost_user.frontend")
    for m in mods:
        monkeypatch.delitem(sys.modules, m, raising=False)
    builder.preload_for(_definition())
    assert not any(m in sys.modules for m in mods)
    builder.preload_for(_definition(disks=[{"path": "/a"}], rng=True))
    assert {m for m in mods if m in sys.modules} == {"devices.virtio_pci", "pv.blk", "pv.rng"}
    builder.preload_for(_definition(nics=[{"backend": "vhost-user"}], console2=True))
    assert all(m in sys.modules for m in mods)


def test_preload_of_a_firmware_guest_imports_the_shared_console_log(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_vm joins the BIOS debug port to the console log with pv.console.SharedConsoleLog, after the jail: an
    # exec'd firmware DM died with "No module named 'pv.console'" (issue 10).
    monkeypatch.delitem(sys.modules, "pv.console", raising=False)
    builder.preload_for(parse_definition({"name": "fw", "firmware": "seabios"}, check_paths=False))
    assert "pv.console" in sys.modules


def test_the_dm_builds_through_the_builder_and_keeps_no_attach_logic_of_its_own() -> None:
    import daemon.dm as dm

    assert dm.build_vm is builder.build_vm and dm.preload_for is builder.preload_for
    assert not any(hasattr(dm.DeviceModel, n) for n in ("_attach_disks", "_attach_nics", "_attach_rng_console"))


@pytest.mark.parametrize(("doc", "shared"), [
    ({}, False),
    ({"disks": [{"path": "/img"}], "nics": [{"mac": "52:54:00:aa:bb:cc"}]}, False),
    ({"disks": [{"path": "/sock", "backend": "vhost-user"}]}, True),
    ({"nics": [{"mac": "52:54:00:aa:bb:cc", "backend": "vhost-user"}]}, True),
])
def test_guest_ram_is_a_shareable_memfd_only_when_a_vhost_user_back_end_must_map_it(
        doc: dict[str, Any], shared: bool) -> None:
    mem = guest_memory(_definition(**doc), 8 << 20)
    try:
        assert mem.shareable is shared
        assert all((s.fd >= 0) is shared for s in mem.slots())
    finally:
        mem.close()


def test_a_vhost_user_front_end_refuses_anonymous_guest_ram_with_a_clear_error(image: Path, fds: list[int]) -> None:
    from kvmcore.memory import GuestMemory
    from pv.vhost_user.frontend import BackendError

    d = _definition(disks=[{"path": "/sock0", "backend": "vhost-user"}])
    blk_fd, _ = _vhost_user_backend(Block(_open(fds, image), serial="VUSER"))
    built = _build(d, GuestResources(kernel=KERNEL, disks=[blk_fd]))
    mem = GuestMemory.create([(0, 4 << 20)], shared=False)
    try:
        [dev] = built.vhost_devices
        with pytest.raises(BackendError, match="not shareable"):
            dev._start(mem, [])
    finally:
        mem.close()
        built.close()
