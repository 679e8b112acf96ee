/*
 * uart_irq -- COM1 interrupts through the IOAPIC (GSI 4, edge, active high) to the LAPIC, 8259s masked.
 *
 * TX: with IER = THRE it sends a message one byte per THRE interrupt (the first comes from enabling
 *     ETBEI while THR is empty, 16550 datasheet), so the line appears only if THRE interrupts arrive.
 * RX: with IER = RDA it prints "READY", then echoes every received byte until it has received the line
 *     "quit" or `lines=N` lines (N > 0), bytes being read only after an interrupt woke the guest.
 * Then "IRQS tx=ok rx=ok rxbytes=<n>" and exit 0. Interrupt counts are not printed: how many THRE/RDA
 * edges a VMM coalesces may differ, the booleans may not. A wait that sees neither the expected
 * interrupt nor any UART cause within `timeout=MS` (default 10000) prints "FAIL ..." and exits 1.
 * Interrupts are only taken inside rt_wait_irq_timeout, so the output is deterministic.
 */

.include "rt.inc"

.equ UART_VECTOR, VEC_IRQ_BASE + UART_GSI
.equ LCR_8N1,     0x03
.equ MCR_DTR_RTS_OUT2, 0x0b                 /* OUT2 gates the IRQ line on PC UARTs */
/* The last six bytes "\nquit\n" as they sit in the shift register (oldest byte highest). */
.equ QUIT_LINE,   0x0a717569740a
.equ QUIT_MASK,   0xffffffffffff

.text
.code64

/* Runs at CPL0 from the runtime's interrupt path (rdi = vector). */
.globl guest_irq_hook
guest_irq_hook:
    cmpl $UART_VECTOR, %edi
    jne 1f
    incq uart_irqs(%rip)
1:  ret

.globl guest_main
guest_main:
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    lea key_timeout(%rip), %rdi
    movl $10000, %esi
    call rt_opt_u64
    movq %rax, %r15                         /* timeout in ms */
    lea key_lines(%rip), %rdi
    xorl %esi, %esi
    call rt_opt_u64
    movq %rax, %r14                         /* lines to read, 0 = until "quit" */

    /* UART: 8N1, no interrupts yet, OUT2 on; then route GSI 4. */
    movw $(COM1_BASE + UART_LCR), %dx
    movb $LCR_8N1, %al
    outb %al, %dx
    movw $(COM1_BASE + UART_IER), %dx
    xorl %eax, %eax
    outb %al, %dx
    movw $(COM1_BASE + UART_MCR), %dx
    movb $MCR_DTR_RTS_OUT2, %al
    outb %al, %dx
    movl $UART_GSI, %edi
    movl $UART_VECTOR, %esi
    call rt_ioapic_route

    /* ---- TX: one byte per THRE interrupt ---- */
    lea tx_message(%rip), %r12
    movw $(COM1_BASE + UART_IER), %dx
    movb $UART_IER_THRE, %al
    outb %al, %dx
1:  cmpb $0, (%r12)
    je 5f
    movl %r15d, %edi
    call rt_wait_irq_timeout
    movl %eax, %ebx                         /* 1 = timed out */
    movw $(COM1_BASE + UART_IIR), %dx
    inb %dx, %al
    testb $UART_IIR_NO_INT, %al
    jz 2f
    testl %ebx, %ebx                        /* nothing pending: spurious wake-up, or a timeout */
    jz 1b
    PUTS "\nFAIL tx: no THRE interrupt\n"
    jmp 90f
2:  andb $UART_IIR_ID_MASK, %al
    cmpb $UART_IIR_THRI, %al
    jne 3f
    movb (%r12), %al                        /* reading IIR cleared THRI; writing THR re-arms it */
    movw $(COM1_BASE + UART_THR), %dx
    outb %al, %dx
    incq %r12
    incq tx_bytes(%rip)
    jmp 1b
3:  call clear_other_cause
    jmp 1b
5:  movq uart_irqs(%rip), %rax
    movq %rax, tx_irqs(%rip)
    movw $(COM1_BASE + UART_IER), %dx
    xorl %eax, %eax
    outb %al, %dx

    /* ---- RX: echo what arrives, reading only after a wake-up ---- */
    movw $(COM1_BASE + UART_IER), %dx
    movb $UART_IER_RDA, %al
    outb %al, %dx
    PUTS "READY\n"
    movl $0x0a, %r13d                       /* the last bytes received; starts as after a newline */
    xorl %r12d, %r12d                       /* lines received */
10: movq uart_irqs(%rip), %rax
    movq %rax, irqs_before_wait(%rip)
    movl %r15d, %edi
    call rt_wait_irq_timeout
    movl %eax, %ebx                         /* 1 = timed out */
    movq $0, got_byte(%rip)
11: movw $(COM1_BASE + UART_IIR), %dx
    inb %dx, %al
    testb $UART_IIR_NO_INT, %al
    jnz 15f
    andb $UART_IIR_ID_MASK, %al
    cmpb $UART_IIR_RDI, %al
    je 12f
    cmpb $UART_IIR_CTI, %al
    je 12f
    call clear_other_cause
    jmp 11b
12: movw $(COM1_BASE + UART_LSR), %dx       /* drain the receiver */
    inb %dx, %al
    testb $UART_LSR_DR, %al
    jz 11b
    movw $(COM1_BASE + UART_RBR), %dx
    inb %dx, %al
    movzbl %al, %edi
    movq $1, got_byte(%rip)
    incq rx_bytes(%rip)
    shlq $8, %r13
    orq %rdi, %r13
    call rt_putc
    cmpb $0x0a, %r13b
    jne 12b
    incq %r12                               /* a line ended */
    movq %r13, %rax
    movabsq $QUIT_MASK, %rcx
    andq %rcx, %rax
    movabsq $QUIT_LINE, %rcx
    cmpq %rcx, %rax
    je 16f
    testq %r14, %r14
    jz 12b
    cmpq %r14, %r12
    jae 16f
    jmp 12b
15: cmpq $0, got_byte(%rip)                 /* receiver drained */
    jne 17f
    testl %ebx, %ebx
    jz 10b                                  /* spurious wake-up (e.g. the last THRE edge): wait again */
    PUTS "\nFAIL rx: no input interrupt\n"
    jmp 90f
16: movq $1, rx_done(%rip)                  /* done, after accounting for this wake-up */
17: /* Bytes were read: an RX interrupt must have woken us, not the watchdog. */
    movq uart_irqs(%rip), %rax
    cmpq irqs_before_wait(%rip), %rax
    je 19f
    incq rx_irq_wakeups(%rip)
    cmpq $0, rx_done(%rip)
    je 10b
    jmp 20f
19: testl %ebx, %ebx
    jnz 25f
    cmpq $0, rx_done(%rip)                  /* not timed out: the wake-up came from elsewhere */
    je 10b
    jmp 20f
25:     PUTS "\nFAIL rx: input arrived without an interrupt\n"
    jmp 90f

20: movw $(COM1_BASE + UART_IER), %dx
    xorl %eax, %eax
    outb %al, %dx
    /* tx: every byte went out after its own THRE interrupt; rx: an interrupt announced input. */
    PUTS "IRQS tx="
    movq tx_bytes(%rip), %rax
    cmpq tx_irqs(%rip), %rax
    ja 21f
    PUTS "ok"
    jmp 22f
21: PUTS "fail"
    incq rt_check_failures(%rip)
22: PUTS " rx="
    cmpq $0, rx_irq_wakeups(%rip)
    je 23f
    PUTS "ok"
    jmp 24f
23: PUTS "fail"
    incq rt_check_failures(%rip)
24: PUTS " rxbytes="
    movq rx_bytes(%rip), %rdi
    call rt_putdec
    PUTS "\n"
    xorl %eax, %eax
    cmpq $0, rt_check_failures(%rip)
    setne %al
    jmp 99f
90: movl $EXIT_FAIL, %eax
99: popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    ret

/* Acknowledge a cause this guest did not ask for (al = IIR id): line status, modem status. */
clear_other_cause:
    cmpb $UART_IIR_RLSI, %al
    jne 1f
    movw $(COM1_BASE + UART_LSR), %dx
    inb %dx, %al
    ret
1:  movw $(COM1_BASE + UART_MSR), %dx
    inb %dx, %al
    ret

.section .rodata
tx_message:
    .asciz "uart_irq: this line was sent one byte per THRE interrupt\n"

.data
.align 8
uart_irqs:  .quad 0
tx_irqs:    .quad 0
rx_irq_wakeups: .quad 0
irqs_before_wait: .quad 0
tx_bytes:   .quad 0
rx_bytes:   .quad 0
got_byte:   .quad 0
rx_done:    .quad 0

STRING key_timeout, "timeout"
STRING key_lines, "lines"
