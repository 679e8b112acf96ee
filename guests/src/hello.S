/*
 * hello -- the README demo guest. At CPL3 it prints a banner, the memory size from the Multiboot info,
 * the sum of the first N primes (cmdline `primes=N`, default 1000) computed by trial division, "bye",
 * and exits with code 0. Its output is the same under any VMM that follows guests/README.md.
 */

.include "rt.inc"

.text
.code64
.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    PUTS "kvmdm demo guest: hello from CPL3\n"

    /* Multiboot mem_upper counts KiB from 1 MiB to the first hole, so RAM below the hole is
     * 1 MiB + mem_upper. Round up to whole MiB: QEMU's Multiboot ROM reports SeaBIOS's e820 map, in
     * which the top 128 KiB of RAM are reserved, while a BIOS-less VMM reports all of it. */
    PUTS "memory: "
    movq rt_mem_upper_kib(%rip), %rdi
    addq $(1024 + 1023), %rdi
    shrq $10, %rdi
    call rt_putdec
    PUTS " MiB\n"

    lea key_primes(%rip), %rdi
    movl $1000, %esi
    call rt_opt_u64
    movq %rax, %r12                         /* N */
    xorl %r13d, %r13d                       /* sum */
    xorl %ebx, %ebx                         /* primes found */
    movl $2, %ecx                           /* candidate */
1:  cmpq %r12, %rbx
    jae 4f
    movl $2, %r8d                           /* trial divisor */
2:  movq %r8, %rax
    mulq %r8
    cmpq %rcx, %rax
    ja 3f                                   /* divisor^2 > candidate: prime */
    movq %rcx, %rax
    xorl %edx, %edx
    divq %r8
    testq %rdx, %rdx
    jz 5f                                   /* composite */
    incq %r8
    jmp 2b
3:  addq %rcx, %r13
    incq %rbx
5:  incq %rcx
    jmp 1b
4:  PUTS "sum of the first "
    movq %r12, %rdi
    call rt_putdec
    PUTS " primes: "
    movq %r13, %rdi
    call rt_putdec
    PUTS "\nbye\n"
    movl $EXIT_OK, %eax
    popq %r13
    popq %r12
    popq %rbx
    ret

STRING key_primes, "primes"
