/*
 * loop -- the exit-cost benchmark guest. Cmdline `loops=N port=P` (defaults N=100000, P=0x80): at CPL3
 * it executes `out %al, %dx` to port P N times, then prints "loop: N outs to port P" and exits 0. With
 * N=0 it does nothing but boot and print, so a host can time N against 0 to get the cost per exit.
 * `marks=1` also prints "<" right before the loop and ">" right after it, so a host that timestamps the
 * serial line sees exactly the loop's duration (bench/exits.py), free of boot-time noise.
 * `dir=1` makes each access an `in` instead of an `out`, `size=2|4` a word or dword access (default byte:
 * `inb`/`outb`), and `pci=A` (A != 0) precedes each access with `outl A, 0xcf8`: the loop then measures PCI
 * config mechanism #1 pairs, e.g. `pci=0x80000000 port=0xcfc dir=1 size=4` reads 00:00.0's vendor/device dword.
 * Out accesses write 0 (a THR write at port=0x3f8 sends NUL bytes).
 */

.include "rt.inc"

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rbp
    lea key_loops(%rip), %rdi
    movl $100000, %esi
    call rt_opt_u64
    movq %rax, %r12
    lea key_port(%rip), %rdi
    movl $0x80, %esi
    call rt_opt_u64
    movq %rax, %rbx
    lea key_marks(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %r13
    lea key_dir(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %r14
    lea key_size(%rip), %rdi
    movl $1, %esi
    call rt_opt_u64
    movq %rax, %r15
    lea key_pci(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %rbp
    cmpq $0xffff, %rbx
    jbe 1f
    PUTS "bad option: port\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 3f
1:  cmpq $1, %r14
    jbe 9f
    PUTS "bad option: dir\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 3f
9:  cmpq $1, %r15
    je 11f
    cmpq $2, %r15
    je 11f
    cmpq $4, %r15
    je 11f
    PUTS "bad option: size\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 3f
11: movq $0xffffffff, %rax
    cmpq %rax, %rbp
    jbe 13f
    PUTS "bad option: pci\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 3f
13: testq %r13, %r13
    jz 5f
    PUTS "<"
5:  movl %ebp, %r8d
    movq %r12, %rcx
    testq %rcx, %rcx
    jz 2f
4:  testl %r8d, %r8d
    jz 7f
    movl %r8d, %eax
    movw $0xcf8, %dx
    outl %eax, %dx
7:  movl %ebx, %edx
    xorl %eax, %eax
    testq %r14, %r14
    jnz 10f
    cmpq $2, %r15
    je 12f
    cmpq $4, %r15
    je 14f
    outb %al, %dx
    jmp 8f
12: outw %ax, %dx
    jmp 8f
14: outl %eax, %dx
    jmp 8f
10: cmpq $2, %r15
    je 15f
    cmpq $4, %r15
    je 16f
    inb %dx, %al
    jmp 8f
15: inw %dx, %ax
    jmp 8f
16: inl %dx, %eax
8:  decq %rcx
    jnz 4b
2:  testq %r13, %r13
    jz 6f
    PUTS ">"
6:  PUTS "loop: "
    movq %r12, %rdi
    call rt_putdec
    PUTS " outs to port "
    movq %rbx, %rdi
    call rt_puthex
    PUTS "\n"
    movl $EXIT_OK, %eax
3:  popq %rbp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

STRING key_loops, "loops"
STRING key_port, "port"
STRING key_marks, "marks"
STRING key_dir, "dir"
STRING key_size, "size"
STRING key_pci, "pci"
