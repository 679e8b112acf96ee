/*
 * loop -- the exit-cost benchmark guest. Cmdline `loops=N port=P` (defaults N=100000, P=0x80): at CPL3
 * it executes `out %al, %dx` to port P N times, then prints "loop: N outs to port P" and exits 0. With
 * N=0 it does nothing but boot and print, so a host can time N against 0 to get the cost per exit.
 * `marks=1` also prints "<" right before the loop and ">" right after it, so a host that timestamps the
 * serial line sees exactly the loop's duration (bench/exits.py), free of boot-time noise.
 */

.include "rt.inc"

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
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
    cmpq $0xffff, %rbx
    jbe 1f
    PUTS "bad option: port\n"
    movl $EXIT_BAD_OPTION, %eax
    jmp 3f
1:  testq %r13, %r13
    jz 5f
    PUTS "<"
5:  movl %ebx, %edx
    movq %r12, %rcx
    xorl %eax, %eax
    testq %rcx, %rcx
    jz 2f
4:  outb %al, %dx
    decq %rcx
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
3:  popq %r13
    popq %r12
    popq %rbx
    ret

STRING key_loops, "loops"
STRING key_port, "port"
STRING key_marks, "marks"
