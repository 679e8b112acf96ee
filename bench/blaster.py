"""Host-side frame source for the rx phases of bench/ablation.py and bench/net.py: ethertype-0x88b6 broadcast frames
written into a tap with sendmmsg(2) in batches of 64, as fast as the kernel takes them.

In C (cffi, via kvmcore.cext) because a Python send() loop tops out near 170 k frames/s here, below what the
devices under test can take, so the rx numbers measured the blaster. Waits for one byte on stdin (the go signal:
the guest's rx phase began) and then runs until killed.

    python -m bench.blaster IFNAME SIZE
"""

from __future__ import annotations

import sys

from kvmcore import cext

CDEF = "int blast(const char *ifname, const unsigned char *frame, int size);"

SOURCE = r"""
#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <net/if.h>
#include <sys/socket.h>
#include <linux/if_packet.h>

#define BATCH 64

int blast(const char *ifname, const unsigned char *frame, int size) {
    struct sockaddr_ll sll;
    struct mmsghdr msgs[BATCH];
    struct iovec iov;
    int s = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: this socket never receives */
    if (s < 0)
        return -errno;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = (int)if_nametoindex(ifname);
    if (sll.sll_ifindex == 0 || bind(s, (struct sockaddr *)&sll, sizeof sll) < 0)
        return -errno;
    iov.iov_base = (void *)frame;
    iov.iov_len = (size_t)size;
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    for (;;)
        sendmmsg(s, msgs, BATCH, 0); /* ENOBUFS when the tap's queue is full: keep going */
}
"""

SRC_MAC = bytes.fromhex("525400ab1a11")
ETHERTYPE = b"\x88\xb6"


def main(argv: list[str]) -> int:
    ifname, size = argv[0], int(argv[1])
    if not 60 <= size <= 1514:
        print(f"bench.blaster: frame size {size} not in 60..1514", file=sys.stderr)
        return 2
    mod = cext.build("blaster", CDEF, SOURCE, extra_compile_args=("-O2",))
    frame = b"\xff" * 6 + SRC_MAC + ETHERTYPE + bytes(size - 14)
    sys.stdin.buffer.read(1)
    rc = mod.lib.blast(ifname.encode(), frame, size)
    print(f"bench.blaster: {ifname}: error {-rc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
