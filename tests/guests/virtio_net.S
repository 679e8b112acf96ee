/*
 * virtio_net -- a polling virtio-net driver (virtio 1.2 §5.1) on the shared virtio-pci core (src/virtio.S).
 *
 * Negotiates VERSION_1 and VIRTIO_NET_F_MAC, reads the MAC from the device configuration, sets up receiveq1
 * (queue 0) and transmitq1 (queue 1), posts RX_BUFS receive buffers, and broadcasts an ARP request "who has
 * 10.0.2.2? tell 10.0.2.15" (RFC 826) behind a zeroed 12-byte struct virtio_net_hdr (§5.1.6: with VERSION_1
 * the header always has num_buffers). It waits for the matching ARP reply addressed to its MAC, recycling any
 * other frame, and resends the request up to TRIES times (one per second or so). Prints
 *     virtio_net: mac=<mac> tx ok rx ok
 *     virtio_net: 10.0.2.2 is at <peer mac>
 * and exits 0; on failure it says which step failed and exits 1. No options.
 */

.include "rt.inc"

.equ VIRTIO_NET_F_MAC,   5
.equ NET_HDR_LEN,        12                 /* struct virtio_net_hdr with num_buffers (§5.1.6) */
.equ RX_BUFS,            8
.equ RX_BUF_LEN,         2048               /* header + a 1514-byte frame: no MRG_RXBUF, no offloads */
.equ ARP_FRAME_LEN,      60                 /* 42 bytes of ARP over Ethernet, padded to the 60-byte minimum */
.equ TRIES,              5
.equ RX_WAIT_TSC,        0x80000000         /* ~1 s at 2 GHz between resends */
.equ FRAMES_PER_TRY,     64                 /* unrelated frames (IPv6 ND, ...) tolerated per try */
/* Offsets in an Ethernet frame carrying ARP. */
.equ ETH_DST,            0
.equ ETH_SRC,            6
.equ ETH_TYPE,           12
.equ ARP_OPER,           20
.equ ARP_SHA,            22
.equ ARP_SPA,            28
.equ ARP_TPA,            38
.equ ARP_MIN_LEN,        42
.equ IP_GUEST,           0x0f02000a         /* 10.0.2.15 as stored (network order) */
.equ IP_PEER,            0x0202000a         /* 10.0.2.2 */

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movl $VIRTIO_PCI_NET_MODERN, %edi
    movl $VIRTIO_PCI_NET_TRANSITIONAL, %esi
    lea net_dev(%rip), %rdx
    call vio_pci_find
    testl %eax, %eax
    jz 1f
    PUTS "virtio_net: no virtio-net device\n"
    jmp 98f
1:  lea net_dev(%rip), %rdi
    movabsq $((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)), %rsi
    call vio_init
    testl %eax, %eax
    jz 2f
    PUTS "virtio_net: feature negotiation failed\n"
    jmp 98f
2:  btq $VIRTIO_NET_F_MAC, net_dev + VDEV_FEATURES(%rip)
    jc 3f
    PUTS "virtio_net: the device has no MAC address (VIRTIO_NET_F_MAC)\n"
    jmp 98f
3:  lea net_dev(%rip), %rdi
    xorl %esi, %esi                         /* receiveq1 */
    lea net_rxq(%rip), %rdx
    call vio_queue_setup
    movl %eax, %ebx
    lea net_dev(%rip), %rdi
    movl $1, %esi                           /* transmitq1 */
    lea net_txq(%rip), %rdx
    call vio_queue_setup
    orl %eax, %ebx
    jz 4f
    PUTS "virtio_net: missing queues\n"
    jmp 98f
4:  lea net_dev(%rip), %rdi
    call vio_driver_ok
    andl $(VIO_S_DRIVER_OK | VIO_S_NEEDS_RESET | VIO_S_FAILED), %eax
    cmpl $VIO_S_DRIVER_OK, %eax
    je 5f
    PUTS "virtio_net: device did not accept DRIVER_OK\n"
    jmp 98f

    /* struct virtio_net_config.mac (§5.1.4), byte by byte */
5:  movq net_dev + VDEV_DEVCFG(%rip), %rsi
    lea net_mac(%rip), %rdi
    xorl %ecx, %ecx
6:  movb (%rsi, %rcx), %al
    movb %al, (%rdi, %rcx)
    incl %ecx
    cmpl $6, %ecx
    jb 6b
    PUTS "virtio_net: mac="
    lea net_mac(%rip), %rdi
    call print_mac

    /* receive buffers, then the ARP request (sha = our MAC) */
    xorl %ebx, %ebx
7:  movl %ebx, %edi
    shll $11, %edi                          /* * RX_BUF_LEN */
    lea net_rxbufs(%rip), %rax
    addq %rax, %rdi
    call post_rx
    incl %ebx
    cmpl $RX_BUFS, %ebx
    jb 7b
    lea net_rxq(%rip), %rdi
    call vio_kick
    movl net_mac(%rip), %eax
    movl %eax, arp_frame + ETH_SRC(%rip)
    movl %eax, arp_frame + ARP_SHA(%rip)
    movzwl net_mac + 4(%rip), %eax
    movw %ax, arp_frame + ETH_SRC + 4(%rip)
    movw %ax, arp_frame + ARP_SHA + 4(%rip)

    lea tx_buf(%rip), %rax
    movq %rax, tx_sg + SG_ADDR(%rip)
    movl $(NET_HDR_LEN + ARP_FRAME_LEN), tx_sg + SG_LEN(%rip)
    movl $0, tx_sg + SG_FLAGS(%rip)
    movl $TRIES, %r12d
10: lea net_txq(%rip), %rdi
    lea tx_sg(%rip), %rsi
    movl $1, %edx
    call vio_add
    lea net_txq(%rip), %rdi
    call vio_kick
    lea net_txq(%rip), %rdi
    xorl %esi, %esi
    call vio_wait
    cmpq $-1, %rax
    jne 11f
    PUTS " tx timeout\n"
    jmp 98f
11: movl $FRAMES_PER_TRY, %r13d
12: lea net_rxq(%rip), %rdi
    movl $RX_WAIT_TSC, %esi
    call vio_wait
    cmpq $-1, %rax
    je 15f
    movl %edx, %r14d                        /* bytes written: header + frame */
    lea net_rxq(%rip), %rcx                 /* the buffer is the head descriptor's address */
    shll $4, %eax
    movq VQ_DESC_PAGE(%rcx, %rax), %r15
    lea NET_HDR_LEN(%r15), %rdi
    leal -NET_HDR_LEN(%r14), %esi
    call is_arp_reply
    testl %eax, %eax
    jnz 20f
    movq %r15, %rdi                         /* not ours: give the buffer back */
    call post_rx
    lea net_rxq(%rip), %rdi
    call vio_kick
    decl %r13d
    jnz 12b
15: decl %r12d
    jnz 10b
    PUTS " tx ok rx timeout\n"
    jmp 98f

20: PUTS " tx ok rx ok\n"
    PUTS "virtio_net: 10.0.2.2 is at "
    lea NET_HDR_LEN + ARP_SHA(%r15), %rdi
    call print_mac
    PUTS "\n"
    movq net_dev + VDEV_COMMON(%rip), %rcx
    movb $0, VIO_CC_STATUS(%rcx)            /* §2.4: reset, the device lets go of our buffers */
    movl $EXIT_OK, %eax
    jmp 99f
98: movl $EXIT_FAIL, %eax
99: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* post_rx(rdi = buffer): make one device-writable RX_BUF_LEN buffer available on receiveq1 (no kick). */
post_rx:
    subq $(SG_SIZE + 8), %rsp
    movq %rdi, SG_ADDR(%rsp)
    movl $RX_BUF_LEN, SG_LEN(%rsp)
    movl $VIRTQ_DESC_F_WRITE, SG_FLAGS(%rsp)
    lea net_rxq(%rip), %rdi
    movq %rsp, %rsi
    movl $1, %edx
    call vio_add
    addq $(SG_SIZE + 8), %rsp
    ret

/* is_arp_reply(rdi = frame, esi = length) -> eax = 1 if it is "10.0.2.2 is at ..." sent to our MAC */
is_arp_reply:
    xorl %eax, %eax
    cmpl $ARP_MIN_LEN, %esi
    jl 9f
    movl net_mac(%rip), %ecx
    cmpl %ecx, ETH_DST(%rdi)
    jne 9f
    movzwl net_mac + 4(%rip), %ecx
    cmpw %cx, ETH_DST + 4(%rdi)
    jne 9f
    cmpw $0x0608, ETH_TYPE(%rdi)            /* 0x0806 in network order */
    jne 9f
    cmpl $0x04060008, ARP_OPER - 4(%rdi)    /* ptype 0x0800, hlen 6, plen 4 */
    jne 9f
    cmpw $0x0200, ARP_OPER(%rdi)            /* reply */
    jne 9f
    cmpl $IP_PEER, ARP_SPA(%rdi)
    jne 9f
    cmpl $IP_GUEST, ARP_TPA(%rdi)
    jne 9f
    movl $1, %eax
9:  ret

/* print_mac(rdi = 6 bytes): aa:bb:cc:dd:ee:ff */
print_mac:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    xorl %r12d, %r12d
1:  testl %r12d, %r12d
    jz 2f
    movl $':', %edi
    call rt_putc
2:  movzbl (%rbx, %r12), %edi
    call print_hex2
    incl %r12d
    cmpl $6, %r12d
    jb 1b
    popq %r12
    popq %rbx
    ret

/* print_hex2(edi = byte): two lowercase hex digits */
print_hex2:
    pushq %rbx
    movl %edi, %ebx
    shrl $4, %edi
    call hex_nibble
    movl %ebx, %edi
    call hex_nibble
    popq %rbx
    ret
hex_nibble:
    andl $0xf, %edi
    addl $'0', %edi
    cmpl $'9', %edi
    jbe 1f
    addl $('a' - '9' - 1), %edi
1:  jmp rt_putc

.data
.align 16
tx_buf:
    .skip NET_HDR_LEN                       /* flags 0, gso_type NONE (§5.1.6.2): no offloads */
arp_frame:
    .byte 0xff, 0xff, 0xff, 0xff, 0xff, 0xff   /* broadcast */
    .skip 6                                 /* source MAC: filled in */
    .byte 0x08, 0x06                        /* ARP */
    .byte 0x00, 0x01, 0x08, 0x00, 6, 4      /* Ethernet, IPv4, hlen, plen */
    .byte 0x00, 0x01                        /* request */
    .skip 6                                 /* sha: filled in */
    .byte 10, 0, 2, 15                      /* spa */
    .skip 6                                 /* tha */
    .byte 10, 0, 2, 2                       /* tpa */
    .skip ARP_FRAME_LEN - ARP_MIN_LEN

.bss
.align 4096
net_rxq:
    .skip VQ_AREA_SIZE
net_txq:
    .skip VQ_AREA_SIZE
net_rxbufs:
    .skip RX_BUFS * RX_BUF_LEN
.align 64
tx_sg:                                      /* struct vio_sg: the whole tx buffer, device-readable */
    .skip SG_SIZE
net_dev:
    .skip VDEV_SIZE
net_mac:
    .skip 8
