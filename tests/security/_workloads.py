"""Code that runs INSIDE the jail during the security tests (imported before the jail is entered).

Everything here must only use modules imported at the top of this file: inside the jail nothing can be imported.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import socket
import struct
import threading
from typing import Any

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # _IOW(0xAE, 0x46, struct kvm_userspace_memory_region) (32 bytes)
KVM_IRQFD = 0x4020AE76  # _IOW(0xAE, 0x76, struct kvm_irqfd) (32 bytes)
_MEM_REGION = struct.Struct("<IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace_addr
_IRQFD = struct.Struct("<IIII16x")  # fd, gsi, flags, resamplefd, pad


def dm_workload(kvm_fd: int, memfd: int, mem_size: int, sock_fd: int) -> dict[str, Any]:
    """What a device model does after entering the jail, minus KVM_RUN (see the brief)."""
    out: dict[str, Any] = {}
    out["api_version"] = fcntl.ioctl(kvm_fd, KVM_GET_API_VERSION)
    vm = fcntl.ioctl(kvm_fd, KVM_CREATE_VM, 0)
    out["vm_fd_ok"] = vm >= 0
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP)
    # Guest RAM: the inherited memfd, mapped shared and registered as slot 0.
    ram = mmap.mmap(memfd, mem_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    ram[0:4] = b"\xf4\xf4\xf4\xf4"
    addr = ctypes.addressof(ctypes.c_char.from_buffer(ram))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, _MEM_REGION.pack(0, 0, 0, mem_size, addr))
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    out["vcpu_run_mapped"] = len(run) == run_size
    # An irqfd: eventfd wired to GSI 5.
    irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    fcntl.ioctl(vm, KVM_IRQFD, _IRQFD.pack(irq, 5, 0, 0))
    # An I/O thread waiting on epoll for an eventfd kick, answering over another eventfd.
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    done = os.eventfd(0, os.EFD_CLOEXEC)
    ep = select.epoll()
    ep.register(kick, select.EPOLLIN)
    seen: list[int] = []

    def io_thread() -> None:
        for _fd, _ev in ep.poll(5.0):
            seen.append(os.eventfd_read(kick))
        os.eventfd_write(done, 1)

    t = threading.Thread(target=io_thread, name="io")
    t.start()
    os.eventfd_write(kick, 7)
    t.join(5.0)
    out["io_thread_saw"] = seen
    out["done"] = os.eventfd_read(done)
    # Several vCPU-like threads touching guest RAM concurrently, woken with a threading.Event (futex).
    go = threading.Event()
    marks: list[int] = []

    def worker(i: int) -> None:
        go.wait(5.0)
        ram[64 + i] = i + 1
        marks.append(i)

    ws = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for w in ws:
        w.start()
    go.set()
    for w in ws:
        w.join(5.0)
    out["workers"] = sorted(marks)
    out["ram"] = list(ram[64:68])
    # Control channel: an inherited connected unix socket, with a file descriptor passed back (SCM_RIGHTS).
    sock = socket.socket(fileno=sock_fd)
    msg, fds, _flags, _addr = socket.recv_fds(sock, 64, 4)
    out["ctl_msg"] = msg.decode()
    socket.send_fds(sock, [b"pong"], [irq])
    for fd in fds:
        os.close(fd)
    sock.detach()
    ep.close()
    run.close()
    for fd in (irq, kick, done, vcpu, vm):
        os.close(fd)
    # mmap needs ctypes' exported pointer released before close()
    del addr
    return out
