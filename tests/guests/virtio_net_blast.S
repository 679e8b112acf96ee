/*
 * virtio_net_blast -- a polling virtio-net throughput guest (virtio 1.2 §5.1) for bench/ablation.py, bench/net.py.
 *
 * Cmdline: `tx=N` (1000) frames to send, `size=S` (1514, 60..1514) bytes of Ethernet frame each, `rx=M` (0)
 * frames to receive. Negotiates VERSION_1 and MAC only (no offloads, no MRG_RXBUF: §5.1.6 the header is the
 * 12-byte struct virtio_net_hdr with num_buffers), sets up receiveq1 and transmitq1 at the queue size Q the
 * runtime allows (VQ_MAX_SIZE), then:
 *   TX phase, between '<' and '>' on COM1: descriptor i (i < Q) is written once and points at one shared,
 *     device-readable buffer (header + a broadcast frame of ethertype 0x88b5, IEEE 802 local experimental, from
 *     our MAC). Posts min(Q, N) descriptors and kicks; then for every used element (§2.7.8) it reclaims that
 *     descriptor, counts the frame as sent, and reposts exactly that descriptor while fewer than N were posted;
 *     one kick per batch of reposts. A frame counts as sent only once its used element came back.
 *   RX phase (M > 0), between '<' and '>': descriptor i points at its own device-writable 2048-byte buffer.
 *     Posts all Q buffers once and kicks ('<' is printed only then, so the host may start sending at '<'); then
 *     for every used element counts the frame if its ethertype is 0x88b6 (the host's blast; anything else is
 *     reposted uncounted) and reposts exactly that descriptor; one kick per batch.
 * So at most Q buffers are ever outstanding (avail idx - used idx <= Q, §2.7.13) and no descriptor is rewritten or
 * reposted while the device owns it. Every used element is checked (§2.7.8.1 is the device's side of this): the
 * used idx may not run more than Q ahead of what we consumed, and the id must be a descriptor we have in flight;
 * otherwise the guest prints "bad used element" with the indices and exits 1 -- a device bug, not a driver one.
 * Impossible used idx values (more than Q ahead) are counted (odd-used-idx-reads in the result line), skipped
 * and re-read; only ODD_READS_MAX of them fail the run. They exposed a real device bug once (kvmdm's Python
 * device zeroed used->idx for an instant before every store: CPython's struct.pack_into memsets its target
 * first); the tests now require the count to be 0.
 * Then prints "virtio_net_blast: sent N received M" and exits 0; on a timeout (no progress for VIO_TIMEOUT_TSC)
 * or a bad option it says so and exits 1 / 2.
 */

.include "rt.inc"

.equ VIRTIO_NET_F_MAC,   5
.equ NET_HDR_LEN,        12
.equ RX_BUF_LEN,         2048
.equ FRAME_MIN,          60
.equ FRAME_MAX,          1514
.equ ETH_TYPE,           12
.equ ETHERTYPE_TX,       0xb588             /* 0x88b5 in network order */
.equ ETHERTYPE_RX,       0xb688             /* 0x88b6 in network order */
.equ REAP_NONE,          -1
.equ REAP_BAD,           -2
.equ ODD_READS_MAX,      1000000

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    lea key_tx(%rip), %rdi
    movl $1000, %esi
    call rt_opt_u64
    movq %rax, %r12                         /* r12 = frames to send */
    lea key_size(%rip), %rdi
    movl $FRAME_MAX, %esi
    call rt_opt_u64
    movq %rax, %r13                         /* r13 = frame size */
    lea key_rx(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %r14                         /* r14 = frames to receive */
    cmpq $FRAME_MIN, %r13
    jb 1f
    cmpq $FRAME_MAX, %r13
    jbe 2f
1:  PUTS "bad option: size\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 99f

2:  call net_bringup
    testl %eax, %eax
    jnz 98f
    PUTS "virtio_net_blast: tx="
    movq %r12, %rdi
    call rt_putdec
    PUTS " size="
    movq %r13, %rdi
    call rt_putdec
    PUTS " rx="
    movq %r14, %rdi
    call rt_putdec
    PUTS "\n"

    /* ---- the frame: broadcast, our MAC, ethertype 0x88b5, zero payload, behind a zero header ---- */
    lea tx_buf + NET_HDR_LEN(%rip), %rdi
    movl $0xffffffff, (%rdi)
    movw $0xffff, 4(%rdi)
    movl net_mac(%rip), %eax
    movl %eax, 6(%rdi)
    movzwl net_mac + 4(%rip), %eax
    movw %ax, 10(%rdi)
    movw $ETHERTYPE_TX, ETH_TYPE(%rdi)
    /* every tx descriptor: the shared buffer, device-readable, no NEXT (§2.7.5) */
    xorl %ebx, %ebx
3:  lea net_txq(%rip), %rdi
    movl %ebx, %esi
    lea tx_buf(%rip), %rdx
    leal NET_HDR_LEN(%r13d), %ecx
    xorl %r8d, %r8d
    call desc_set
    incl %ebx
    movzwl net_txq + VQ_SIZE(%rip), %eax
    cmpl %eax, %ebx
    jb 3b

    /* ---- TX phase: rbp = posted, rbx = completed (used elements back), r13 = reclaimed in this pass ---- */
    PUTS "<"
    xorl %ebp, %ebp
    xorl %ebx, %ebx
    call progress_start
10: cmpq %r12, %rbp                         /* initial fill: min(Q, N) descriptors 0, 1, ... */
    jae 11f
    movzwl net_txq + VQ_SIZE(%rip), %eax
    cmpq %rax, %rbp
    jae 11f
    lea tx_inflight(%rip), %rax
    movb $1, (%rax, %rbp)
    lea net_txq(%rip), %rdi
    movl %ebp, %esi
    call avail_push
    incq %rbp
    jmp 10b
11: testq %rbp, %rbp
    jz 19f
    lea net_txq(%rip), %rdi
    call vio_kick
12: cmpq %r12, %rbx
    jae 19f
    xorl %r13d, %r13d                       /* reclaimed in this pass */
    xorl %r15d, %r15d                       /* reposted in this pass */
13: lea net_txq(%rip), %rdi
    lea tx_inflight(%rip), %rsi
    call reap
    cmpq $REAP_NONE, %rax
    je 15f
    cmpq $REAP_BAD, %rax
    je 97f
    incq %rbx                               /* its used element came back: sent */
    incl %r13d
    cmpq %r12, %rbp
    jae 13b
    lea tx_inflight(%rip), %rcx             /* repost exactly the descriptor just reclaimed */
    movb $1, (%rcx, %rax)
    lea net_txq(%rip), %rdi
    movl %eax, %esi
    call avail_push
    incq %rbp
    incl %r15d
    jmp 13b
15: testl %r15d, %r15d
    jz 16f
    lea net_txq(%rip), %rdi
    call vio_kick
16: movl %r13d, %ecx
    call progress_or_timeout
    testl %eax, %eax
    jz 12b
    PUTS ">\nvirtio_net_blast: tx timeout after "
    movq %rbx, %rdi
    call rt_putdec
    PUTS " frames\n"
    jmp 98f
19: PUTS ">"

    /* ---- RX phase: r15 = counted frames, rbx = reclaimed in this pass ---- */
    testq %r14, %r14
    jz 40f
    xorl %ebx, %ebx
20: movl %ebx, %edx                         /* descriptor i: buffer i, device-writable */
    shll $11, %edx                          /* * RX_BUF_LEN */
    lea net_rxbufs(%rip), %rax
    addq %rax, %rdx
    lea net_rxq(%rip), %rdi
    movl %ebx, %esi
    movl $RX_BUF_LEN, %ecx
    movl $VIRTQ_DESC_F_WRITE, %r8d
    call desc_set
    lea rx_inflight(%rip), %rax
    movb $1, (%rax, %rbx)
    lea net_rxq(%rip), %rdi
    movl %ebx, %esi
    call avail_push
    incl %ebx
    movzwl net_rxq + VQ_SIZE(%rip), %eax
    cmpl %eax, %ebx
    jb 20b
    lea net_rxq(%rip), %rdi
    call vio_kick
    PUTS "<"
    xorl %r15d, %r15d
    call progress_start
21: cmpq %r14, %r15
    jae 29f
    xorl %ebx, %ebx
22: lea net_rxq(%rip), %rdi
    lea rx_inflight(%rip), %rsi
    call reap
    cmpq $REAP_NONE, %rax
    je 24f
    cmpq $REAP_BAD, %rax
    je 97f
    movl %eax, %ecx                         /* the buffer of descriptor id */
    shll $11, %ecx
    lea net_rxbufs(%rip), %rdi
    addq %rcx, %rdi
    cmpl $(NET_HDR_LEN + ETH_TYPE + 2), %edx
    jb 23f
    cmpw $ETHERTYPE_RX, NET_HDR_LEN + ETH_TYPE(%rdi)
    jne 23f
    incq %r15
23: lea rx_inflight(%rip), %rcx             /* repost exactly that descriptor (unchanged: buffer i) */
    movb $1, (%rcx, %rax)
    lea net_rxq(%rip), %rdi
    movl %eax, %esi
    call avail_push
    incl %ebx
    cmpq %r14, %r15
    jb 22b
24: testl %ebx, %ebx
    jz 25f
    lea net_rxq(%rip), %rdi
    call vio_kick
25: movl %ebx, %ecx
    call progress_or_timeout
    testl %eax, %eax
    jz 21b
    PUTS ">\nvirtio_net_blast: rx timeout after "
    movq %r15, %rdi
    call rt_putdec
    PUTS " frames\n"
    jmp 98f
29: PUTS ">"

40: PUTS "\nvirtio_net_blast: sent "
    movq %rbx, %rdi
    testq %r14, %r14
    jz 41f
    movq %r12, %rdi                         /* rbx was reused by the rx phase; tx completed all r12 */
41: call rt_putdec
    PUTS " received "
    movq %r15, %rdi
    testq %r14, %r14
    jnz 42f
    xorl %edi, %edi
42: call rt_putdec
    PUTS " odd-used-idx-reads "
    movq odd_used_reads(%rip), %rdi
    call rt_putdec
    PUTS "\n"
    movq net_dev + VDEV_COMMON(%rip), %rcx
    movb $0, VIO_CC_STATUS(%rcx)            /* §2.4: reset, the device lets go of our buffers */
    movl $EXIT_OK, %eax
    jmp 99f
97: PUTS ">\nvirtio_net_blast: bad used element: used idx "
    movzwl bad_used_idx(%rip), %edi
    call rt_putdec
    PUTS " consumed "
    movzwl bad_last_used(%rip), %edi
    call rt_putdec
    PUTS " id "
    movl bad_id(%rip), %edi
    call rt_putdec
    PUTS "\n"
98: movl $EXIT_FAIL, %eax
99: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

/* desc_set(rdi = vq, esi = id, rdx = addr, ecx = len, r8d = flags): one descriptor, no NEXT (§2.7.5). */
desc_set:
    shll $4, %esi
    lea VQ_DESC_PAGE(%rdi, %rsi), %rax      /* struct virtq_desc {le64 addr; le32 len; le16 flags, next} */
    movq %rdx, (%rax)
    movl %ecx, 8(%rax)
    movw %r8w, 12(%rax)
    movw $0, 14(%rax)
    ret

/* avail_push(rdi = vq, esi = head): ring[idx % Q] = head, then idx + 1 (§2.7.13.2-3; x86 keeps the two stores in
 * order, so no fence; vio_kick fences before notifying, §2.7.13.4). Clobbers rax, rcx, r8. */
avail_push:
    movzwl VQ_AVAIL_IDX(%rdi), %ecx
    movzwl VQ_SIZE(%rdi), %eax
    decl %eax
    andl %ecx, %eax
    lea VQ_AVAIL_PAGE(%rdi), %r8
    movw %si, 4(%r8, %rax, 2)
    incl %ecx
    movw %cx, VQ_AVAIL_IDX(%rdi)
    movw %cx, 2(%r8)
    ret

/* reap(rdi = vq, rsi = in-flight flags, one byte per descriptor) -> rax = id of the next used element and
 * edx = its len, its in-flight flag cleared; REAP_NONE if the device has used nothing new; REAP_BAD (with
 * bad_used_idx/bad_last_used/bad_id set) if used idx ran more than Q ahead of what we consumed or the id is not a
 * descriptor we have in flight (§2.7.8: the device only returns what the driver made available). */
reap:
    lea VQ_USED_PAGE(%rdi), %r8
    movzwl VQ_LAST_USED(%rdi), %ecx
    movzwl 2(%r8), %eax                     /* used->idx, written by the device */
    movl %eax, %r9d
    subl %ecx, %r9d
    andl $0xffff, %r9d                      /* elements pending */
    jz 7f
    movzwl VQ_SIZE(%rdi), %r10d
    cmpl %r10d, %r9d
    ja 8f
    movw %ax, bad_used_idx(%rip)            /* (only read when we fail) */
    leal -1(%r10), %r9d
    andl %ecx, %r9d
    movl 4(%r8, %r9, 8), %eax               /* struct virtq_used_elem {le32 id; le32 len} */
    movl 8(%r8, %r9, 8), %edx
    cmpl %r10d, %eax
    jae 9f
    cmpb $0, (%rsi, %rax)
    je 9f
    movb $0, (%rsi, %rax)
    incl %ecx
    movw %cx, VQ_LAST_USED(%rdi)
    ret
7:  movq $REAP_NONE, %rax
    xorl %edx, %edx
    ret
8:  incq odd_used_reads(%rip)              /* an impossible used idx: count it, read again later (see top) */
    cmpq $ODD_READS_MAX, odd_used_reads(%rip)
    jb 7b
    movw %ax, bad_used_idx(%rip)
    movl $0xffffffff, %eax
9:  movw %cx, bad_last_used(%rip)
    movl %eax, bad_id(%rip)
    movq $REAP_BAD, %rax
    ret

/* progress_start(): the timeout clock starts now. */
progress_start:
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, last_progress(%rip)
    ret

/* progress_or_timeout(ecx = work done in this pass) -> eax = 1 if nothing happened for VIO_TIMEOUT_TSC. */
progress_or_timeout:
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    testl %ecx, %ecx
    jz 1f
    movq %rdx, last_progress(%rip)
    xorl %eax, %eax
    ret
1:  pause
    subq last_progress(%rip), %rdx
    movabsq $VIO_TIMEOUT_TSC, %rax
    cmpq %rax, %rdx
    setae %al
    movzbl %al, %eax
    ret

/* net_bringup() -> eax = 0, or 1 after printing why. Reads the MAC into net_mac. */
net_bringup:
    pushq %rbx
    movl $VIRTIO_PCI_NET_MODERN, %edi
    movl $VIRTIO_PCI_NET_TRANSITIONAL, %esi
    lea net_dev(%rip), %rdx
    call vio_pci_find
    testl %eax, %eax
    jz 1f
    PUTS "virtio_net_blast: no virtio-net device\n"
    jmp 8f
1:  lea net_dev(%rip), %rdi
    movabsq $((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC)), %rsi
    call vio_init
    testl %eax, %eax
    jz 2f
    PUTS "virtio_net_blast: feature negotiation failed\n"
    jmp 8f
2:  btq $VIRTIO_NET_F_MAC, net_dev + VDEV_FEATURES(%rip)
    jc 3f
    PUTS "virtio_net_blast: the device has no MAC address\n"
    jmp 8f
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
    PUTS "virtio_net_blast: missing queues\n"
    jmp 8f
4:  lea net_dev(%rip), %rdi
    call vio_driver_ok
    andl $(VIO_S_DRIVER_OK | VIO_S_NEEDS_RESET | VIO_S_FAILED), %eax
    cmpl $VIO_S_DRIVER_OK, %eax
    je 5f
    PUTS "virtio_net_blast: device did not accept DRIVER_OK\n"
    jmp 8f
5:  movq net_dev + VDEV_DEVCFG(%rip), %rsi  /* struct virtio_net_config.mac (§5.1.4) */
    lea net_mac(%rip), %rdi
    xorl %ecx, %ecx
6:  movb (%rsi, %rcx), %al
    movb %al, (%rdi, %rcx)
    incl %ecx
    cmpl $6, %ecx
    jb 6b
    xorl %eax, %eax
    popq %rbx
    ret
8:  movl $1, %eax
    popq %rbx
    ret

STRING key_tx, "tx"
STRING key_size, "size"
STRING key_rx, "rx"

.bss
.align 4096
net_rxq:
    .skip VQ_AREA_SIZE
net_txq:
    .skip VQ_AREA_SIZE
net_rxbufs:
    .skip VQ_MAX_SIZE * RX_BUF_LEN
.align 64
tx_buf:
    .skip NET_HDR_LEN + FRAME_MAX
.align 64
tx_inflight:
    .skip VQ_MAX_SIZE
rx_inflight:
    .skip VQ_MAX_SIZE
net_dev:
    .skip VDEV_SIZE
net_mac:
    .skip 8
last_progress:
    .skip 8
bad_used_idx:
    .skip 2
bad_last_used:
    .skip 2
bad_id:
    .skip 4
.align 8
odd_used_reads:
    .skip 8
