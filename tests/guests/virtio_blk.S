/*
 * virtio_blk -- a polling virtio-blk driver (virtio 1.2 §5.2) on the shared virtio-pci core (src/virtio.S).
 *
 * Cmdline: `sectors=N` (64, 1..2048), `seed=S` (0), `ro=1` (the disk is read-only: the write must fail),
 * `kickall=1` (notify the device for every request even while it asks not to be, VIRTQ_USED_F_NO_NOTIFY).
 * With a writable disk it writes a pattern derived from (seed, sector, qword index) to sectors [0, N), FLUSHes,
 * reads them back and compares; with ro=1 the write must complete with VIRTIO_BLK_S_IOERR and a read-back
 * must show the sectors do not hold the pattern. Then it prints the text at the start of sectors N..N+7
 * (the host writes "KVMDM-HOST-DATA <n>" there), checks that a read past the capacity fails with IOERR,
 * prints the GET_ID serial and "virtio_blk: <k> failed"; exit code 0 if nothing failed, else 1.
 * Output names no PCI slot or address, so QEMU and kvmdm print the same text.
 *
 * Pattern qword i of sector s (the host check in the tests uses the same formula):
 *     x = seed ^ s * K1 ^ i * K2 (mod 2^64); x ^= x >> 31; x *= K3; x ^= x >> 29
 *
 * `bench=1 mb=M rand=R` (16, 1024): sequential 1 MiB reads of M MiB, then 1 MiB writes of the same range,
 * then R random 4 KiB reads, each phase between a "<" and a ">" on COM1 (timestamped by the host, see
 * bench/exits.py), then "virtio_blk: bench <k> failed".
 */

.include "rt.inc"

.equ VIRTIO_BLK_F_RO,     5
.equ VIRTIO_BLK_F_FLUSH,  9
.equ VIRTIO_BLK_T_IN,     0
.equ VIRTIO_BLK_T_OUT,    1
.equ VIRTIO_BLK_T_FLUSH,  4
.equ VIRTIO_BLK_T_GET_ID, 8
.equ VIRTIO_BLK_S_OK,     0
.equ VIRTIO_BLK_S_IOERR,  1
.equ STATUS_TIMEOUT,      0x100
.equ STATUS_NO_ROOM,      0x101
.equ WANTED_FEATURES,     (1 << VIRTIO_BLK_F_RO) | (1 << VIRTIO_BLK_F_FLUSH)
.equ MAX_SECTORS,         2048              /* the 1 MiB data buffer */
.equ HOST_SECTORS,        8
.equ TEXT_MAX,            48
.equ ID_BYTES,            20                /* §5.2.6: GET_ID data is 20 bytes */
.equ K1_LO, 0x7f4a7c15
.equ K1_HI, 0x9e3779b9

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    lea key_sectors(%rip), %rdi
    movl $64, %esi
    call rt_opt_u64
    movq %rax, %r12                         /* r12 = sectors */
    lea key_seed(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, blk_seed(%rip)
    lea key_ro(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %r13                         /* r13 = ro */
    lea key_kickall(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movb %al, vio_kick_always(%rip)         /* kickall=1: notify every request, even when told not to */
    lea key_bench(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %r14                         /* r14 = bench */
    testq %r12, %r12
    jz 1f
    cmpq $MAX_SECTORS, %r12
    jbe 2f
1:  PUTS "bad option: sectors\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 99f

2:  call blk_bringup                        /* rax = capacity, or -1 (already reported) */
    cmpq $-1, %rax
    je 98f
    movq %rax, %r15                         /* r15 = capacity */
    testq %r14, %r14
    jz 3f
    movq %r15, %rdi
    call blk_bench
    jmp 90f

3:  lea HOST_SECTORS(%r12), %rax
    cmpq %r15, %rax
    jbe 4f
    PUTS "virtio_blk: disk too small\n"
    jmp 98f

    /* ---- write the pattern (refused on a read-only disk) ---- */
4:  lea blk_buf(%rip), %rdi
    xorl %esi, %esi
    movl %r12d, %edx
    call pattern_fill
    movl $VIRTIO_BLK_T_OUT, %edi
    xorl %esi, %esi
    lea blk_buf(%rip), %rdx
    movl %r12d, %ecx
    shll $9, %ecx
    call blk_rq
    testq %r13, %r13
    jz 5f
    CHECK "write refused with IOERR", VIRTIO_BLK_S_IOERR
    jmp 6f
5:  CHECK "write status", VIRTIO_BLK_S_OK
    movl $VIRTIO_BLK_T_FLUSH, %edi
    xorl %esi, %esi
    xorl %edx, %edx
    xorl %ecx, %ecx
    call blk_rq
    CHECK "flush status", VIRTIO_BLK_S_OK

    /* ---- read it back ---- */
6:  lea blk_buf(%rip), %rdi
    movl %r12d, %ecx
    shll $6, %ecx                           /* qwords */
    xorl %eax, %eax
    rep stosq
    movl $VIRTIO_BLK_T_IN, %edi
    xorl %esi, %esi
    lea blk_buf(%rip), %rdx
    movl %r12d, %ecx
    shll $9, %ecx
    call blk_rq
    CHECK "read status", VIRTIO_BLK_S_OK
    lea blk_buf(%rip), %rdi
    xorl %esi, %esi
    movl %r12d, %edx
    call pattern_mismatches                 /* eax = sectors that differ from the pattern */
    testq %r13, %r13
    jz 7f
    lea name_unchanged(%rip), %rdi          /* read-only: none may hold the pattern */
    movl %eax, %esi
    movq %r12, %rdx
    call rt_check
    jmp 8f
7:  CHECK "pattern read back", 0
8:  PUTS "virtio_blk: "
    lea word_kept(%rip), %rdi
    testq %r13, %r13
    jnz 9f
    lea word_verified(%rip), %rdi
9:  call rt_puts
    movq %r12, %rdi
    call rt_putdec
    PUTS " sectors\n"

    /* ---- the host's sectors ---- */
    movl $VIRTIO_BLK_T_IN, %edi
    movq %r12, %rsi
    lea blk_buf(%rip), %rdx
    movl $(HOST_SECTORS * 512), %ecx
    call blk_rq
    CHECK "host sectors read status", VIRTIO_BLK_S_OK
    xorl %ebx, %ebx
10: PUTS "virtio_blk: sector "
    lea (%r12, %rbx), %rdi
    call rt_putdec
    PUTS ": "
    movl %ebx, %edi
    shll $9, %edi
    lea blk_buf(%rip), %rax
    addq %rax, %rdi
    movl $TEXT_MAX, %esi
    call print_text
    PUTS "\n"
    incl %ebx
    cmpl $HOST_SECTORS, %ebx
    jb 10b

    /* ---- §5.2.6: a request beyond the capacity fails ---- */
    movl $VIRTIO_BLK_T_IN, %edi
    movq %r15, %rsi
    lea blk_buf(%rip), %rdx
    movl $512, %ecx
    call blk_rq
    CHECK "read past the end IOERR", VIRTIO_BLK_S_IOERR

    /* ---- GET_ID ---- */
    movq $0, blk_id(%rip)
    movq $0, blk_id + 8(%rip)
    movq $0, blk_id + 16(%rip)
    movl $VIRTIO_BLK_T_GET_ID, %edi
    xorl %esi, %esi
    lea blk_id(%rip), %rdx
    movl $ID_BYTES, %ecx
    call blk_rq
    CHECK "get_id status", VIRTIO_BLK_S_OK
    PUTS "virtio_blk: serial "
    lea blk_id(%rip), %rdi
    movl $ID_BYTES, %esi
    call print_text
    PUTS "\n"

90: call blk_shutdown
    PUTS "virtio_blk: "
    movq rt_check_failures(%rip), %rdi
    call rt_putdec
    PUTS " failed\n"
    xorl %eax, %eax
    cmpq $0, rt_check_failures(%rip)
    je 99f
98: movl $EXIT_FAIL, %eax
99: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* blk_bringup() -> rax = capacity in sectors, or -1 after printing why. */
blk_bringup:
    pushq %rbx
    movl $VIRTIO_PCI_BLK_MODERN, %edi
    movl $VIRTIO_PCI_BLK_TRANSITIONAL, %esi
    lea blk_dev(%rip), %rdx
    call vio_pci_find
    testl %eax, %eax
    jz 1f
    PUTS "virtio_blk: no virtio-blk device\n"
    jmp 8f
1:  lea blk_dev(%rip), %rdi
    movabsq $((1 << VIRTIO_F_VERSION_1) | WANTED_FEATURES), %rsi
    call vio_init
    testl %eax, %eax
    jz 2f
    movl %eax, %ebx
    PUTS "virtio_blk: feature negotiation failed: "
    movl %ebx, %edi
    call rt_putdec
    PUTS "\n"
    jmp 8f
2:  lea blk_dev(%rip), %rdi
    xorl %esi, %esi
    lea blk_vq(%rip), %rdx
    call vio_queue_setup
    testl %eax, %eax
    jz 3f
    PUTS "virtio_blk: no request queue\n"
    jmp 8f
3:  lea blk_dev(%rip), %rdi
    call vio_driver_ok
    andl $(VIO_S_DRIVER_OK | VIO_S_NEEDS_RESET | VIO_S_FAILED), %eax
    cmpl $VIO_S_DRIVER_OK, %eax
    je 4f
    PUTS "virtio_blk: device did not accept DRIVER_OK\n"
    jmp 8f
4:  lea blk_dev(%rip), %rdi
    xorl %esi, %esi                         /* struct virtio_blk_config.capacity (§5.2.4) */
    call vio_cfg_read64
    movq %rax, %rbx
    PUTS "virtio_blk: capacity "
    movq %rbx, %rdi
    call rt_putdec
    PUTS " sectors, "
    lea word_rw(%rip), %rdi
    btq $VIRTIO_BLK_F_RO, blk_dev + VDEV_FEATURES(%rip)
    jnc 5f
    lea word_ro(%rip), %rdi
5:  call rt_puts
    movq blk_dev + VDEV_FEATURES(%rip), %rax
    shrq $VIRTIO_BLK_F_FLUSH, %rax
    andl $1, %eax
    CHECK "flush negotiated", 1
    movq %rbx, %rax
    popq %rbx
    ret
8:  movq $-1, %rax
    popq %rbx
    ret

/* blk_shutdown(): reset the device (§2.4) so it stops using guest memory. */
blk_shutdown:
    movq blk_dev + VDEV_COMMON(%rip), %rcx
    movb $0, VIO_CC_STATUS(%rcx)
    ret

/* blk_rq(edi = type, rsi = sector, rdx = buffer, ecx = length; 0 = no data) -> eax = status byte, or
 * STATUS_TIMEOUT / STATUS_NO_ROOM. One request in flight: header, data, status (§5.2.6). */
blk_rq:
    subq $(3 * SG_SIZE + 8), %rsp
    movl %edi, blk_hdr(%rip)                /* struct virtio_blk_req: le32 type, reserved, le64 sector */
    movl $0, blk_hdr + 4(%rip)
    movq %rsi, blk_hdr + 8(%rip)
    movb $0xff, blk_status(%rip)
    lea blk_hdr(%rip), %rax
    movq %rax, SG_ADDR(%rsp)
    movl $16, SG_LEN(%rsp)
    movl $0, SG_FLAGS(%rsp)
    lea SG_SIZE(%rsp), %r8                  /* next free entry */
    movl $2, %r9d                           /* entries */
    testl %ecx, %ecx
    jz 2f
    movq %rdx, SG_ADDR(%r8)
    movl %ecx, SG_LEN(%r8)
    xorl %eax, %eax
    cmpl $VIRTIO_BLK_T_OUT, %edi            /* the device reads the data of OUT, writes everything else */
    je 1f
    movl $VIRTQ_DESC_F_WRITE, %eax
1:  movl %eax, SG_FLAGS(%r8)
    addq $SG_SIZE, %r8
    incl %r9d
2:  lea blk_status(%rip), %rax
    movq %rax, SG_ADDR(%r8)
    movl $1, SG_LEN(%r8)
    movl $VIRTQ_DESC_F_WRITE, SG_FLAGS(%r8)
    lea blk_vq(%rip), %rdi
    movq %rsp, %rsi
    movl %r9d, %edx
    call vio_add
    cmpl $-1, %eax
    jne 3f
    movl $STATUS_NO_ROOM, %eax
    jmp 9f
3:  lea blk_vq(%rip), %rdi
    call vio_kick
    lea blk_vq(%rip), %rdi
    xorl %esi, %esi
    call vio_wait
    cmpq $-1, %rax
    jne 4f
    movl $STATUS_TIMEOUT, %eax
    jmp 9f
4:  movzbl blk_status(%rip), %eax
9:  addq $(3 * SG_SIZE + 8), %rsp
    ret

/* pattern_qword(rdi = sector, esi = qword index) -> rax. Clobbers only rax, rdx, r8. */
pattern_qword:
    movabsq $0x9e3779b97f4a7c15, %rax
    imulq %rdi, %rax
    movabsq $0xd1b54a32d192ed03, %r8
    movl %esi, %edx
    imulq %r8, %rdx
    xorq %rdx, %rax
    xorq blk_seed(%rip), %rax
    movq %rax, %rdx
    shrq $31, %rdx
    xorq %rdx, %rax
    movabsq $0xbf58476d1ce4e5b9, %r8
    imulq %r8, %rax
    movq %rax, %rdx
    shrq $29, %rdx
    xorq %rdx, %rax
    ret

/* pattern_fill(rdi = buffer, rsi = first sector, edx = sectors) */
pattern_fill:
    movq %rdi, %r9
    movq %rsi, %rdi
    movl %edx, %r10d
1:  testl %r10d, %r10d
    jz 9f
    xorl %esi, %esi
2:  call pattern_qword
    movq %rax, (%r9)
    addq $8, %r9
    incl %esi
    cmpl $64, %esi
    jb 2b
    incq %rdi
    decl %r10d
    jmp 1b
9:  ret

/* pattern_mismatches(rdi = buffer, rsi = first sector, edx = sectors) -> eax = sectors not equal to the pattern */
pattern_mismatches:
    movq %rdi, %r9
    movq %rsi, %rdi
    movl %edx, %r10d
    xorl %r11d, %r11d
1:  testl %r10d, %r10d
    jz 9f
    xorl %esi, %esi
    xorl %ecx, %ecx                         /* 1 once a qword of this sector differs */
2:  call pattern_qword
    cmpq %rax, (%r9)
    je 3f
    movl $1, %ecx
3:  addq $8, %r9
    incl %esi
    cmpl $64, %esi
    jb 2b
    addl %ecx, %r11d
    incq %rdi
    decl %r10d
    jmp 1b
9:  movl %r11d, %eax
    ret

/* print_text(rdi = bytes, esi = max): up to the first NUL, printable ASCII as is, anything else as '.' */
print_text:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    movl %esi, %r12d
1:  testl %r12d, %r12d
    jz 9f
    movzbl (%rbx), %edi
    testl %edi, %edi
    jz 9f
    cmpl $0x20, %edi
    jb 2f
    cmpl $0x7e, %edi
    jbe 3f
2:  movl $'.', %edi
3:  call rt_putc
    incq %rbx
    decl %r12d
    jmp 1b
9:  popq %r12
    popq %rbx
    ret

/* blk_bench(rdi = capacity): the three timed phases (see the header). */
blk_bench:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rdi, %r15
    lea key_mb(%rip), %rdi
    movl $16, %esi
    call rt_opt_u64
    movq %rax, %r12                         /* r12 = MiB */
    lea key_rand(%rip), %rdi
    movl $1024, %esi
    call rt_opt_u64
    movq %rax, %r13                         /* r13 = random reads */
    movq %r12, %rax
    shlq $11, %rax
    cmpq %r15, %rax
    ja 1f
    cmpq $8, %r15
    jae 2f
1:  PUTS "virtio_blk: disk too small for the benchmark\n"
    incq rt_check_failures(%rip)
    jmp 9f
2:  PUTS "virtio_blk: bench mb="
    movq %r12, %rdi
    call rt_putdec
    PUTS " rand="
    movq %r13, %rdi
    call rt_putdec
    PUTS "\n<"
    xorl %ebx, %ebx
3:  cmpq %r12, %rbx                         /* phase 1: sequential 1 MiB reads */
    jae 4f
    movl $VIRTIO_BLK_T_IN, %edi
    movq %rbx, %rsi
    shlq $11, %rsi
    lea blk_buf(%rip), %rdx
    movl $(MAX_SECTORS * 512), %ecx
    call blk_rq
    call count_bad_status
    incq %rbx
    jmp 3b
4:  PUTS "><"
    xorl %ebx, %ebx
5:  cmpq %r12, %rbx                         /* phase 2: sequential 1 MiB writes */
    jae 6f
    movl $VIRTIO_BLK_T_OUT, %edi
    movq %rbx, %rsi
    shlq $11, %rsi
    lea blk_buf(%rip), %rdx
    movl $(MAX_SECTORS * 512), %ecx
    call blk_rq
    call count_bad_status
    incq %rbx
    jmp 5b
6:  PUTS "><"
    movq blk_seed(%rip), %r14               /* xorshift64 state, never 0 */
    orq $1, %r14
    shrq $3, %r15                           /* 4 KiB blocks */
    xorl %ebx, %ebx
7:  cmpq %r13, %rbx                         /* phase 3: random 4 KiB reads */
    jae 8f
    movq %r14, %rax
    shlq $13, %rax
    xorq %rax, %r14
    movq %r14, %rax
    shrq $7, %rax
    xorq %rax, %r14
    movq %r14, %rax
    shlq $17, %rax
    xorq %rax, %r14
    movq %r14, %rax
    xorl %edx, %edx
    divq %r15
    leaq (, %rdx, 8), %rsi
    movl $VIRTIO_BLK_T_IN, %edi
    lea blk_buf(%rip), %rdx
    movl $4096, %ecx
    call blk_rq
    call count_bad_status
    incq %rbx
    jmp 7b
8:  PUTS ">\n"
9:  PUTS "virtio_blk: bench done\n"
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* count_bad_status(eax = status): count a failed benchmark request without printing (keeps phases quiet). */
count_bad_status:
    testl %eax, %eax
    jz 1f
    incq rt_check_failures(%rip)
1:  ret

STRING key_sectors, "sectors"
STRING key_seed, "seed"
STRING key_ro, "ro"
STRING key_kickall, "kickall"
STRING key_bench, "bench"
STRING key_mb, "mb"
STRING key_rand, "rand"
STRING word_rw, "read-write\n"
STRING word_ro, "read-only\n"
STRING word_kept, "refused writes kept "
STRING word_verified, "wrote, flushed and verified "
STRING name_unchanged, "sectors without the pattern"

.bss
.align 4096
blk_vq:
    .skip VQ_AREA_SIZE
blk_buf:
    .skip MAX_SECTORS * 512
.align 64
blk_dev:
    .skip VDEV_SIZE
blk_seed:
    .skip 8
blk_hdr:
    .skip 16
blk_id:
    .skip 24
blk_status:
    .skip 1
