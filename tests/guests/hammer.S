/*
 * hammer -- stray accesses are harmless. At CPL3, for `rounds=N` rounds (default 16) it writes to and
 * reads from unclaimed ports (1/2/4 bytes) and unbacked MMIO (1/2/4/8 bytes), then checks that
 *   - every port read returned all-ones (nothing drives the ISA bus; QEMU's unassigned I/O does this),
 *   - every MMIO read returned all-zeros or all-ones for its size and never a value written before
 *     (QEMU 7.2 reads unassigned memory as 0, real PCI master aborts as all-ones: both are "floating"),
 *   - a RAM canary is intact and the guest is still running.
 * The addresses are unclaimed on QEMU `-machine pc -nodefaults` and in kvmcore's layout: no COM2-4 or
 * LPT, nothing in the PCI hole at 0xe0000000/0xf0000000, past the HPET's 1 KiB (0xfed01000) and past
 * the test device's 64 KiB (0xff010000). Prints "PASS <what> <where>" / "FAIL ..." lines and a
 * summary; exit code 0 if all passed, else 1.
 */

.include "rt.inc"

.equ PORT_COUNT, 6
.equ MMIO_COUNT, 4

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    lea key_rounds(%rip), %rdi
    movl $16, %esi
    call rt_opt_u64
    testq %rax, %rax
    jnz 1f
    PUTS "bad option: rounds\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 99f
1:  movq %rax, %r15

    /* ---- ports ---- */
    xorl %r12d, %r12d
2:  lea ports(%rip), %rax
    movzwl (%rax, %r12, 2), %ebx
    xorl %r13d, %r13d                       /* 1 once a read was wrong */
    movq %r15, %r14
3:  movl %ebx, %edx
    movb $0x5a, %al
    outb %al, %dx
    movw $0xa55a, %ax
    outw %ax, %dx
    movl $0x5aa55aa5, %eax
    outl %eax, %dx
    xorl %eax, %eax
    inb %dx, %al
    cmpl $0xff, %eax
    jne 4f
    xorl %eax, %eax
    inw %dx, %ax
    cmpl $0xffff, %eax
    jne 4f
    inl %dx, %eax
    cmpl $0xffffffff, %eax
    jne 4f
    decq %r14
    jnz 3b
    PUTS "PASS port "
    movq %rbx, %rdi
    call rt_puthex
    PUTS "\n"
    jmp 5f
4:  movq %rax, %r13
    incq rt_check_failures(%rip)
    PUTS "FAIL port "
    movq %rbx, %rdi
    call rt_puthex
    PUTS " got="
    movq %r13, %rdi
    call rt_puthex
    PUTS "\n"
5:  incq %r12
    cmpq $PORT_COUNT, %r12
    jb 2b

    /* ---- unbacked MMIO ---- */
    xorl %r12d, %r12d
6:  lea mmio(%rip), %rax
    movl (%rax, %r12, 4), %ebx
    movq %r15, %r14
7:  movabsq $0x5aa55aa55aa55aa5, %rax
    movq %rax, (%rbx)
    movl %eax, 8(%rbx)
    movw %ax, 12(%rbx)
    movb %al, 15(%rbx)
    movq (%rbx), %rax
    movq $-1, %rcx
    call is_floating
    jnz 8f
    movl 8(%rbx), %eax
    movl $0xffffffff, %ecx
    call is_floating
    jnz 8f
    movzwl 12(%rbx), %eax
    movl $0xffff, %ecx
    call is_floating
    jnz 8f
    movzbl 15(%rbx), %eax
    movl $0xff, %ecx
    call is_floating
    jnz 8f
    decq %r14
    jnz 7b
    PUTS "PASS mmio "
    movq %rbx, %rdi
    call rt_puthex
    PUTS "\n"
    jmp 9f
8:  movq %rax, %r13
    incq rt_check_failures(%rip)
    PUTS "FAIL mmio "
    movq %rbx, %rdi
    call rt_puthex
    PUTS " got="
    movq %r13, %rdi
    call rt_puthex
    PUTS "\n"
9:  incq %r12
    cmpq $MMIO_COUNT, %r12
    jb 6b

    /* ---- RAM untouched ---- */
    movq canary(%rip), %rax
    CHECK "ram canary", 0x1122334455667788

    PUTS "hammer: "
    movq %r15, %rdi
    call rt_putdec
    PUTS " rounds, "
    movq rt_check_failures(%rip), %rdi
    call rt_putdec
    PUTS " failed\n"
    xorl %eax, %eax
    cmpq $0, rt_check_failures(%rip)
    setne %al
99: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* ZF set if rax is 0 or equals rcx (all-ones of the access size). */
is_floating:
    testq %rax, %rax
    jz 1f
    cmpq %rcx, %rax
1:  ret

.section .rodata
ports:
    .word 0x200, 0x278, 0x2f8, 0x3e8, 0x4000, 0x7f00
mmio:
    .long 0xe0000000, 0xf0000000, 0xfed01000, 0xff010000

.data
.align 8
canary:
    .quad 0x1122334455667788

STRING key_rounds, "rounds"
