/*
 * rt.S -- the CPL3 part of the kvmdm test-guest runtime: entry into the guest, Multiboot info,
 * COM1 output, command-line options, exit, and LAPIC/IOAPIC/interrupt helpers.
 *
 * Everything here runs at CPL3 with IOPL=3 (port I/O allowed) and IF=0; interrupts are only taken
 * inside rt_wait_irq (SYS_WAIT_IRQ), which makes interrupt-driven guests deterministic. The output
 * helpers (rt_putc, rt_puts, rt_puthex, rt_putdec) are also used by the CPL0 exception handler.
 * Calling convention: see rt.inc.
 */

.include "rt.inc"

.equ MB_INFO_FLAGS,     0
.equ MB_INFO_MEM_LOWER, 4
.equ MB_INFO_MEM_UPPER, 8
.equ MB_INFO_CMDLINE,   16
.equ MB_FLAG_MEM,       0x1           /* Multiboot spec 3.3: mem_lower/mem_upper valid */
.equ MB_FLAG_CMDLINE,   0x4           /* Multiboot spec 3.3: cmdline valid */
.equ MB_BOOT_MAGIC,     0x2BADB002
.equ PUTC_SPIN_LIMIT,   0x100000      /* a UART whose THRE never sets must not hang the guest */
.equ TIMER_DIVIDE_16,   0x3           /* LAPIC DCR encoding of divide-by-16 (SDM Vol. 3A 11.5.4) */
.equ TIMER_TICKS_PER_MS, 62500        /* 1 GHz APIC bus (KVM and QEMU) / 16 */
.equ TIMER_MAX_MS,      68000         /* 68000 * 62500 < 2^32 */
.equ LVT_MASKED,        0x10000

.text
.code64

/* The first CPL3 instruction (boot.S irets here). */
.globl rt_user_entry
rt_user_entry:
    call rt_init
    movq rt_cmdline(%rip), %rdi
    call guest_main                         /* eax = exit code */
    movl %eax, %edi
    call rt_exit

/* Copy what the guest needs out of the Multiboot info structure (spec 3.3). */
rt_init:
    lea empty_string(%rip), %rax
    movq %rax, rt_cmdline(%rip)
    cmpl $MB_BOOT_MAGIC, rt_boot_magic(%rip)
    jne 9f
    movl rt_mbi_phys(%rip), %esi
    movl MB_INFO_FLAGS(%rsi), %eax
    movq %rax, rt_mbi_flags(%rip)
    testl $MB_FLAG_MEM, %eax
    jz 1f
    movl MB_INFO_MEM_LOWER(%rsi), %edx
    movq %rdx, rt_mem_lower_kib(%rip)
    movl MB_INFO_MEM_UPPER(%rsi), %edx
    movq %rdx, rt_mem_upper_kib(%rip)
1:  testl $MB_FLAG_CMDLINE, %eax
    jz 2f
    movl MB_INFO_CMDLINE(%rsi), %edx
    testl %edx, %edx
    jz 2f
    movq %rdx, rt_cmdline(%rip)
2:  ret
9:  PUTS "boot: EAX is not the Multiboot magic 0x2badb002\n"
    movl $EXIT_NOT_MULTIBOOT, %edi
    call rt_exit

/* rt_exit(edi = code): write the code to the debug-exit port; halt if the VMM ignores it. */
.globl rt_exit
rt_exit:
    movl %edi, %eax
    movw $DEBUG_EXIT_PORT, %dx
    outb %al, %dx
    movl $SYS_HALT, %eax
    SERVICE
    jmp rt_exit

/* rt_putc(dil): poll LSR.THRE, then write THR. Touches only rax, rcx, rdx. */
.globl rt_putc
rt_putc:
    movw $(COM1_BASE + UART_LSR), %dx
    movl $PUTC_SPIN_LIMIT, %ecx
1:  inb %dx, %al
    testb $UART_LSR_THRE, %al
    jnz 2f
    decl %ecx
    jnz 1b
2:  movl %edi, %eax
    movw $(COM1_BASE + UART_THR), %dx
    outb %al, %dx
    ret

/* rt_puts(rdi = NUL-terminated string). */
.globl rt_puts
rt_puts:
    movq %rdi, %rsi
1:  movzbl (%rsi), %edi
    testl %edi, %edi
    jz 2f
    call rt_putc
    incq %rsi
    jmp 1b
2:  ret

/* rt_puthex(rdi): "0x" and the value in lowercase hex without leading zeros. */
.globl rt_puthex
rt_puthex:
    pushq %rbx
    pushq %r12
    movq %rdi, %rbx
    movl $'0', %edi
    call rt_putc
    movl $'x', %edi
    call rt_putc
    movl $60, %r12d                         /* shift of the nibble to print */
1:  testl %r12d, %r12d
    jz 2f                                   /* always print the last nibble */
    movq %rbx, %rax
    movl %r12d, %ecx
    shrq %cl, %rax
    testq %rax, %rax
    jnz 2f
    subl $4, %r12d
    jmp 1b
2:  movq %rbx, %rax
    movl %r12d, %ecx
    shrq %cl, %rax
    andl $0xf, %eax
    lea hex_digits(%rip), %rdx
    movzbl (%rdx, %rax), %edi
    call rt_putc
    subl $4, %r12d
    jns 2b
    popq %r12
    popq %rbx
    ret

/* rt_putdec(rdi): the value in unsigned decimal. */
.globl rt_putdec
rt_putdec:
    subq $32, %rsp
    lea 31(%rsp), %rsi
    movb $0, (%rsi)
    movq %rdi, %rax
    movl $10, %ecx
1:  xorl %edx, %edx
    divq %rcx
    addb $'0', %dl
    decq %rsi
    movb %dl, (%rsi)
    testq %rax, %rax
    jnz 1b
    movq %rsi, %rdi
    call rt_puts
    addq $32, %rsp
    ret

/* rt_opt_find(rdi = key) -> rax = pointer to the value of the first `key=value` word of the
 * command line, or 0. Words are separated by spaces; QEMU puts the kernel path in the first word. */
.globl rt_opt_find
rt_opt_find:
    movq rt_cmdline(%rip), %rsi
1:  movzbl (%rsi), %eax                     /* skip spaces */
    cmpb $' ', %al
    jne 2f
    incq %rsi
    jmp 1b
2:  testb %al, %al
    jz 8f
    xorl %ecx, %ecx                         /* compare the word with key */
3:  movzbl (%rdi, %rcx), %eax
    movzbl (%rsi, %rcx), %edx
    testb %al, %al
    jz 4f
    cmpb %al, %dl
    jne 5f
    incq %rcx
    jmp 3b
4:  cmpb $'=', %dl
    jne 5f
    lea 1(%rsi, %rcx), %rax
    ret
5:  movzbl (%rsi), %eax                     /* skip to the end of the word */
    testb %al, %al
    jz 8f
    cmpb $' ', %al
    je 1b
    incq %rsi
    jmp 5b
8:  xorl %eax, %eax
    ret

/* rt_opt_u64(rdi = key, rsi = default) -> rax. Values are decimal or 0x-prefixed hex; a malformed or
 * overflowing value prints "bad option: <key>" and exits with EXIT_BAD_OPTION. */
.globl rt_opt_u64
rt_opt_u64:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %rbx
    movq %rsi, %r12
    call rt_opt_find
    testq %rax, %rax
    jz 7f
    movq %rax, %rsi
    xorl %r12d, %r12d                       /* accumulated value */
    xorl %r13d, %r13d                       /* digit count */
    cmpb $'0', (%rsi)
    jne 3f
    movzbl 1(%rsi), %eax
    orb $0x20, %al
    cmpb $'x', %al
    jne 3f
    addq $2, %rsi
1:  movzbl (%rsi), %eax                     /* hex digits */
    call hex_digit_value
    testl %eax, %eax
    js 5f
    movq %r12, %rdx
    shrq $60, %rdx
    jnz 9f                                  /* overflow */
    shlq $4, %r12
    orq %rax, %r12
    incl %r13d
    incq %rsi
    jmp 1b
3:  movzbl (%rsi), %eax                     /* decimal digits */
    subl $'0', %eax
    cmpl $9, %eax
    ja 5f
    movl %eax, %ecx
    movq %r12, %rax
    movl $10, %edx
    movq %rdx, %r8
    mulq %r8
    jc 9f                                   /* overflow */
    addq %rcx, %rax
    jc 9f
    movq %rax, %r12
    incl %r13d
    incq %rsi
    jmp 3b
5:  testl %r13d, %r13d                      /* end of digits: at least one, then end of word */
    jz 9f
    movzbl (%rsi), %eax
    testb %al, %al
    jz 7f
    cmpb $' ', %al
    jne 9f
7:  movq %r12, %rax
    popq %r13
    popq %r12
    popq %rbx
    ret
9:  PUTS "bad option: "
    movq %rbx, %rdi
    call rt_puts
    PUTS "\n"
    movl $EXIT_BAD_OPTION, %edi
    call rt_exit

/* eax = character -> eax = its hex value, or -1. */
hex_digit_value:
    cmpl $'0', %eax
    jb 2f
    cmpl $'9', %eax
    jbe 1f
    orl $0x20, %eax
    cmpl $'a', %eax
    jb 2f
    cmpl $'f', %eax
    ja 2f
    subl $('a' - 10), %eax
    ret
1:  subl $'0', %eax
    ret
2:  movl $-1, %eax
    ret

/* rt_check(rdi = name, rsi = got, rdx = want) -> eax = 1 if got == want. Prints "PASS <name>" or
 * "FAIL <name> got=<hex> want=<hex>" and counts failures in rt_check_failures. */
.globl rt_check
rt_check:
    pushq %rbx
    pushq %r12
    pushq %r13
    movq %rdi, %rbx
    movq %rsi, %r12
    movq %rdx, %r13
    cmpq %rdx, %rsi
    jne 1f
    PUTS "PASS "
    movq %rbx, %rdi
    call rt_puts
    PUTS "\n"
    movl $1, %eax
    jmp 2f
1:  incq rt_check_failures(%rip)
    PUTS "FAIL "
    movq %rbx, %rdi
    call rt_puts
    PUTS " got="
    movq %r12, %rdi
    call rt_puthex
    PUTS " want="
    movq %r13, %rdi
    call rt_puthex
    PUTS "\n"
    xorl %eax, %eax
2:  popq %r13
    popq %r12
    popq %rbx
    ret

/* rt_wait_irq(): sleep until at least one interrupt has been handled (SYS_WAIT_IRQ). */
.globl rt_wait_irq
rt_wait_irq:
    movl $SYS_WAIT_IRQ, %eax
    SERVICE
    ret

/* rt_lapic_enable() -> eax = this CPU's APIC ID. Software-enables the xAPIC (SVR bit 8) with
 * spurious vector 0xff and TPR 0 (SDM Vol. 3A 11.4.7.1, 11.9). */
.globl rt_lapic_enable
rt_lapic_enable:
    movl $LAPIC_BASE, %ecx
    movl $(0x100 | VEC_SPURIOUS), LAPIC_SVR(%rcx)
    movl $0, LAPIC_TPR(%rcx)
    movl LAPIC_ID(%rcx), %eax
    shrl $24, %eax
    ret

/* rt_ioapic_route(edi = gsi, esi = vector): fixed delivery, physical destination = this CPU,
 * edge-triggered, active high (ISA interrupts), unmasked (82093AA datasheet 3.2.4). */
.globl rt_ioapic_route
rt_ioapic_route:
    pushq %rdi
    pushq %rsi
    call rt_lapic_enable                    /* eax = APIC ID */
    popq %rsi
    popq %rdi
    movl $IOAPIC_BASE, %ecx
    leal IOAPIC_REDTBL + 1(%rdi, %rdi), %edx   /* high half first: destination */
    movl %edx, IOAPIC_IOREGSEL(%rcx)
    shll $24, %eax
    movl %eax, IOAPIC_IOWIN(%rcx)
    decl %edx                               /* low half last: unmasks */
    movl %edx, IOAPIC_IOREGSEL(%rcx)
    andl $0xff, %esi
    movl %esi, IOAPIC_IOWIN(%rcx)
    ret

/* rt_ioapic_mask(edi = gsi). */
.globl rt_ioapic_mask
rt_ioapic_mask:
    movl $IOAPIC_BASE, %ecx
    leal IOAPIC_REDTBL(%rdi, %rdi), %edx
    movl %edx, IOAPIC_IOREGSEL(%rcx)
    movl $LVT_MASKED, IOAPIC_IOWIN(%rcx)
    ret

/* rt_wait_irq_timeout(edi = milliseconds) -> eax = 1 if the LAPIC one-shot timer fired (timed out),
 * else 0. The timeout assumes a 1 GHz APIC bus (KVM's and QEMU's) and is capped at 68 s; it is a
 * watchdog against a VMM that never interrupts, not a clock. */
.globl rt_wait_irq_timeout
rt_wait_irq_timeout:
    pushq %rbx
    movq rt_irq_counts + 8 * VEC_LAPIC_TIMER(%rip), %rbx
    cmpl $TIMER_MAX_MS, %edi
    jbe 1f
    movl $TIMER_MAX_MS, %edi
1:  imull $TIMER_TICKS_PER_MS, %edi, %edi
    movl $LAPIC_BASE, %ecx
    movl $TIMER_DIVIDE_16, LAPIC_TIMER_DCR(%rcx)
    movl $VEC_LAPIC_TIMER, LAPIC_LVT_TIMER(%rcx)    /* one-shot, unmasked */
    movl %edi, LAPIC_TIMER_ICR(%rcx)
    call rt_wait_irq
    movl $LAPIC_BASE, %ecx
    movl $0, LAPIC_TIMER_ICR(%rcx)                  /* stop */
    movl $(LVT_MASKED | VEC_LAPIC_TIMER), LAPIC_LVT_TIMER(%rcx)
    xorl %eax, %eax
    cmpq rt_irq_counts + 8 * VEC_LAPIC_TIMER(%rip), %rbx
    setne %al
    popq %rbx
    ret

.section .rodata
hex_digits:
    .ascii "0123456789abcdef"
empty_string:
    .byte 0

.data
.align 8
.globl rt_cmdline, rt_mem_lower_kib, rt_mem_upper_kib, rt_mbi_flags, rt_check_failures
rt_cmdline:
    .quad 0
rt_mem_lower_kib:
    .quad 0
rt_mem_upper_kib:
    .quad 0
rt_mbi_flags:
    .quad 0
rt_check_failures:
    .quad 0
